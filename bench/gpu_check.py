"""One GPU check, ready to run on a bare GPU machine with the Python package registry only (no model hub): what
this project does on a GPU that its CPU tests cannot show, stage by stage, each stage's results written to the
JSON file as soon as it ends (a timeout still leaves every finished stage's), a failed stage recorded and the
next one run.

    python bench/gpu_check.py --out gpu_check.json          # on one CUDA GPU (planned: at most 8 minutes, H100)
    python bench/gpu_check.py --out check.json --tiny       # the same code on the CPU at tiny sizes (the tests)

Stages (--stages picks some):
  environment   versions, the device, and what local_models.py decides there: dtype (resolve_dtype), 4-bit or not
                (want_4bit) for the embedded model and a 7B shape, Trainer's mixed precision (mixed_precision)
  embedded      the embedded model (--tiny: the Mistral stand-in) in 4-bit NF4 through the project's loader
                (local_models.load_local): our decoder's
                greedy tokens (decoding.generate_batch) against HF generate's row by row, each divergence's
                logit gap at the first differing token (a near-tie when under NEAR_TIE); LocalLM.score against
                one plain forward per pair; two runs bitwise equal; with a LoRA adapter attached and switched off
                (the Roleplayer's base beside Q_t) the scores are the base's exactly
  mistral       Mistral-7B-Instruct-v0.2's shape (random weights, NF4: bench/gpu.py) under a 16 GiB memory cap:
                the laptop preset's heaviest calls, each one's allocated and reserved peak beside the memory plan
                and its tokens/s, HF generate's tokens/s on the same batch, and three updates through 04's Trainer
                (LabelledLossTrainer) with the preset's settings (batch 4 x 4 accumulated, LoRA r 16, gradient
                checkpointing, the mixed precision local_models.mixed_precision gives)
  run_all       `bash run_all.sh laptop` at the smoke preset's sizes on the Mistral stand-in (tests/mistral_standin.py),
                every role local (no OPENAI_API_KEY)
--tiny: a two-layer Mistral, a few prompts and tokens, no memory cap; what it checks is the same code.
"""

import argparse
import dataclasses
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

import gpu  # noqa: E402  (the Mistral-shaped model and the heavy calls measured as bench/gpu.py measures them)
from memory_plan import MISTRAL, PRESETS, heavy_calls, model_config  # noqa: E402
from mistral_standin import MISTRAL_7B_INSTRUCT_V02, STANDIN_SIZES, build_standin, standin_tokenizer  # noqa: E402
from chat_format import encode_chat, encode_for_training, template_accepts_system  # noqa: E402
from local_models import (LocalLM, count_params, embedded_model_dir, mixed_precision, resolve_dtype,  # noqa: E402
                          want_4bit)
from roles import answer_view, questioner_view, roleplayer_view  # noqa: E402
from training import LabelledLossTrainer, PadCollator  # noqa: E402
from utils import StepError, run_main, write_json_atomic  # noqa: E402


STAGES = ["environment", "embedded", "mistral", "run_all"]
NEAR_TIE = 0.5  # logits: a greedy choice this close may flip with the order of a sum (batching, kernels)
MEMORY_CAP_GIB = 16  # the laptop preset's card
PACKAGES = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "tokenizers"]
DIALOGUE = [{"role": "assistant", "content": "What kind of food do you like?"},
            {"role": "user", "content": "Spicy noodles, and I cook at home most nights."}]


def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def environment(args) -> dict:
    """Versions, the device, and the decisions local_models.py makes on it."""
    cuda = torch.cuda.is_available()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    with tempfile.TemporaryDirectory() as folder:  # a 7B config, no weights: how --load_in_4bit auto decides
        from transformers import MistralConfig
        MistralConfig(**MISTRAL_7B_INSTRUCT_V02).save_pretrained(folder)
        seven_b = {"params": count_params(folder), "4bit_auto": want_4bit("auto", folder)}
    dtype = resolve_dtype("auto")
    return {"python": sys.version.split()[0], "versions": versions, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "capability": list(torch.cuda.get_device_capability()) if cuda else None,
            "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if cuda else None,
            "dtype_auto": str(dtype), "dtype_auto_4bit": str(resolve_dtype("auto", quantized=True)),
            "mixed_precision": mixed_precision(dtype), "mistral_7b": seven_b,
            "embedded_4bit_auto": want_4bit("auto", embedded_model_dir(args.cache_dir))}


