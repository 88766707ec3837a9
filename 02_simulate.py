"""Step 2: simulate conversations between the Questioner Q_t and the Roleplayer (Sec. 3, step 1).

Reads   <run_dir>/data/{tasks,personas,gold}.jsonl and, for t > 0, the adapter of Q_t written by
        04_train.py at iteration t-1 (<run_dir>/iter{t-1}/adapter).
Writes  <run_dir>/iter{t}/conversations.jsonl: N conversations for every pair of the iteration's split.

Iterations alternate between the training splits A, B, A, ... (Sec. 4.2). For each pair the number of
turns (one question + one answer) is drawn uniformly from 1..3 and shared by the pair's N
conversations; the Questioner samples (T 0.9, top_p 0.9), the Roleplayer answers greedily.
Conversations are appended chunk by chunk as they finish; rerunning resumes where a crash stopped.

    python 02_simulate.py --run_dir runs/tiny --iteration 0 --n_conversations 3
"""

import random
from dataclasses import dataclass, field
from pathlib import Path

from models import ModelPool
from roles import simulate
from utils import (StepError, load_pairs, parse_args, questioner_adapter, record_args, resumable, run_main,
                   seed_everything, split_of_iteration, stable_hash)


@dataclass
class Args:
    run_dir: str = field(default="runs/tiny", metadata={"help": "folder of this run (made by 01_generate.py)"})
    iteration: int = field(default=0, metadata={"help": "t: simulate with Q_t (the base model at t = 0)"})
    questioner: str = field(default="embedded", metadata={"help": "Q_BASE model spec (paper: Mistral-7B-Instruct)"})
    roleplayer: str = field(default="embedded", metadata={"help": "Roleplayer spec (paper: Mixtral-8x7B-Instruct)"})
    n_conversations: int = field(default=10, metadata={"help": "N conversations per pair (paper: 10)"})
    min_turns: int = field(default=1, metadata={"help": "fewest question-answer turns (paper: 1)"})
    max_turns: int = field(default=3, metadata={"help": "most question-answer turns (paper: 3)"})
    temperature: float = field(default=0.9, metadata={"help": "Questioner sampling temperature (paper: 0.9)"})
    top_p: float = field(default=0.9, metadata={"help": "Questioner nucleus sampling (paper: 0.9)"})
    question_max_tokens: int = field(default=64, metadata={"help": "token cap of a question"})
    answer_max_tokens: int = field(default=96, metadata={"help": "token cap of a Roleplayer answer (<= 3 sentences)"})
    seed: int = field(default=0, metadata={"help": "seeds turn counts and sampling"})
    chunk_pairs: int = field(default=16, metadata={"help": "pairs simulated together (and saved together)"})
    batch_size: int = field(default=32, metadata={"help": "conversations per generation batch"})
    cache_dir: str = field(default="cache", metadata={"help": "where the embedded model is cached"})
    load_in_4bit: str = field(default="auto", metadata={
        "help": "4-bit NF4 local models: auto (when CUDA is present), yes, no", "choices": ["auto", "yes", "no"]})
    dtype: str = field(default="auto", metadata={
        "help": "weights of unquantized local models: auto (bfloat16 on a GPU or a CPU with native bf16 matmuls, "
                "else float32), bfloat16, float32", "choices": ["auto", "bfloat16", "float32"]})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom model code from the hub"})


def generation_settings(args) -> dict:
    return {"questioner": dict(max_new_tokens=args.question_max_tokens, temperature=args.temperature,
                               top_p=args.top_p, batch_size=args.batch_size),
            "roleplayer": dict(max_new_tokens=args.answer_max_tokens, temperature=0.0, top_p=1.0,
                               batch_size=args.batch_size)}


def simulate_pairs(questioner, roleplayer, pairs, args, iteration, final: Path, tag: str) -> list[dict]:
    """N conversations for each pair (each pair carries its n_turns), saved chunk by chunk.

    A chunk's sampling seed depends only on (seed, tag, chunk index), so a resumed run regenerates a
    half-saved chunk exactly, and models evaluated with the same tag face the same random draws.
    """
    gen = generation_settings(args)
    items = [p for p in pairs for _ in range(args.n_conversations)]
    keys = [(p["task_id"], p["persona_id"], n) for p in pairs for n in range(args.n_conversations)]

    def make_records(index, chunk, chunk_keys):
        dialogues, cut = simulate(questioner, roleplayer, chunk, gen, seed=stable_hash(args.seed, tag, index))
        return [{"task_id": k[0], "persona_id": k[1], "conv_id": k[2], "iteration": iteration,
                 "n_turns": item["n_turns"], "questioner": questioner.name, "roleplayer": roleplayer.name,
                 "messages": d, "sampling": gen, "truncated": c}
                for k, item, d, c in zip(chunk_keys, chunk, dialogues, cut)]

    return resumable(final, "conversation", items, keys, args.chunk_pairs * args.n_conversations,
                     f"simulate {tag}", make_records)


def main():
    args = parse_args(Args)
    seed_everything(args.seed)
    out = Path(args.run_dir) / f"iter{args.iteration}"
    final = out / "conversations.jsonl"
    if final.exists():
        print(f"02_simulate: {final} exists; nothing to do")
        return
    if not 1 <= args.min_turns <= args.max_turns:
        raise StepError("--min_turns and --max_turns need 1 <= min_turns <= max_turns")

    # The iteration's pairs; each gets its number of turns, drawn uniformly and shared by its N
    # conversations (App. A: "we randomly sample the number of turns for each task-persona pair").
    split = split_of_iteration(args.iteration)
    pairs = load_pairs(args.run_dir, split)
    for p in pairs:
        rng = random.Random(stable_hash(args.seed, args.iteration, p["task_id"], p["persona_id"]))
        p["n_turns"] = rng.randint(args.min_turns, args.max_turns)

    # Q_t asks (base + adapter of iteration t-1); the Roleplayer is the fixed base model. When both name
    # the same model they share one loaded copy, the adapter switched off for the Roleplayer.
    pool = ModelPool(args.cache_dir, args.load_in_4bit, args.trust_remote_code, args.dtype)
    questioner = pool.chat(args.questioner, adapter=questioner_adapter(args.run_dir, args.iteration))
    roleplayer = pool.chat(args.roleplayer)
    conversations = simulate_pairs(questioner, roleplayer, pairs, args, args.iteration, final,
                                   tag=f"iter{args.iteration}")
    record_args(out / "args_02_simulate.json", args)
    turns = sum(p["n_turns"] for p in pairs) / len(pairs)
    cut = sum(c.get("truncated", False) for c in conversations)
    print(f"02_simulate: wrote {len(conversations)} conversations ({len(pairs)} pairs of split {split} x "
          f"{args.n_conversations}, {turns:.2f} turns on average; {cut} with a prompt cut to fit the context) "
          f"to {final}")


if __name__ == "__main__":
    run_main(main)
