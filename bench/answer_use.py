"""Does a Questioner's final answer use what the conversation revealed? And how does it ask? (toy world)

    python bench/answer_use.py [--questioner embedded|hf:<folder>] [--tasks data/toy/tasks.jsonl]

Part 1, answers: for every task, three dialogues in which the user (the scripted Roleplayer, answering the
world's own example questions) revealed both, one or none of the task's two relevant values, beside a turn
about another attribute or a vague exchange; the model writes its greedy final answer in the steps'
answer view (roles.answer_view). Per number of values revealed it prints the share of revealed values the
answer names ("used"), the share of relevant attributes for which it names a value the user did not tell
("hallucinated"), and the share of answers that are no answer (a question, a refusal, empty:
roles.answer_problem). Part 2, questions: the model as Questioner (T 0.9, top_p 0.9) in 3-turn conversations
with the scripted Roleplayer, 2 personas per task: the share of its turns that are questions and of those
that ask about an attribute the task depends on (05's question_rate and attribute_hit_rate).
Local models compute as the steps do (--dtype auto). Prints one block; --json writes the numbers.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from models import ModelPool  # noqa: E402
from roles import answer_problem, answer_view, roleplayer_view  # noqa: E402
from stargate import simulate  # noqa: E402  (the dialogue loop of the steps)
from utils import read_jsonl  # noqa: E402


VAGUE_QUESTION = "Is there anything else I should know?"


def toy_dialogues(world_chat, tasks: list[dict], per_task: int, rng: random.Random) -> list[dict]:
    """Dialogues on each task in which the user revealed 2, 1, 0, 2, ... of its two relevant values, each beside
    a turn about another attribute or a vague one (1 to 3 turns, in random order). The questions are the
    world's own example questions; the replies are the scripted Roleplayer's, as in a simulation."""
    world = world_chat.world
    names = [n.strip() for n in (ROOT / "data" / "names.txt").read_text().splitlines() if n.strip()]
    items = []
    for task in tasks:
        relevant = task["attributes"]
        for k in range(per_task):
            n_told = 2 - k % 3
            name = rng.choice(names)
            asked = rng.sample(relevant, n_told)
            other = rng.choice([a for a in world.attributes if a not in relevant] + [None])
            if n_told < 2 or rng.random() < 0.5:  # a dialogue of at least one turn, at most three
                asked.append(other)
            rng.shuffle(asked)
            items.append({"name": name, "bio": world.bio(name, rng), "task": task["text"], "n_told": n_told,
                          "questions": [rng.choice(world.attributes[a]["questions"]) if a else VAGUE_QUESTION
                                        for a in asked], "messages": []})
    for turn in range(3):
        active = [i for i in items if turn < len(i["questions"])]
        for i in active:
            i["messages"].append({"role": "assistant", "content": i["questions"][turn]})
        replies = world_chat.generate([roleplayer_view(i["bio"], i["task"], i["messages"]) for i in active])
        for i, reply in zip(active, replies):
            i["messages"].append({"role": "user", "content": reply})
    return items


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questioner", default="embedded")
    parser.add_argument("--tasks", default=str(ROOT / "data" / "toy" / "tasks.jsonl"))
    parser.add_argument("--world", default=str(ROOT / "data" / "toy"))
    parser.add_argument("--final_max_tokens", type=int, default=40, help="the toy preset's cap")
    parser.add_argument("--question_max_tokens", type=int, default=24, help="the toy preset's cap")
    parser.add_argument("--cache_dir", default=str(ROOT / "cache"))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=6, help="example answers to print")
    parser.add_argument("--json", default="", help="also write the numbers here")
    args = parser.parse_args()

    pool = ModelPool(args.cache_dir, "no", dtype=args.dtype)
    world_chat = pool.chat(f"scripted:{args.world}")
    world = world_chat.world
    questioner = pool.chat(args.questioner)
    tasks = read_jsonl(args.tasks)
    start = time.time()

    # Part 1: final answers after dialogues that revealed 2, 1 or 0 relevant values.
    items = toy_dialogues(world_chat, tasks, 3, random.Random(args.seed))
    convs = [i["messages"] for i in items]
    views = [answer_view(i["name"], i["task"], c) for i, c in zip(items, convs)]
    answers = questioner.generate(views, max_new_tokens=args.final_max_tokens, temperature=0.0, batch_size=32,
                                  desc="answers")
    results = {}
    for n_told in (0, 1, 2):
        rows = [(i, c, a) for i, c, a in zip(items, convs, answers) if i["n_told"] == n_told]
        use = [world.answer_use(a, c, i["task"]) for i, c, a in rows]
        told = sum(u["told"] for u in use)
        results[f"told_{n_told}"] = {
            "answers": len(rows), "used": sum(u["used"] for u in use) / told if told else None,
            "hallucinated": sum(u["hallucinated"] for u in use) / sum(u["attributes"] for u in use),
            "no_answer": sum(answer_problem(a) is not None for _, _, a in rows) / len(rows)}
    all_use = [world.answer_use(a, c, i["task"]) for i, c, a in zip(items, convs, answers)]
    results["all"] = {"used": sum(u["used"] for u in all_use) / sum(u["told"] for u in all_use),
                      "hallucinated": sum(u["hallucinated"] for u in all_use) / sum(u["attributes"] for u in all_use),
                      "no_answer": sum(answer_problem(a) is not None for a in answers) / len(answers),
                      "kinds": {k: sum(answer_problem(a) == k for a in answers)
                                for k in ("question", "refusal", "empty")}}

    # Part 2: the model as Questioner against the scripted Roleplayer.
    rng = random.Random(args.seed + 1)
    names = [n.strip() for n in (ROOT / "data" / "names.txt").read_text().splitlines() if n.strip()]
    sim_items = []
    for task in tasks:
        for _ in range(2):
            name = rng.choice(names)
            sim_items.append({"name": name, "bio": world.bio(name, rng), "task": task["text"], "n_turns": 3})
    gen = {"questioner": dict(max_new_tokens=args.question_max_tokens, temperature=0.9, top_p=0.9, batch_size=48),
           "roleplayer": dict(max_new_tokens=48, temperature=0.0, top_p=1.0, batch_size=48)}
    sim, _ = simulate(questioner, world_chat, sim_items, gen, seed=args.seed)
    asked = [m["content"] for d in sim for m in d if m["role"] == "assistant"]
    hits = [h for i, d in zip(sim_items, sim) for h in world.hits(d, i["task"])]
    results["questions"] = {"turns": len(asked), "question_rate": sum("?" in q for q in asked) / len(asked),
                            "attribute_hit_rate": sum(hits) / len(hits)}

    print(f"{args.questioner}: {len(tasks)} tasks, {time.time() - start:.0f} s")
    for key in ("told_0", "told_1", "told_2", "all"):
        r = results[key]
        used = "-" if r["used"] is None else f"{r['used']:.0%}"
        print(f"  {key:7s} revealed values used {used:>5s}, hallucinated {r['hallucinated']:.0%}, "
              f"no answer {r['no_answer']:.0%}" + (f" {r['kinds']}" if "kinds" in r else ""))
    q = results["questions"]
    print(f"  questions: {q['question_rate']:.0%} of {q['turns']} turns; about a relevant attribute "
          f"{q['attribute_hit_rate']:.0%}")
    for i, c, a in list(zip(items, convs, answers))[:args.show]:
        print(f"  [{i['n_told']} told] {i['task']} | {' / '.join(m['content'] for m in c if m['role'] == 'user')}"
              f"\n      -> {a!r}")
    if args.json:
        examples = [{"task": i["task"], "said": [m["content"] for m in c if m["role"] == "user"], "answer": a}
                    for i, c, a in zip(items, convs, answers)]
        Path(args.json).write_text(json.dumps({"questioner": args.questioner, **results, "answers": examples},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
