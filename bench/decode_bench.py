"""Useful-token throughput of batched generation on CPU: HF generate vs decoding.generate_batch.

"Useful" tokens are those a caller gets back: generated ids up to, and excluding, the first eos.
HF generate keeps decoding rows that already finished (as padding) until the whole batch is done;
generate_batch drops them from the batch (and the KV cache) as soon as they finish. It also prefills a
prompt prefix shared by several rows once (here the short system prompt that all prompts start with;
in the simulation the Questioner's instructions and worked example, a pair's persona and task): the
last row runs the largest batch again with that turned off (--min_shared 0).

Run from the repository root:  python bench/decode_bench.py  (about 4-5 minutes on 2 idle cores).
First a quick correctness check (greedy, 4 prompts): generate_batch must equal HF generate(do_sample=False)
for each prompt alone, and for the 4 prompts batched with left padding. Then the timings, all on the same
prompts, sorted longest first (as LocalLM.generate does), sampling at T 0.9, top_p 0.9, one seed per batch.
HF one-prompt-at-a-time runs on the first --single_n prompts only (it is slow); a rate is a rate.
Timings are wall-clock: other processes on the machine inflate them (the load average is printed), and
badly so with 2 torch threads on 2 busy cores (up to 20x slower than 1 thread): use --threads 1 on a shared
machine. CPU s is the process's CPU time (with 1 thread, a measure less sensitive to other load).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chat_format import encode_chat  # noqa: E402
from decoding import generate_batch  # noqa: E402
from local_models import LocalLM  # noqa: E402


def build_prompts(lm, n):
    """n chat prompts of varied length: a question request for one task, with 0-3 earlier tasks as context."""
    tasks = [json.loads(line)["text"] for line in open(ROOT / "data" / "tasks.jsonl")]
    prompts = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        earlier = [tasks[(i * 7 + k + 1) % len(tasks)] for k in range(i % 4)]
        user = f"Ask me one question about my preferences for: {task}"
        if earlier:
            user = "Earlier I also asked about: " + " ".join(earlier) + "\n\n" + user
        messages = [{"role": "system", "content": "You are a helpful assistant who asks short questions."},
                    {"role": "user", "content": user}]
        prompts.append(encode_chat(lm.tokenizer, messages, system_ok=lm.system_ok)[0])
    return prompts


def cut_at_eos(row, eos):
    return row[:row.index(eos)] if eos in row else row


def hf_generate(model, rows, max_new_tokens, pad, eos, sampling):
    """HF generate on one left-padded batch; returns useful ids per row and the row-steps decoded."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                         **sampling)
    new = out[:, width:]
    return [cut_at_eos(r, eos) for r in new.tolist()], new.numel()


def run_hf(model, prompts, batch_size, args, pad, eos):
    outputs, row_steps = [], 0
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        torch.manual_seed(args.seed + b)
        outs, steps = hf_generate(model, prompts[start:start + batch_size], args.max_new_tokens, pad, eos,
                                  dict(do_sample=True, temperature=args.temperature, top_p=args.top_p))
        outputs += outs
        row_steps += steps
    return outputs, row_steps


def run_ours(model, prompts, batch_size, args, pad, eos, min_shared):
    outputs = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        generator = torch.Generator().manual_seed(args.seed + b)
        outputs += generate_batch(model, prompts[start:start + batch_size], args.max_new_tokens, eos, pad,
                                  args.temperature, args.top_p, generator, min_shared)
    # each row costs its useful tokens plus the step that produced eos (if it stopped early)
    row_steps = sum(len(o) + (len(o) < args.max_new_tokens) for o in outputs)
    return outputs, row_steps


def check_greedy(model, prompts, pad, eos, max_new_tokens=24):
    """generate_batch == HF greedy, per prompt alone and for the 4 prompts batched (left padded)."""
    greedy = dict(do_sample=False)
    for p in prompts:
        ref = hf_generate(model, [p], max_new_tokens, pad, eos, greedy)[0][0]
        ours = generate_batch(model, [p], max_new_tokens, eos, pad)[0]
        assert ours == ref, f"alone, prompt of {len(p)} tokens: ours {ours} != HF {ref}"
    ref = hf_generate(model, prompts, max_new_tokens, pad, eos, greedy)[0]
    ours = generate_batch(model, prompts, max_new_tokens, eos, pad)
    assert ours == ref, f"batched: ours {ours} != HF {ref}"
    print(f"greedy check passed: {len(prompts)} prompts of {[len(p) for p in prompts]} tokens, "
          f"{max_new_tokens} new tokens max, alone and batched")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_prompts", type=int, default=64)
    parser.add_argument("--single_n", type=int, default=4, help="prompts for HF one-at-a-time")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--hf_batches", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--our_batches", type=int, nargs="*", default=[8, 32, 64])
    parser.add_argument("--min_shared", type=int, default=8, help="generate_batch: shortest prefix prefilled once")
    parser.add_argument("--skip_check", action="store_true")
    parser.add_argument("--cache_dir", default=str(ROOT / "cache"))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = LocalLM("embedded", cache_dir=args.cache_dir)
    model, pad, eos = lm.model, lm.tokenizer.pad_token_id, lm.tokenizer.eos_token_id
    prompts = build_prompts(lm, args.n_prompts)
    prompts.sort(key=len, reverse=True)  # the caller's job; LocalLM.generate does the same
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"{len(prompts)} prompts of {len(prompts[-1])}-{len(prompts[0])} tokens, max_new_tokens "
          f"{args.max_new_tokens}, T {args.temperature}, top_p {args.top_p}, seed {args.seed}")

    with torch.inference_mode():
        model(input_ids=torch.tensor([prompts[0]]))  # warm up
    if not args.skip_check:
        spread = [prompts[i] for i in (0, len(prompts) // 3, 2 * len(prompts) // 3, len(prompts) - 1)]
        check_greedy(model, spread, pad, eos)

    single = sorted(prompts[::max(1, len(prompts) // args.single_n)][:args.single_n], key=len, reverse=True)
    runs = [("HF generate, one at a time", lambda: run_hf(model, single, 1, args, pad, eos), len(single))]
    runs += [(f"HF generate, batch {b}", (lambda b=b: run_hf(model, prompts, b, args, pad, eos)), len(prompts))
             for b in args.hf_batches]
    runs += [(f"generate_batch, batch {b}", (lambda b=b: run_ours(model, prompts, b, args, pad, eos, args.min_shared)),
              len(prompts)) for b in args.our_batches]
    b = max(args.our_batches)
    runs += [(f"generate_batch, batch {b}, no prefix reuse", lambda: run_ours(model, prompts, b, args, pad, eos, 0),
              len(prompts))]

    rows = []
    for name, fn, n in runs:
        start, cpu = time.perf_counter(), time.process_time()
        outputs, row_steps = fn()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        useful = sum(map(len, outputs))
        rows.append((name, n, useful, row_steps, seconds, cpu))
        print(f"  {name}: {useful} useful tokens in {seconds:.1f} s = {useful / seconds:.1f} tok/s "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)

    print("\n| method | prompts | useful tokens | row-steps decoded | wall s | useful tok/s | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for name, n, useful, row_steps, seconds, cpu in rows:
        print(f"| {name} | {n} | {useful} | {row_steps} | {seconds:.1f} | {useful / seconds:.1f} | {cpu:.1f} |")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
