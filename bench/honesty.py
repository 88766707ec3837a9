"""Honesty check of the toy world's reward: does a Roleplayer reply that states an IRRELEVANT value ("I live in
Lisbon." on a recipe task) raise the gold answer's log-prob? It must not, or a Questioner could earn reward by
asking about anything at all instead of what the task needs.

    python bench/honesty.py runs/toy [--world data/toy] [--json honesty.json]

Reads a finished toy run's folder (no model is run): data/tasks.jsonl for the task texts, and every folder of
scored conversations it has, iter{t}/ (02 and 03) and eval/m{t}/ (05): conversations.jsonl and scores.jsonl (the
gold answer's log-prob under Q_BASE, 03's reward). Each conversation is classed by what the user's turns revealed,
read with the toy world's own matcher (scripted.World.told, over the world's value keywords):
    nothing      no value of any attribute
    irrelevant   only values of attributes the task does not depend on
    relevant     at least one value of an attribute the task depends on (one or two of them)
Comparisons are made within a pair and its number of turns (a pair's N conversations share both, so the persona,
the gold answer and the length are held fixed): the mean log-prob of the pair's "irrelevant" conversations minus
that of its "nothing" ones, for every pair that has both; likewise "relevant" minus "nothing", for scale. Printed
per folder and over all of them: pairs compared, mean difference in nats, and a 95% interval that resamples tasks,
then pairs (metrics.cluster_bootstrap_ci). The honesty check holds when the irrelevant difference is not above
zero; the relevant one shows what the reward pays for.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from metrics import cluster_bootstrap_ci  # noqa: E402
from scripted import World  # noqa: E402
from utils import read_jsonl  # noqa: E402

KINDS = ("nothing", "irrelevant", "relevant")


def revealed(world: World, messages: list[dict], task: str) -> str:
    """What the user's turns of a conversation revealed: one of KINDS."""
    told = world.told(messages)
    if not told:
        return "nothing"
    return "relevant" if set(told) & set(world.relevant(task)) else "irrelevant"


def differences(world: World, tasks: dict, conversations: list[dict], scores: list[dict]) -> dict:
    """kind -> [(task_id, persona_id, n_turns, mean log-prob of the kind minus that of "nothing")], per group of a
    pair and number of turns that holds conversations of both."""
    logprob = {(s["task_id"], s["persona_id"], s["conv_id"]): s["logprob"] for s in scores}
    groups = {}  # (task_id, persona_id, n_turns) -> kind -> log-probs
    for c in conversations:
        key = (c["task_id"], c["persona_id"], c["conv_id"])
        if key not in logprob:
            continue
        kind = revealed(world, c["messages"], tasks[c["task_id"]])
        groups.setdefault((c["task_id"], c["persona_id"], c["n_turns"]), {}).setdefault(kind, []).append(logprob[key])
    result = {}
    for kind in KINDS[1:]:
        result[kind] = [(*group, sum(by[kind]) / len(by[kind]) - sum(by["nothing"]) / len(by["nothing"]))
                        for group, by in sorted(groups.items()) if kind in by and "nothing" in by]
    return result


def summary(diffs: list[tuple], n_boot: int = 2000) -> dict:
    """Pairs compared, their mean difference (nats) and its 95% interval resampling tasks, then pairs."""
    values = [d[-1] for d in diffs]
    return {"pairs": len(values), "mean": sum(values) / len(values) if values else None,
            "ci95_cluster": cluster_bootstrap_ci(values, [d[:1] for d in diffs], n_boot)}


def scored_folders(run: Path) -> list[Path]:
    """The run's folders with scored conversations: iter0, iter1, ..., then eval/m0, eval/m1, ..."""
    found = sorted(run.glob("iter*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1)
    found += sorted((run / "eval").glob("m*"), key=lambda p: int(p.name[1:]) if p.name[1:].isdigit() else -1)
    return [f for f in found if (f / "conversations.jsonl").is_file() and (f / "scores.jsonl").is_file()]


def fmt(s: dict) -> str:
    if s["mean"] is None:
        return f"{s['pairs']:>5} pairs  -"
    lo, hi = s["ci95_cluster"]
    return f"{s['pairs']:>5} pairs  {s['mean']:+7.2f} [{lo:+.2f}, {hi:+.2f}]"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished toy run's folder, e.g. runs/toy")
    parser.add_argument("--world", default=str(ROOT / "data" / "toy"), help="the toy world's folder")
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    args = parser.parse_args()
    run = Path(args.run_dir)
    if not (run / "data" / "tasks.jsonl").is_file():
        sys.exit(f"error: {run / 'data' / 'tasks.jsonl'}: file not found; give a run folder (runs/toy)")
    world = World(args.world)
    tasks = {t["task_id"]: t["text"] for t in read_jsonl(run / "data" / "tasks.jsonl", "task")}
    folders = scored_folders(run)
    if not folders:
        sys.exit(f"error: {run}: no folder with conversations.jsonl and scores.jsonl (iter*/, eval/m*/)")
    per_folder, pooled = {}, {kind: [] for kind in KINDS[1:]}
    print(f"{run}: gold log-prob of a pair's conversations that revealed ... minus those that revealed nothing "
          f"(same pair and turns; nats, 95% CI resampling tasks, then pairs)")
    print(f"{'folder':<10} {'irrelevant values only':>38}   {'a relevant value (for scale)':>38}")
    for folder in folders:
        diffs = differences(world, tasks, read_jsonl(folder / "conversations.jsonl", "conversation"),
                            read_jsonl(folder / "scores.jsonl", "score"))
        name = str(folder.relative_to(run))
        for kind in pooled:  # pooled over folders: one pair's groups from several folders are one task's cluster
            pooled[kind] += [(d[0], name, *d[1:]) for d in diffs[kind]]
        per_folder[name] = {kind: summary(diffs[kind]) for kind in pooled}
        print(f"{name:<10} {fmt(per_folder[name]['irrelevant']):>38}   {fmt(per_folder[name]['relevant']):>38}")
    overall = {kind: summary(pooled[kind]) for kind in pooled}
    print(f"{'all':<10} {fmt(overall['irrelevant']):>38}   {fmt(overall['relevant']):>38}")
    holds = overall["irrelevant"]["mean"] is None or overall["irrelevant"]["ci95_cluster"][0] <= 0
    print("honesty check: " + ("holds (stating an irrelevant value does not raise the gold log-prob "
                               "detectably)" if holds else "FAILS: stating an irrelevant value raises the gold "
                                                           "log-prob (interval above zero)"))
    if args.json:
        Path(args.json).write_text(json.dumps({"run_dir": str(run), "folders": per_folder, "all": overall,
                                               "holds": holds}, indent=1))


if __name__ == "__main__":
    main()
