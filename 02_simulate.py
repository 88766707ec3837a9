"""Step 2: simulate conversations between the Questioner Q_t and the Roleplayer (Sec. 3, step 1).

Reads   <run_dir>/data/{tasks,personas,gold}.jsonl and, for t > 0, the adapter of Q_t written by
        04_train.py at iteration t-1 (<run_dir>/iter{t-1}/adapter).
Writes  <run_dir>/iter{t}/conversations.jsonl: N conversations for every pair of the iteration's split.

Iterations alternate between the training splits A, B, A, ... (Sec. 4.2). For each pair the number of
turns (one question + one answer) is drawn uniformly from --min_turns .. --max_turns (paper: 1..3) and shared
by the pair's N conversations; the Questioner samples (T 0.9, top_p 0.9), the Roleplayer answers greedily.
The dialogue loop is `simulate` below (what each role is told and sees is in roles.py); 05_eval.py runs the
test conversations through it too, with the same SimulationSettings.
Conversations are appended chunk by chunk as they finish; rerunning resumes where a crash stopped.

    python 02_simulate.py --run_dir runs/tiny --iteration 0 --n_conversations 3
"""

import random
from dataclasses import dataclass, field
from pathlib import Path

from models import ModelSettings, truncated
from roles import questioner_view, roleplayer_view
from specs import check_specs
from utils import (StepError, check_rerun, load_pairs, parse_args, questioner_adapter, record_args, resumable,
                   run_main, seed_everything, stable_hash)


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


@dataclass
class SimulationSettings:
    """How a conversation goes, in training (02) and in evaluation (05): one set of flags, so the two agree."""

    _argument_group_name = "simulation settings (the same in 02_simulate.py and 05_eval.py)"
    min_turns: int = field(default=1, metadata={"help": "fewest question-answer turns (paper: 1)"})
    max_turns: int = field(default=3, metadata={
        "help": "most question-answer turns (paper: 3); 05's test conversations are balanced over "
                "min_turns .. max_turns"})
    temperature: float = field(default=0.9, metadata={"help": "Questioner sampling temperature (paper: 0.9)"})
    top_p: float = field(default=0.9, metadata={"help": "Questioner nucleus sampling (paper: 0.9)"})
    question_max_tokens: int = field(default=64, metadata={"help": "token cap of a question"})
    answer_max_tokens: int = field(default=96, metadata={"help": "token cap of a Roleplayer answer (<= 3 sentences)"})

    def __post_init__(self):
        if not 1 <= self.min_turns <= self.max_turns:
            raise StepError("--min_turns and --max_turns need 1 <= min_turns <= max_turns")


def split_of_iteration(t: int) -> str:
    """Iterations alternate between the two training splits: A, B, A, ... (Sec. 4.2 of the paper)."""
    return "A" if t % 2 == 0 else "B"


def generation_settings(sim: SimulationSettings, batch_size: int) -> dict:
    """Per role: the Questioner samples (Sec. 4.2: T 0.9, top_p 0.9), the Roleplayer answers greedily."""
    return {"questioner": dict(max_new_tokens=sim.question_max_tokens, temperature=sim.temperature,
                               top_p=sim.top_p, batch_size=batch_size),
            "roleplayer": dict(max_new_tokens=sim.answer_max_tokens, temperature=0.0, top_p=1.0,
                               batch_size=batch_size)}


def cut_at_question(text: str) -> str:
    """Keep a Questioner turn up to its first question mark: one question per turn (App. A)."""
    end = text.find("?")
    return text[:end + 1].strip() if end >= 0 else text.strip()


