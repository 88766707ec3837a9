"""What the toy Questioner asks after its first question, under variants of its view (no training: m0 only).

    python bench/later_turns.py current|examples_plain|no_nudge [--questioner hf:cache/toy-base] [--tasks 36]

Conversations of 3 turns (the first --tasks toy tasks x 2 personas, one conversation each; T 0.9, top_p 0.9,
the toy preset's 24-token cap) between the Questioner and the scripted Roleplayer of data/toy. Per turn it prints
the share of Questioner turns that echo the view's nudge ("What's your next question?": roles.NEXT_QUESTION asks
"(Ask me your next question.)" after each reply) and the share that ask about an attribute the task needs
(scripted.World.hits); per conversation, the share that revealed both of the task's relevant values.
Variants of roles.questioner_view, patched in this process only:
    current           roles.py as it is: the nudge after each reply, in the worked example as in the dialogue
    examples_plain    the worked example's replies without the nudge, the dialogue's with it (the earlier view)
    no_nudge          no nudge anywhere
"""
import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import roles  # noqa: E402
import stargate  # noqa: E402
from models import ModelPool  # noqa: E402
from scripted import World  # noqa: E402
from utils import read_jsonl  # noqa: E402

ECHO = re.compile(r"next question", re.IGNORECASE)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=["current", "examples_plain", "no_nudge"])
    parser.add_argument("--questioner", default="hf:cache/toy-base")
    parser.add_argument("--cache_dir", default="cache")
    parser.add_argument("--tasks", type=int, default=36)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.variant in ("examples_plain", "no_nudge"):
        roles.QUESTIONER_EXAMPLES[:] = [dict(m, content=m["content"].removesuffix(f"\n\n{roles.NEXT_QUESTION}"))
                                        for m in roles.QUESTIONER_EXAMPLES]
    if args.variant == "no_nudge":
        current_view = roles.questioner_view
        stargate.questioner_view = lambda name, task, dialogue: current_view(name, task, []) + dialogue
    world = World(ROOT / "data/toy")
    tasks = [t["text"] for t in read_jsonl(ROOT / "data/toy/tasks.jsonl")][:args.tasks]
    names = (ROOT / "data/names.txt").read_text().split()
    items = [{"name": names[2 * i + k], "task": task, "n_turns": 3,
              "bio": world.bio(names[2 * i + k], random.Random(f"{args.seed}-{i}-{k}"))}
             for i, task in enumerate(tasks) for k in range(2)]
    pool = ModelPool(args.cache_dir, "no")
    questioner, roleplayer = pool.chat(args.questioner), pool.chat("scripted:" + str(ROOT / "data/toy"))
    gen = {"questioner": dict(max_new_tokens=24, temperature=0.9, top_p=0.9, batch_size=32),
           "roleplayer": dict(max_new_tokens=96, temperature=0.0, top_p=1.0, batch_size=32)}
    start = time.time()
    dialogues, _ = stargate.simulate(questioner, roleplayer, items, gen, seed=args.seed)
    echo = [[bool(ECHO.search(d[2 * k]["content"])) for d in dialogues] for k in range(3)]
    hits = [world.hits(d, item["task"]) for d, item in zip(dialogues, items)]
    relevant = [[h[k] for h in hits] for k in range(3)]
    both = [all(a in world.told(d) for a in world.relevant(item["task"])) for d, item in zip(dialogues, items)]
    share = lambda xs: f"{sum(xs) / len(xs):.0%}"  # noqa: E731
    print(json.dumps({"variant": args.variant, "questioner": args.questioner, "conversations": len(dialogues),
                      "echo_by_turn": [share(e) for e in echo], "relevant_by_turn": [share(r) for r in relevant],
                      "both_values_revealed": share(both), "seconds": round(time.time() - start)}))
    for d in dialogues[:4]:
        print("  " + " | ".join(m["content"][:60] for m in d))


if __name__ == "__main__":
    main()
