"""What the toy world's conversations revealed, per folder of a finished toy run: the distinct values of the task's
relevant attributes the user stated (0, 1 or 2: what the toy Judge pays for), how often the first reply already stated
one (the first question asked about what matters), and how often the user had to state the same relevant value twice
(a relevant question asked again after it was answered: it earns nothing).

    python bench/told.py runs/toy [runs/toy-seed1 ...] [--world data/toy]

Reads iter{t}/conversations.jsonl (all of Q_t's conversations), iter{t}/sft.jsonl (the kept ones) and
eval/m{t}/conversations.jsonl (the test conversations); no model is run (scripted.World.told, keyword matching).
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from scripted import World  # noqa: E402
from utils import read_jsonl  # noqa: E402


def summary(world: World, tasks: dict, conversations: list[dict]) -> dict:
    """Share of conversations revealing 0 / 1 / 2 relevant values, mean distinct relevant values, share whose first
    reply stated a relevant value, repeats."""
    counts, first, repeats = Counter(), 0, 0
    for c in conversations:
        relevant = world.relevant(tasks[c["task_id"]])
        told = world.told(c["messages"])
        counts[sum(a in told for a in relevant)] += 1
        replies = [m["content"] for m in c["messages"] if m["role"] == "user"]
        per_reply = [[a for a in relevant if world.stated(r, a)] for r in replies]
        stated = [a for said in per_reply for a in said]
        first += bool(per_reply and per_reply[0])
        repeats += len(stated) > len(set(stated))
    n = max(len(conversations), 1)
    return {"n": len(conversations), "values": round(sum(k * v for k, v in counts.items()) / n, 3),
            "share_0_1_2": [round(counts[k] / n, 3) for k in range(3)],
            "first": round(first / n, 3), "repeated": round(repeats / n, 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--world", default=str(ROOT / "data/toy"))
    args = parser.parse_args()
    world = World(args.world)
    for run in map(Path, args.runs):
        tasks = {t["task_id"]: t["text"] for t in read_jsonl(run / "data/tasks.jsonl")}
        rows = {}
        for folder in sorted(run.glob("iter*")) + sorted((run / "eval").glob("m*")):
            if not (folder / "conversations.jsonl").exists():
                continue
            conversations = read_jsonl(folder / "conversations.jsonl")
            rows[f"{folder.name} all"] = summary(world, tasks, conversations)
            if (folder / "sft.jsonl").exists():
                kept = {(r["task_id"], r["persona_id"], r["conv_id"]) for r in read_jsonl(folder / "sft.jsonl")}
                rows[f"{folder.name} kept"] = summary(
                    world, tasks, [c for c in conversations if (c["task_id"], c["persona_id"], c["conv_id"]) in kept])
        print(run)
        for name, row in rows.items():
            print(f"  {name:12s} {json.dumps(row)}")


if __name__ == "__main__":
    main()