def check_prompts(n: int):
    """Prompts of every role's kind: the Questioner asking, the Questioner answering, the Roleplayer answering."""
    tasks = ["Plan a dinner for my family.", "Recommend a book for my trip.", "Help me choose a laptop.",
             "Suggest a weekend plan in my city."]
    bio = "My name is Ada. I teach maths, cook at home and hike on weekends."
    views = [lambda task: questioner_view("Ada", task, DIALOGUE), lambda task: answer_view("Ada", task, DIALOGUE),
             lambda task: roleplayer_view(bio, task, DIALOGUE[:1])]
    return [views[i % 3](tasks[i % 4]) for i in range(n)]


def embedded(args) -> dict:
    """The embedded model in NF4: our decoder against HF generate, scores against a plain forward, repeatability,
    an adapter switched off."""
    from decoding import generate_batch

    if args.tiny:  # the two-layer Mistral stand-in: the same loader and checks, in seconds on a CPU
        folder = Path(tempfile.mkdtemp())
        standin = build_standin(folder / "standin", embedded_model_dir(args.cache_dir))
        lm = LocalLM(f"hf:{standin}", folder / "cache", load_in_4bit="yes", batch_tokens=0)
    else:
        lm = LocalLM("embedded", args.cache_dir, load_in_4bit="yes", batch_tokens=0)
    new = 6 if args.tiny else 48
    prompts = check_prompts(3 if args.tiny else 8)
    encoded = [lm.prompt_ids(p, new)[0] for p in prompts]
    stop = {lm.tokenizer.eos_token_id, *lm.stop_ids}
    ours = generate_batch(lm.model, encoded, new, stop, lm.tokenizer.pad_token_id)
    rows = []
    for ids, mine in zip(encoded, ours):
        with torch.inference_mode():
            out = lm.model.generate(torch.tensor([ids], device=lm.device), max_new_tokens=new, do_sample=False,
                                    pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=list(stop))
        theirs = out[0, len(ids):].tolist()
        theirs = theirs[:next((k for k, t in enumerate(theirs) if t in stop), len(theirs))]
        row = {"equal": mine == theirs, "tokens": len(mine)}
        if mine != theirs:  # how close the two choices were where they first differ
            k = next((k for k, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            with torch.inference_mode():
                logits = lm.model(torch.tensor([ids + mine[:k]], device=lm.device)).logits[0, -1].float()
            top = logits.topk(2).values
            row.update(first_difference=k, logit_gap=float(top[0] - top[1]), near_tie=float(top[0] - top[1]) < NEAR_TIE)
        rows.append(row)

    responses = ["Try a lentil curry with rice.", "A short novel you can finish on the train.", "A light one."]
    responses = [responses[i % 3] for i in range(len(prompts))]
    scores = [s for s, _, _ in lm.score(prompts, responses)]
    plain = []
    for p, r in zip(prompts, responses):  # one forward over prompt + response, no batching, no shared prefix
        prompt_ids, response_ids = encode_chat(lm.tokenizer, p, r, lm.system_ok)
        with torch.inference_mode():
            logits = lm.model(torch.tensor([prompt_ids + response_ids], device=lm.device)).logits[0].float()
        logprobs = logits[len(prompt_ids) - 1:-1].log_softmax(-1)
        plain.append(float(logprobs.gather(1, torch.tensor(response_ids, device=lm.device)[:, None]).sum()))
    again = generate_batch(lm.model, encoded, new, stop, lm.tokenizer.pad_token_id)
    scores_again = [s for s, _, _ in lm.score(prompts, responses)]

    folder = Path(tempfile.mkdtemp())  # a LoRA adapter with random weights (B != 0: it changes the output)
    from peft import LoraConfig, get_peft_model
    probe = get_peft_model(lm.model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    probe.save_pretrained(folder)
    lm.model = probe.unload()  # the base, as it was
    lm.add_adapter("probe", folder)
    off = [s for s, _, _ in lm.score(prompts, responses)]
    on = [s for s, _, _ in lm.score(prompts, responses, adapter="probe")]
    return {"rows": rows, "greedy_equal_or_near_tie": all(r["equal"] or r["near_tie"] for r in rows),
            "score_vs_plain_forward_max_abs": max(abs(a - b) for a, b in zip(scores, plain)),
            "two_runs_bitwise_equal": again == ours and scores_again == scores,
            "adapter_off_is_the_base_exactly": off == scores, "adapter_on_differs": on != scores,
            # in bf16 on some CPUs (measured: an AMD EPYC, AVX512-BF16) the disabled adapter rounds differently
            "adapter_off_vs_base_max_abs": max(abs(a - b) for a, b in zip(off, scores))}


def cap_memory() -> float | None:
    """Hold this process to MEMORY_CAP_GIB of the GPU (the laptop preset's 16 GB card); the cap, or None."""
    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    torch.cuda.set_per_process_memory_fraction(min(1.0, MEMORY_CAP_GIB / total))
    return min(total, MEMORY_CAP_GIB)


def hf_generate_rate(lm: LocalLM, call: dict) -> float:
    """Tokens/s of HF generate on the call's batch (left-padded, greedy, to the cap): what our decoder replaces."""
    encoded = [lm.prompt_ids(p, call["new"])[0] for p in call["prompts"]]
    ids, mask = gpu_pad(encoded, lm.tokenizer.pad_token_id, lm.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=call["new"], do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    return (out.shape[0] * (out.shape[1] - ids.shape[1])) / (time.perf_counter() - start)


def gpu_pad(rows, pad_id, where):
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=where)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=where)
    return ids, mask


def trainer_updates(lm: LocalLM, call: dict, p, tiny: bool) -> dict:
    """Three updates through 04's Trainer with the preset's settings, on the call's training records."""
    from transformers import TrainingArguments

    model = gpu.training_model(lm, p, quantized=True)
    system_ok = template_accepts_system(lm.tokenizer)
    rows = [encode_for_training(lm.tokenizer, r, system_ok) for r in call["records"]]
    accumulate = 1 if tiny else 4  # the laptop preset's TRAIN_FLAGS: --batch_size 4 --grad_accum 4
    dataset = [{"input_ids": ids[:p.max_length], "labels": labels[:p.max_length]} for ids, labels in rows]
    dataset = (dataset * (3 * accumulate * p.train_batch_size))[:3 * accumulate * p.train_batch_size]
    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(
            output_dir=out, per_device_train_batch_size=p.train_batch_size, gradient_accumulation_steps=accumulate,
            learning_rate=2e-4, max_steps=3, gradient_checkpointing=False,  # training_model enabled it already
            use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no", report_to="none",
            remove_unused_columns=False, **mixed_precision(resolve_dtype("auto", quantized=True)))
        trainer = LabelledLossTrainer(model=model, args=arguments, train_dataset=dataset,
                                                 data_collator=PadCollator(lm.tokenizer.pad_token_id))
        gpu.reset(lm.device)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    allocated, reserved = gpu.peak_since_reset(lm.device)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"updates": trainer.state.global_step, "losses": losses, "seconds": seconds,
            "sequences": len(dataset), "peak_allocated_gib": allocated, "peak_reserved_gib": reserved}


def mistral(args) -> dict:
    """The Mistral-7B shape in NF4 under the memory cap: the heavy calls, HF generate, three Trainer updates."""
    cap = cap_memory()
    preset = dataclasses.replace(PRESETS["laptop"], **gpu.TINY) if args.tiny else PRESETS["laptop"]
    config = model_config(("mistral", {**MISTRAL_7B_INSTRUCT_V02, **(STANDIN_SIZES if args.tiny else {})}))
    tokenizer = standin_tokenizer(embedded_model_dir(args.cache_dir))
    tokenizer.pad_token = tokenizer.eos_token
    lm = LocalLM(f"random:{MISTRAL}", loaded=(gpu.random_4bit_model(config, device()), tokenizer))
    measured = gpu.MEASURED[:1] + ["05 gold log-probs"] if args.tiny else gpu.MEASURED[:-1]
    calls = gpu.bench_model(f"{MISTRAL}-shaped, random, NF4", lm, preset, True, config, device(), measured)
    heavy = {c["step"]: c for c in heavy_calls(preset, tokenizer)}
    first = heavy[gpu.MEASURED[0]]
    ours = next(c for c in calls if c["what"] == gpu.MEASURED[0])
    return {"memory_cap_gib": cap, "calls": calls, "table": gpu.table(calls),
            "generate_tokens_per_s": {"ours": ours.get("tokens_per_s"), "hf_generate": hf_generate_rate(lm, first)},
            "within_plan": all(c.get("peak_allocated_gib") is None or c["peak_allocated_gib"] <= c["planned_gib"]
                               for c in calls),
            "trainer": trainer_updates(lm, heavy["04 training step"], preset, args.tiny)}


def smoke_sizes() -> dict:
    """run_all.sh's smoke preset's sizes and caps, as overrides of the laptop preset (its MODEL_FLAGS kept)."""
    block = re.search(r"^\s*smoke\)(.*?);;", (ROOT / "run_all.sh").read_text(), re.S | re.M).group(1)
    values = dict(re.findall(r'"\$\{([A-Z_]+)=([^}]*)\}"', block))  # each preset value is a default: "${NAME=value}"
    names = ("ITERATIONS", "N_TASKS", "N_PERSONAS", "N", "TOP_K", "TEST_PAIRS", "SIM_FLAGS", "GEN_FLAGS",
             "SELECT_FLAGS", "EVAL_FLAGS")
    # The laptop preset's QLoRA path, without its batch 4 x 4 and warmup (one update at a learning rate of 0).
    return {**{n: values[n] for n in names},
            "TRAIN_FLAGS": "--learning_rate 1e-3 --epochs 2 --warmup_ratio 0 --batch_size 2 --grad_accum 1"}


def run_all(args) -> dict:
    """`bash run_all.sh laptop` at smoke sizes on the Mistral stand-in, every role local."""
    root = Path(tempfile.mkdtemp())
    standin = build_standin(root / "standin", embedded_model_dir(args.cache_dir))
    (root / "cache").mkdir()
    (root / "cache" / "SmolLM2-135M-Instruct").symlink_to(embedded_model_dir(args.cache_dir).resolve())
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ROLEPLAYER", "ORACLE", "JUDGE", "MODEL_FLAGS", "DTYPE")}
    env.update(smoke_sizes(), QUESTIONER=f"hf:{standin}", RUN_DIR=str(root / "run"), CACHE_DIR=str(root / "cache"))
    start = time.perf_counter()
    done = subprocess.run(["bash", "run_all.sh", "laptop"], cwd=ROOT, env=env, capture_output=True, text=True)
    report = root / "run" / "eval" / "report.md"
    return {"returncode": done.returncode, "seconds": time.perf_counter() - start, "report": report.is_file(),
            "tail": (done.stdout if done.returncode == 0 else done.stdout + done.stderr)[-2000:]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON file, rewritten after every stage")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: the CPU run of the tests")
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES, help="which stages, in this order")
    parser.add_argument("--cache_dir", default=str(ROOT / "cache"), help="where the embedded model is cached")
    args = parser.parse_args()
    if importlib.util.find_spec("bitsandbytes") is None:
        raise StepError("bench/gpu_check.py needs bitsandbytes (pip install -r requirements.txt)")
    if not args.tiny and not torch.cuda.is_available():
        raise StepError("no CUDA GPU here; on a CPU run the tiny check: --tiny")
    results = {"tiny": args.tiny, "stages": {}}
    for name in args.stages:
        print(f"gpu_check: {name} ...", flush=True)
        start = time.perf_counter()
        try:
            results["stages"][name] = {"ok": True, **globals()[name](args)}
        except Exception as error:  # a failed stage is a result too; the next stage still runs
            results["stages"][name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                                       "traceback": traceback.format_exc()[-3000:]}
        results["stages"][name]["stage_seconds"] = time.perf_counter() - start
        write_json_atomic(args.out, results)
        print(f"gpu_check: {name}: {'ok' if results['stages'][name]['ok'] else 'FAILED'} "
              f"({results['stages'][name]['stage_seconds']:.0f} s)", flush=True)
    print(f"gpu_check: wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
