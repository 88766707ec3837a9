"""Step 2: simulate conversations between the Questioner Q_t and the Roleplayer (Sec. 3, step 1).

Reads   <run_dir>/data/{tasks,personas,gold}.jsonl and, for t > 0, the adapter of Q_t written by
        04_train.py at iteration t-1 (<run_dir>/iter{t-1}/adapter).
Writes  <run_dir>/iter{t}/conversations.jsonl: N conversations for every pair of the iteration's split.

Iterations alternate between the training splits A, B, A, ... (Sec. 4.2). For each pair the number of
turns (one question + one answer) is drawn uniformly from --min_turns .. --max_turns (paper: 1..3) and shared
by the pair's N conversations; the Questioner samples (T 0.9, top_p 0.9), the Roleplayer answers greedily.
The dialogue loop is `stargate.simulate` (what each role is told and sees is in roles.py); 05_eval.py runs the
test conversations through it too, with the same SimulationSettings.
Conversations are appended chunk by chunk as they finish; rerunning resumes where a crash stopped.

    python 02_simulate.py --run_dir runs/tiny --iteration 0 --n_conversations 3
"""

import random
from dataclasses import dataclass, field
from pathlib import Path

from models import ModelSettings
from specs import check_specs
from stargate import SimulationSettings, questioner_adapter, simulate_pairs, split_of_iteration
from utils import check_rerun, load_pairs, parse_args, record_args, run_main, seed_everything, stable_hash

PROMPTED = ("questioner", "roleplayer")  # roles.py's prompts this step's outputs depend on


@dataclass
class Args:
    run_dir: str = field(default="runs/tiny", metadata={"help": "folder of this run (made by 01_generate.py)"})
    iteration: int = field(default=0, metadata={"help": "t: simulate with Q_t (the base model at t = 0)"})
    questioner: str = field(default="embedded", metadata={
        "help": "Q_BASE model spec (paper: Mistral-7B-Instruct); openai:<base model>@<url>: Q_t asks on that server "
                "as the base with its adapter (docs/CLUSTER.md)"})
    roleplayer: str = field(default="embedded", metadata={"help": "Roleplayer spec (paper: Mixtral-8x7B-Instruct)"})
    n_conversations: int = field(default=10, metadata={"help": "N conversations per pair (paper: 10)"})
    seed: int = field(default=0, metadata={"help": "seeds turn counts and sampling"})
    chunk_pairs: int = field(default=16, metadata={"help": "pairs simulated together (and saved together)"})
    batch_size: int = field(default=32, metadata={"help": "conversations per generation batch"})
    overwrite: bool = field(default=False, metadata={
        "help": "redo the iteration's conversations even if they exist (a rerun with other settings stops otherwise)"})


def main():
    args, sim_args, model_args = parse_args(Args, SimulationSettings, ModelSettings)
    seed_everything(args.seed)
    out = Path(args.run_dir) / f"iter{args.iteration}"
    final = out / "conversations.jsonl"
    check_specs(questioner=args.questioner, roleplayer=args.roleplayer)
    check_rerun(out / "args_02_simulate.json", [final, out / "conversations.partial.jsonl"], args.overwrite,
                args, sim_args, model_args, prompts=PROMPTED)
    if final.exists():
        print(f"02_simulate: {final} exists; nothing to do")
        return

    # The iteration's pairs; each gets its number of turns, drawn uniformly and shared by its N
    # conversations (App. A: "we randomly sample the number of turns for each task-persona pair").
    split = split_of_iteration(args.iteration)
    pairs = load_pairs(args.run_dir, split, usable_only=True)  # no usable gold answer, no reward: left out
    for p in pairs:
        rng = random.Random(stable_hash(args.seed, args.iteration, p["task_id"], p["persona_id"]))
        p["n_turns"] = rng.randint(sim_args.min_turns, sim_args.max_turns)

    # Q_t asks (base + adapter of iteration t-1); the Roleplayer is the fixed base model. When both name
    # the same model they share one loaded copy, the adapter switched off for the Roleplayer.
    pool = model_args.pool()
    questioner = pool.chat(args.questioner, adapter=questioner_adapter(args.run_dir, args.iteration), questioner=True)
    roleplayer = pool.chat(args.roleplayer)
    record_args(out / "args_02_simulate.json", args, sim_args, model_args, prompts=PROMPTED)
    conversations = simulate_pairs(questioner, roleplayer, pairs, sim_args, n_conversations=args.n_conversations,
                                   seed=args.seed, batch_size=args.batch_size, chunk_pairs=args.chunk_pairs,
                                   iteration=args.iteration, final=final, tag=f"iter{args.iteration}")
    turns = sum(p["n_turns"] for p in pairs) / len(pairs)
    cut = sum(c.get("truncated", False) for c in conversations)
    print(f"02_simulate: wrote {len(conversations)} conversations ({len(pairs)} pairs of split {split} x "
          f"{args.n_conversations}, {turns:.2f} turns on average; {cut} with a prompt cut to fit the context) "
          f"to {final}")


if __name__ == "__main__":
    run_main(main)