def simulate(questioner, roleplayer, items, gen, seed):
    """The dialogue of Sec. 3 for many conversations at once, one batched call per role per turn.

    items: dicts with name, task, bio, n_turns. gen: generation settings per role (generation_settings).
    Each turn the Questioner, seeing the task but not the persona (roles.questioner_view), asks; its turn is
    cut at the first question mark; the Roleplayer, seeing the persona and the dialogue with the roles
    swapped (roles.roleplayer_view), answers. Returns one dialogue (list of messages) per item, each of
    exactly n_turns question-answer turns and ending on an answer, and per item whether any of its turns was
    generated from a prompt cut to fit the model's context.
    """
    dialogues, cut = [[] for _ in items], [False for _ in items]
    for turn in range(max(item["n_turns"] for item in items)):
        active = [i for i, item in enumerate(items) if item["n_turns"] > turn]
        views = [questioner_view(items[i]["name"], items[i]["task"], dialogues[i]) for i in active]
        questions = questioner.generate(views, seed=seed + 1000 * turn, desc=f"turn {turn + 1} questions",
                                        **gen["questioner"])
        for i, q, c in zip(active, questions, truncated(questioner, views, gen["questioner"]["max_new_tokens"])):
            dialogues[i].append({"role": "assistant", "content": cut_at_question(q)})
            cut[i] |= c
        views = [roleplayer_view(items[i]["bio"], items[i]["task"], dialogues[i]) for i in active]
        answers = roleplayer.generate(views, seed=seed + 1000 * turn, desc=f"turn {turn + 1} answers",
                                      **gen["roleplayer"])
        for i, a, c in zip(active, answers, truncated(roleplayer, views, gen["roleplayer"]["max_new_tokens"])):
            dialogues[i].append({"role": "user", "content": a.strip()})
            cut[i] |= c
    return dialogues, cut


def simulate_pairs(questioner, roleplayer, pairs, sim: SimulationSettings, *, n_conversations: int, seed: int,
                   batch_size: int, chunk_pairs: int, iteration: int, final: Path, tag: str,
                   desc: str | None = None) -> list[dict]:
    """N conversations for each pair (each pair carries its n_turns), saved chunk by chunk.

    A chunk's sampling seed depends only on (seed, tag, chunk index), so a resumed run regenerates a
    half-saved chunk exactly, and models evaluated with the same tag face the same random draws.
    desc: the progress bar's label (default: "simulate <tag>").
    """
    gen = generation_settings(sim, batch_size)
    items = [p for p in pairs for _ in range(n_conversations)]
    keys = [(p["task_id"], p["persona_id"], n) for p in pairs for n in range(n_conversations)]

    def make_records(index, chunk, chunk_keys):
        dialogues, cut = simulate(questioner, roleplayer, chunk, gen, seed=stable_hash(seed, tag, index))
        return [{"task_id": k[0], "persona_id": k[1], "conv_id": k[2], "iteration": iteration,
                 "n_turns": item["n_turns"], "questioner": questioner.name, "roleplayer": roleplayer.name,
                 "messages": d, "sampling": gen, "truncated": c}
                for k, item, d, c in zip(chunk_keys, chunk, dialogues, cut)]

    return resumable(final, "conversation", items, keys, chunk_pairs * n_conversations, desc or f"simulate {tag}",
                     make_records)


def main():
    args, sim_args, model_args = parse_args(Args, SimulationSettings, ModelSettings)
    seed_everything(args.seed)
    out = Path(args.run_dir) / f"iter{args.iteration}"
    final = out / "conversations.jsonl"
    check_specs(questioner=args.questioner, roleplayer=args.roleplayer)
    check_rerun(out / "args_02_simulate.json", [final, out / "conversations.partial.jsonl"], args.overwrite,
                args, sim_args, model_args)
    if final.exists():
        print(f"02_simulate: {final} exists; nothing to do")
        return

    # The iteration's pairs; each gets its number of turns, drawn uniformly and shared by its N
    # conversations (App. A: "we randomly sample the number of turns for each task-persona pair").
    split = split_of_iteration(args.iteration)
    pairs = load_pairs(args.run_dir, split)
    for p in pairs:
        rng = random.Random(stable_hash(args.seed, args.iteration, p["task_id"], p["persona_id"]))
        p["n_turns"] = rng.randint(sim_args.min_turns, sim_args.max_turns)

    # Q_t asks (base + adapter of iteration t-1); the Roleplayer is the fixed base model. When both name
    # the same model they share one loaded copy, the adapter switched off for the Roleplayer.
    pool = model_args.pool()
    questioner = pool.chat(args.questioner, adapter=questioner_adapter(args.run_dir, args.iteration), questioner=True)
    roleplayer = pool.chat(args.roleplayer)
    record_args(out / "args_02_simulate.json", args, sim_args, model_args)
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
