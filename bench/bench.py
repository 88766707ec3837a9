"""Throughput of the three costs of STaR-GATE on the embedded model, against llama.cpp, a naive loop and
the machine's own limit, all measured in this one run on this machine.

    python bench/bench.py            # simulation, scoring, training (~5 minutes on 2 idle cores)
    python bench/bench.py --e2e      # also wall time and peak memory of `bash run_all.sh` (tiny preset)

1. Simulation: the same conversations (fixed pairs, seeds and token caps; Questioner T 0.9 / top_p 0.9,
   Roleplayer greedy) through (a) the project's local backend (batched, shared prompt prefixes prefilled
   once, finished rows dropped), the same without prefix reuse, and with a LoRA adapter on the Questioner
   (as from iteration 1 on and in the evaluation), (b) a naive loop that generates one
   conversation at a time with HF generate, (c) the project's openai: backend against a llama.cpp server on
   127.0.0.1 serving the same GGUF. Useful tokens = tokens returned.
2. Scoring: summed log-prob of gold responses, batched vs one at a time.
3. Training: tokens/s of LoRA steps (forward + backward + AdamW), as 04_train.py trains.
4. The limit: measured fp32 matmul GFLOP/s divided by FLOPs per token (2 x parameters for inference,
   6 x for training); each rate is printed as a fraction of it. Every row runs in --dtype (auto: bf16 on
   a CPU with native bf16 matmuls, as the steps do), whose own matmul rate is printed too.
Timings are wall clock: other processes on the machine slow them (the load average is printed).
"""

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from models import LocalChat, LocalLM, ModelPool, encode_chat, encode_for_training, resolve_dtype  # noqa: E402
from roles import answer_view  # noqa: E402

simulate = importlib.import_module("02_simulate").simulate  # the dialogue loop of the steps


def matmul_gflops(n=2048, repeats=8, dtype=torch.float32):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * n ** 3 / (time.perf_counter() - start) / 1e9


def items(n_pairs, n_conv):
    tasks = [json.loads(line)["text"] for line in open(ROOT / "data" / "tasks.jsonl")]
    personas = [json.loads(line) for line in open(ROOT / "data" / "personas.jsonl")]
    return [{"name": personas[i % len(personas)]["name"], "bio": personas[i % len(personas)]["bio"],
             "task": tasks[i], "n_turns": 1 + i % 2} for i in range(n_pairs) for _ in range(n_conv)]


def count_tokens(tokenizer, dialogues):
    return sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for d in dialogues for m in d)


class NaiveChat:
    """One prompt at a time through HF generate: what a straightforward implementation does."""

    name = "naive"

    def __init__(self, lm):
        self.lm = lm

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed, batch_size=1, desc=None):
        out = []
        for i, p in enumerate(prompts):
            ids, _ = encode_chat(self.lm.tokenizer, p, system_ok=self.lm.system_ok)
            torch.manual_seed(seed + i)
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature else {"do_sample": False}
            new = self.lm.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                         pad_token_id=self.lm.tokenizer.pad_token_id, **sampling)[0, len(ids):]
            out.append(self.lm.tokenizer.decode(new, skip_special_tokens=True).strip())
        return out


