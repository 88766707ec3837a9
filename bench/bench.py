"""Throughput of the three costs of STaR-GATE on the embedded model, against llama.cpp, a naive loop and
the machine's own limit, all measured in this one run on this machine.

    python bench/bench.py            # simulation, scoring, training (~5 minutes on 2 idle cores)
    python bench/bench.py --e2e      # also wall time and peak memory of `bash run_all.sh` (tiny preset)

1. Simulation: the same conversations (fixed pairs, seeds and token caps; Questioner T 0.9 / top_p 0.9,
   Roleplayer greedy) through (a) the project's local backend (batched, shared prompt prefixes prefilled
   once, finished rows dropped), the same without prefix reuse, and with a LoRA adapter on the Questioner
   (as from iteration 1 on and in the evaluation), (b) a naive loop that generates one
   conversation at a time with HF generate, (c) the project's openai: backend against a llama.cpp server on
   127.0.0.1 serving the same GGUF.
2. Scoring: summed log-prob of gold responses, batched vs one at a time.
3. Training: tokens/s of LoRA steps (forward + backward + AdamW), as 04_train.py trains.
4. The limit: the machine's real one, the matmul rate of its fastest dtype (fp32 and bf16 are measured, the
   faster taken: on a CPU with AMX bf16 is several times faster), divided by FLOPs per token: 2 x parameters
   for inference; 4 x for LoRA training (forward, then the gradients of the activations: frozen weights need
   none of their own; the training row does not recompute activations). The vocabulary head is counted at
   every position though it runs only where logits are needed, so the fractions are if anything low. Every
   row runs in --dtype (auto: bf16 where the CPU has native bf16 matmuls, as the steps do).
Each row reports two rates. Useful tokens: what the method needs out of it (simulation: the tokens of the
dialogues returned; scoring: the gold tokens scored; training: the labelled tokens). Processed tokens: what a
model must read or write for it, prompt + generated, a prefix shared by several prompts of one call counted
once (simulation: per generate call; scoring: the prompts + golds; training: every token, no sharing). The
fraction of the limit is of processed tokens: the share of the machine's matmul rate the row turns into work.
Timings are wall clock: other processes on the machine slow them (the load average is printed).
"""

import argparse
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

from chat_format import encode_chat, encode_for_training  # noqa: E402
from local_models import LocalChat, LocalLM  # noqa: E402
from models import ModelPool  # noqa: E402
from roles import answer_view  # noqa: E402
from stargate import simulate  # noqa: E402  (the dialogue loop of the steps)
from training import labelled_loss  # noqa: E402



def matmul_gflops(dtype, n=2048, repeats=8):
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


def count_tokens(tokenizer, texts):
    return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)


def shared_length(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def distinct_prefix_tokens(sequences) -> int:
    """Tokens of the sequences with every prefix they share counted once (the nodes of their trie)."""
    ordered = sorted(map(list, sequences))
    return sum(len(s) - shared_length(s, before) for before, s in zip([[]] + ordered, ordered))


class Recorded:
    """A role's chat model that keeps each call's prompts and outputs, to count processed tokens afterwards
    (outside the timed part)."""

    def __init__(self, chat):
        self.chat, self.name, self.calls = chat, chat.name, []

    def generate(self, prompts, **settings):
        outputs = self.chat.generate(prompts, **settings)
        self.calls.append((prompts, outputs))
        return outputs

    def processed(self, lm) -> int:
        """Per call: its prompts, shared prefixes counted once, and the tokens it generated."""
        return sum(distinct_prefix_tokens(encode_chat(lm.tokenizer, p, system_ok=lm.system_ok)[0] for p in prompts)
                   + count_tokens(lm.tokenizer, outputs) for prompts, outputs in self.calls)


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
            sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature
                        else {"do_sample": False})
            new = self.lm.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                         pad_token_id=self.lm.tokenizer.pad_token_id, **sampling)[0, len(ids):]
            out.append(self.lm.tokenizer.decode(new, skip_special_tokens=True).strip())
        return out