def time_simulation(questioner, roleplayer, batch, tokenizer, gen):
    start = time.perf_counter()
    dialogues, _ = simulate(questioner, roleplayer, batch, gen, seed=0)
    seconds = time.perf_counter() - start
    return count_tokens(tokenizer, dialogues), seconds, len(dialogues)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=16, help="pairs simulated (x --n_conversations)")
    parser.add_argument("--n_conversations", type=int, default=4)
    parser.add_argument("--naive_pairs", type=int, default=4, help="pairs for the (slow) naive loop")
    parser.add_argument("--cache_dir", default=str(ROOT / "cache"))
    parser.add_argument("--e2e", action="store_true", help="also time `bash run_all.sh` (tiny preset)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="weights of the local model, as the steps' --dtype (auto: bf16 where the CPU has it)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")

    dtype = resolve_dtype(args.dtype)
    gflops = matmul_gflops()
    pool = ModelPool(args.cache_dir, "no", dtype=args.dtype)
    lm = pool.local("embedded")
    params = sum(p.numel() for p in lm.model.parameters())
    infer_limit, train_limit = gflops * 1e9 / (2 * params), gflops * 1e9 / (6 * params)
    print(f"limit: fp32 matmul {gflops:.0f} GFLOP/s; {params / 1e6:.1f}M parameters -> "
          f"{infer_limit:.0f} tok/s inference, {train_limit:.0f} tok/s training (the fractions below)")
    if dtype != torch.float32:
        own = matmul_gflops(dtype=dtype)
        print(f"this run computes in {str(dtype)[6:]}, whose matmuls run at {own:.0f} GFLOP/s here: its own limit is "
              f"{own * 1e9 / (2 * params):.0f} tok/s inference, {own * 1e9 / (6 * params):.0f} tok/s training")
    rows = []

    # 1. Simulation.
    gen = {"questioner": dict(max_new_tokens=48, temperature=0.9, top_p=0.9, batch_size=64),
           "roleplayer": dict(max_new_tokens=64, temperature=0.0, top_p=1.0, batch_size=64)}
    batch = items(args.pairs, args.n_conversations)
    local = pool.chat("embedded")
    tokens, seconds, n = time_simulation(local, local, batch, lm.tokenizer, gen)
    ours = tokens / seconds
    rows.append(("simulation, ours (prefixes reused)", ours, infer_limit, f"{60 * n / seconds:.1f} conv/min"))
    min_shared, lm.min_shared = lm.min_shared, 0  # every prompt prefilled whole: what prefix reuse gains
    tokens, seconds, n = time_simulation(local, local, batch, lm.tokenizer, gen)
    lm.min_shared = min_shared
    unshared = tokens / seconds
    rows.append(("simulation, ours, no prefix reuse", unshared, infer_limit, f"{60 * n / seconds:.1f} conv/min"))
    # The Questioner of iteration t >= 1 and of the evaluation: the same model with a LoRA adapter on (r 8, all
    # linear layers; a fresh one, so the text is the base model's and only the adapter's cost differs: for a
    # model this small, LocalLM generates from a copy with the adapter merged, so that cost is making the copy).
    from peft import LoraConfig, get_peft_model

    with tempfile.TemporaryDirectory() as tmp:
        adapted = LocalLM("embedded", args.cache_dir, dtype=args.dtype)
        get_peft_model(LocalLM("embedded", args.cache_dir, dtype=args.dtype).model,
                       LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")).save_pretrained(tmp)
        adapted.add_adapter("m1", tmp)
        tokens, seconds, n = time_simulation(LocalChat(adapted, "m1"), LocalChat(adapted, None), batch,
                                             lm.tokenizer, gen)
        del adapted
    rows.append(("simulation, ours, Questioner + adapter", tokens / seconds, infer_limit,
                 f"{60 * n / seconds:.1f} conv/min"))
    naive_batch = items(args.naive_pairs, args.n_conversations)
    naive = NaiveChat(lm)
    tokens, seconds, n = time_simulation(naive, naive, naive_batch, lm.tokenizer, gen)
    naive_rate = tokens / seconds
    rows.append(("simulation, naive (one at a time)", naive_rate, infer_limit, f"{60 * n / seconds:.1f} conv/min"))
    llama_rate = None
    try:
        from llama_server import gguf_path, llama_server

        with tempfile.TemporaryDirectory() as tmp, llama_server(gguf_path(), Path(tmp) / "log", n_threads=os.cpu_count()) as url:
            os.environ.setdefault("OPENAI_API_KEY", "none")  # the local server checks no key
            remote = pool.chat(f"openai:smollm@{url}")
            tokens, seconds, n = time_simulation(remote, remote, batch, lm.tokenizer, gen)
            llama_rate = tokens / seconds
            rows.append(("simulation, openai: -> llama.cpp", llama_rate, infer_limit, f"{60 * n / seconds:.1f} conv/min"))
    except (ImportError, RuntimeError) as error:
        print(f"llama.cpp server unavailable ({str(error)[:200]}); skipping (c)")

    # 2. Scoring: a gold-length response after a one-turn conversation.
    contexts = [answer_view(b["name"], b["task"], [{"role": "assistant", "content": "What do you enjoy?"},
                                                   {"role": "user", "content": b["bio"][:200]}]) for b in batch[:32]]
    golds = [b["bio"] for b in batch[:32]]
    n_tokens = sum(len(p) + len(r) for p, r in (encode_chat(lm.tokenizer, c, g, lm.system_ok)
                                                for c, g in zip(contexts, golds)))
    for label, size, min_shared in (("scoring, batched (16)", 16, lm.min_shared),
                                    ("scoring, batched, no prefix reuse", 16, 0), ("scoring, one at a time", 1, 0)):
        min_shared, lm.min_shared = lm.min_shared, min_shared
        start = time.perf_counter()
        lm.score(contexts, golds, batch_size=size)
        rows.append((label, n_tokens / (time.perf_counter() - start), infer_limit, "prompt + gold tokens"))
        lm.min_shared = min_shared

    # 3. Training: LoRA (r 8, all linear layers) as 04_train.py's presets train: batch 1, 4 sequences per
    # AdamW update, 04's loss (logits only where a labelled token is predicted), no LoRA dropout.
    labelled_loss = importlib.import_module("04_train").labelled_loss
    train_lm = LocalLM("embedded", args.cache_dir, dtype=args.dtype)
    model = get_peft_model(train_lm.model, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    records = [encode_for_training(lm.tokenizer, c + [{"role": "assistant", "content": g[:300], "train": True}], lm.system_ok)
               for c, g in zip(contexts[:12], golds[:12])]
    seen, start = 0, None
    for step, (ids, labels) in enumerate(records):
        if step == 4:  # the first update warms up
            seen, start = 0, time.perf_counter()
        loss, _ = labelled_loss(model, {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                                        "attention_mask": torch.ones(1, len(ids), dtype=torch.long)})
        (loss / 4).backward()
        if step % 4 == 3:
            optimizer.step()
            optimizer.zero_grad()
        seen += len(ids)
    rows.append(("training, LoRA step", seen / (time.perf_counter() - start), train_limit, "tokens (batch 1 x 4)"))

    print(f"\n{'what':38} {'tok/s':>8} {'of limit':>9}  note")
    for label, rate, limit, note in rows:
        print(f"{label:38} {rate:8.1f} {rate / limit:8.1%}  {note}")

    if args.e2e:
        # A fresh run folder and call caches (only the converted model is shared). run_all.sh runs under
        # its own Python parent, so that the peak counts its steps alone (not the llama.cpp server above).
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, RUN_DIR=f"{tmp}/run", CACHE_DIR=f"{tmp}/cache")
            os.makedirs(f"{tmp}/cache")
            os.symlink(Path(args.cache_dir).resolve() / "SmolLM2-135M-Instruct", f"{tmp}/cache/SmolLM2-135M-Instruct")
            parent = ("import resource, subprocess; subprocess.run(['bash', 'run_all.sh', 'tiny'], check=True); "
                      "print('children peak', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", parent], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
            wall = time.perf_counter() - start
            print("\nend to end, per step:")
            for line in done.stdout.splitlines():
                if re.match(r"\S+: \d+ s, peak memory", line):
                    print("  " + line)
            peak = int(done.stdout.split("children peak")[-1]) / (1024 if sys.platform == "darwin" else 1) / 1024 ** 2
            print(f"end to end: bash run_all.sh (tiny) {wall / 60:.1f} min, peak resident memory of a step {peak:.2f} GB")

    print(f"\nours / llama.cpp (simulation): {ours / llama_rate:.2f}x" if llama_rate else "\nours / llama.cpp: -")
    print(f"ours / naive (simulation):     {ours / naive_rate:.2f}x")
    print(f"prefix reuse (simulation):     {ours / unshared:.2f}x")
    print(f"ours / limit (simulation):     {ours / infer_limit:.1%}")
    scoring = next(rate for label, rate, _, _ in rows if label.startswith("scoring, batched"))
    print(f"ours / limit (scoring):        {scoring / infer_limit:.1%}")


if __name__ == "__main__":
    main()