def time_simulation(label, questioner, roleplayer, batch, lm, gen, limit):
    """A row: the simulation of `batch` with these two chat models, timed."""
    questioner, roleplayer = Recorded(questioner), Recorded(roleplayer)
    start = time.perf_counter()
    dialogues, _ = simulate(questioner, roleplayer, batch, gen, seed=0)
    seconds = time.perf_counter() - start
    useful = count_tokens(lm.tokenizer, [m["content"] for d in dialogues for m in d])
    processed = questioner.processed(lm) + roleplayer.processed(lm)
    return label, useful / seconds, processed / seconds, limit, f"{60 * len(dialogues) / seconds:.1f} conv/min"


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

    rates = {name: matmul_gflops(dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    fastest = max(rates, key=rates.get)
    pool = ModelPool(args.cache_dir, "no", dtype=args.dtype)
    lm = pool.local("embedded")
    params = sum(p.numel() for p in lm.model.parameters())
    infer_limit, train_limit = (rates[fastest] * 1e9 / (flops * params) for flops in (2, 4))
    print(f"limit: the fastest matmul here, {fastest}, {rates[fastest]:.0f} GFLOP/s (fp32 {rates['fp32']:.0f}, bf16 "
          f"{rates['bf16']:.0f}); {params / 1e6:.1f}M parameters -> {infer_limit:.0f} tok/s inference, "
          f"{train_limit:.0f} tok/s training (the fractions below); this run computes in {lm.model.dtype}")
    rows = []

    # 1. Simulation.
    gen = {"questioner": dict(max_new_tokens=48, temperature=0.9, top_p=0.9, batch_size=64),
           "roleplayer": dict(max_new_tokens=64, temperature=0.0, top_p=1.0, batch_size=64)}
    batch = items(args.pairs, args.n_conversations)
    local = pool.chat("embedded")
    rows.append(time_simulation("simulation, ours (prefixes reused)", local, local, batch, lm, gen, infer_limit))
    min_shared, lm.min_shared = lm.min_shared, 0  # every prompt prefilled whole: what prefix reuse gains
    rows.append(time_simulation("simulation, ours, no prefix reuse", local, local, batch, lm, gen, infer_limit))
    lm.min_shared = min_shared
    # The Questioner of iteration t >= 1 and of the evaluation: the same model with a LoRA adapter on (r 8, all
    # linear layers; a fresh one, so the text is the base model's and only the adapter's cost differs: for a
    # model this small, LocalLM generates from a copy with the adapter merged, so that cost is making the copy).
    from peft import LoraConfig, get_peft_model

    with tempfile.TemporaryDirectory() as tmp:
        adapted = LocalLM("embedded", args.cache_dir, dtype=args.dtype)
        lora = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        get_peft_model(LocalLM("embedded", args.cache_dir, dtype=args.dtype).model, lora).save_pretrained(tmp)
        adapted.add_adapter("m1", tmp)
        rows.append(time_simulation("simulation, ours, Questioner + adapter", LocalChat(adapted, "m1"),
                                    LocalChat(adapted, None), batch, lm, gen, infer_limit))
        del adapted
    naive = NaiveChat(lm)
    rows.append(time_simulation("simulation, naive (one at a time)", naive, naive,
                                items(args.naive_pairs, args.n_conversations), lm, gen, infer_limit))
    try:
        from llama_server import gguf_path, llama_server

        with (tempfile.TemporaryDirectory() as tmp,
              llama_server(gguf_path(), Path(tmp) / "log", n_threads=os.cpu_count()) as url):
            os.environ.setdefault("OPENAI_API_KEY", "none")  # the local server checks no key
            remote = pool.chat(f"openai:smollm@{url}")
            rows.append(time_simulation("simulation, openai: -> llama.cpp", remote, remote, batch, lm, gen,
                                        infer_limit))
    except (ImportError, RuntimeError) as error:
        print(f"llama.cpp server unavailable ({str(error)[:200]}); skipping (c)")

    # 2. Scoring: a gold-length response after a one-turn conversation.
    contexts = [answer_view(b["name"], b["task"], [{"role": "assistant", "content": "What do you enjoy?"},
                                                   {"role": "user", "content": b["bio"][:200]}]) for b in batch[:32]]
    golds = [b["bio"] for b in batch[:32]]
    encoded = [encode_chat(lm.tokenizer, c, g, lm.system_ok) for c, g in zip(contexts, golds)]
    useful, processed = sum(len(r) for _, r in encoded), distinct_prefix_tokens(p + r for p, r in encoded)
    for label, size, min_shared in (("scoring, batched (16)", 16, lm.min_shared),
                                    ("scoring, batched, no prefix reuse", 16, 0), ("scoring, one at a time", 1, 0)):
        min_shared, lm.min_shared = lm.min_shared, min_shared
        start = time.perf_counter()
        lm.score(contexts, golds, batch_size=size)
        seconds = time.perf_counter() - start
        rows.append((label, useful / seconds, processed / seconds, infer_limit, "useful: gold tokens scored"))
        lm.min_shared = min_shared

    # 3. Training: LoRA (r 8, all linear layers) as 04_train.py's presets train: batch 1, 4 sequences per
    # AdamW update, 04's loss (logits only where a labelled token is predicted), no LoRA dropout.
    train_lm = LocalLM("embedded", args.cache_dir, dtype=args.dtype)
    model = get_peft_model(train_lm.model,
                           LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    records = [encode_for_training(lm.tokenizer, c + [{"role": "assistant", "content": g[:300], "train": True}],
                                   lm.system_ok)
               for c, g in zip(contexts[:12], golds[:12])]
    seen = trained = 0
    for step, (ids, labels) in enumerate(records):
        if step == 4:  # the first update warms up
            seen, trained, start = 0, 0, time.perf_counter()
        loss, _ = labelled_loss(model, {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                                        "attention_mask": torch.ones(1, len(ids), dtype=torch.long)})
        (loss / 4).backward()
        if step % 4 == 3:
            optimizer.step()
            optimizer.zero_grad()
        seen += len(ids)
        trained += sum(label != -100 for label in labels)
    seconds = time.perf_counter() - start
    rows.append(("training, LoRA step", trained / seconds, seen / seconds, train_limit,
                 "useful: labelled tokens (batch 1 x 4)"))

    print(f"\n{'what':38} {'useful tok/s':>12} {'processed tok/s':>15} {'of limit':>9}  note")
    for label, useful_rate, processed_rate, limit, note in rows:
        print(f"{label:38} {useful_rate:12.1f} {processed_rate:15.1f} {processed_rate / limit:8.1%}  {note}")

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
            done = subprocess.run([sys.executable, "-c", parent], cwd=ROOT, env=env, check=True, capture_output=True,
                                  text=True)
            wall = time.perf_counter() - start
            print("\nend to end, per step:")
            for line in done.stdout.splitlines():
                if re.match(r"\S+: \d+ s, peak memory", line):
                    print("  " + line)
            peak = int(done.stdout.split("children peak")[-1]) / (1024 if sys.platform == "darwin" else 1) / 1024 ** 2
            print(f"end to end: bash run_all.sh (tiny) {wall / 60:.1f} min, "
                  f"peak resident memory of a step {peak:.2f} GB")

    useful = {label: rate for label, rate, _, _, _ in rows}
    ours = useful["simulation, ours (prefixes reused)"]
    llama = useful.get("simulation, openai: -> llama.cpp")
    print(f"\nours / llama.cpp (simulation, useful tokens): {ours / llama:.2f}x" if llama else "\nours / llama.cpp: -")
    print(f"ours / naive (simulation, useful tokens):     {ours / useful['simulation, naive (one at a time)']:.2f}x")
    print(f"prefix reuse (simulation, useful tokens):     {ours / useful['simulation, ours, no prefix reuse']:.2f}x")
    for label in ("simulation, ours (prefixes reused)", "scoring, batched (16)"):
        _, _, processed_rate, limit, _ = next(row for row in rows if row[0] == label)
        print(f"{label}: processed tokens at {processed_rate / limit:.1%} of the {fastest} limit")


if __name__ == "__main__":
    main()
