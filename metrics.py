"""The evaluation's arithmetic: 05_eval.py's records -> metrics.json (report.py writes the report from it).

Win rates of comparisons judged in both orders, gold log-prob gains, the 95% bootstrap intervals that resample the
test tasks and then their pairs (a pair is a task x a persona: the pairs of one task are not independent draws),
and the diagnostics of the questions asked and the final answers given.
"""

import json
import random
from pathlib import Path

from roles import answer_problem
from utils import provenance, read_jsonl, record_key


# --- Intervals and win rates --------------------------------------------------------------------------

def bootstrap_ci(values: list[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval of the mean (resampling items with replacement)."""
    if not values:
        return [None, None]
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo = means[int((1 - level) / 2 * n_boot)]
    hi = means[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return [lo, hi]


def cluster_bootstrap_ci(values: list[float], clusters: list[tuple], n_boot: int = 2000, seed: int = 0,
                         level: float = 0.95):
    """Percentile bootstrap interval of the mean of items that come in nested clusters, outermost first.

    Test pairs are tasks x personas, so two pairs of one task are not independent draws: clusters[i] = (task_id,)
    resamples the tasks with replacement, then within each drawn task its pairs (a two-stage bootstrap); with
    several judged conversations per pair, clusters[i] = (task_id, persona_id) goes on to the conversations.
    Wider than bootstrap_ci when the items of a cluster resemble each other, as it should be."""
    if not values:
        return [None, None]
    tree = {}  # cluster key -> sub-clusters ... -> the items' values
    for value, path in zip(values, clusters):
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node.setdefault(path[-1], []).append(float(value))

    def as_lists(node):
        return [as_lists(child) for child in node.values()] if isinstance(node, dict) else node

    def draw(node, rng) -> tuple[float, int]:  # (sum, count) of one resample of this cluster's items
        picks = [node[rng.randrange(len(node))] for _ in node]
        if not isinstance(picks[0], list):
            return sum(picks), len(picks)
        drawn = [draw(child, rng) for child in picks]
        return sum(s for s, _ in drawn), sum(n for _, n in drawn)

    root, rng = as_lists(tree), random.Random(seed)
    means = sorted(s / n for s, n in (draw(root, rng) for _ in range(n_boot)))
    return [means[int((1 - level) / 2 * n_boot)], means[min(n_boot - 1, int((1 + level) / 2 * n_boot))]]


def pair_outcome(verdict_new_first: str | None, verdict_new_second: str | None) -> float | None:
    """One comparison judged in both orders. Order 1 shows the new model's answer as A, order 2 as B.

    Both verdicts pick the new model: 1 (win); both pick the baseline: 0 (loss); they disagree: 0.5
    (a tie: the judge followed the position, not the content). None if either verdict is unparseable.
    """
    if verdict_new_first is None or verdict_new_second is None:
        return None
    new_wins = [verdict_new_first == "A", verdict_new_second == "B"]
    return 1.0 if all(new_wins) else 0.0 if not any(new_wins) else 0.5


def win_rate(outcomes: list[float | None], n_boot: int = 2000, seed: int = 0,
             clusters: list[tuple] | None = None) -> dict:
    """Win rate in % (ties count half), its 95% bootstrap interval over the comparisons (ci95), and the judge's
    order consistency. With each comparison's clusters (cluster_bootstrap_ci) also the interval that resamples
    those (ci95_cluster), the one that fits a design of tasks x personas."""
    scored = [o for o in outcomes if o is not None]
    cluster = {} if clusters is None else {"ci95_cluster": cluster_bootstrap_ci(
        [100 * o for o in scored], [c for o, c in zip(outcomes, clusters) if o is not None], n_boot, seed)}
    if not scored:
        return {"win_rate": None, "ci95": [None, None], **cluster, "n": 0, "unparseable": len(outcomes),
                "order_consistency": None, "wins": 0, "losses": 0, "ties": 0}
    ci = bootstrap_ci([100 * o for o in scored], n_boot, seed)
    return {"win_rate": 100 * sum(scored) / len(scored), "ci95": ci, **cluster, "n": len(scored),
            "unparseable": len(outcomes) - len(scored),
            "order_consistency": sum(o != 0.5 for o in scored) / len(scored),
            "wins": sum(o == 1.0 for o in scored), "losses": sum(o == 0.0 for o in scored),
            "ties": sum(o == 0.5 for o in scored)}


def min_detectable_effect(diffs: list[float]) -> float | None:
    """Smallest mean difference a paired test of this size detects (5% two-sided, 80% power): 2.8 SD/sqrt(n)."""
    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
    return 2.8 * sd / n ** 0.5


# --- 05_eval.py's records -> metrics.json -------------------------------------------------------------

def per_pair(records, reduce) -> dict:
    by_pair = {}
    for r in records:
        by_pair.setdefault((r["task_id"], r["persona_id"]), []).append(r["logprob"])
    return {k: reduce(v) for k, v in by_pair.items()}


def paired(new: dict, old: dict, n_boot: int) -> dict:
    """The mean difference per pair ((task_id, persona_id) -> value), with 95% intervals resampling the pairs
    (ci95) and the tasks, then their pairs (ci95_cluster)."""
    diffs = [new[k] - old[k] for k in sorted(old)]
    return {"mean": sum(diffs) / len(diffs), "ci95": bootstrap_ci(diffs, n_boot),
            "ci95_cluster": cluster_bootstrap_ci(diffs, [k[:1] for k in sorted(old)], n_boot), "n": len(diffs)}


def mean(values) -> float:
    return sum(values) / len(values)


def diagnostics(conversations, pairs) -> dict:
    """How the Questioner behaves: does it ask, how long are its questions, does the Roleplayer recite?"""
    asked = [m["content"] for c in conversations for m in c["messages"] if m["role"] == "assistant"]
    replies = [(m["content"], pairs[(c["task_id"], c["persona_id"])]["bio"])
               for c in conversations for m in c["messages"] if m["role"] == "user"]
    questions = [q for q in asked if "?" in q]

    def leaked(reply, bio):  # the reply repeats most of the persona's distinctive words
        words = {w for w in bio.lower().split() if len(w) > 4}
        return len(words) > 0 and len(words & set(reply.lower().split())) / len(words) >= 0.5

    return {"questions_per_conversation": len(questions) / len(conversations),
            "question_rate": len(questions) / max(1, len(asked)),
            "words_per_question": sum(len(q.split()) for q in questions) / max(1, len(questions)),
            "answered_instead": sum("?" not in q and len(q.split()) > 25 for q in asked) / max(1, len(asked)),
            "persona_leak": sum(leaked(r, b) for r, b in replies) / max(1, len(replies)),
            "empty_turns": sum(not m.strip() for m in asked) + sum(not r.strip() for r, _ in replies)}


def answer_diagnostics(answers: dict, conversations: dict, pairs: dict, world=None) -> dict:
    """What the final answers are ((task_id, persona_id, conv_id) -> answer, after that conversation, keyed as in
    `conversations`; `pairs` by (task_id, persona_id)): the share that is no answer
    at all (a question, a refusal, empty: roles.answer_problem). In the toy world also, over the task's relevant
    attributes, the share of values the user told that the answer names (`revealed_used`), and the share of
    attributes for which it names a value the user never told (`hallucinated`, a guess right or wrong)."""
    problems = [answer_problem(a) for a in answers.values()]
    result = {"no_answer": sum(p is not None for p in problems) / len(problems),
              **{f"no_answer_{kind}": sum(p == kind for p in problems) / len(problems)
                 for kind in ("question", "refusal", "empty")}}
    if world is not None:
        use = [world.answer_use(answers[k], conversations[k], pairs[k[:2]]["task"]) for k in sorted(answers)]
        result["revealed_used"] = sum(u["used"] for u in use) / max(1, sum(u["told"] for u in use))
        result["hallucinated"] = sum(u["hallucinated"] for u in use) / sum(u["attributes"] for u in use)
    return result


def gold_flags(run_dir) -> dict:
    """How often the Oracle's gold answer for a test pair was unusable (01_generate.py's check):
    at first, and still after its retries (those pairs are left out of the evaluation)."""
    gold = [g for g in read_jsonl(Path(run_dir) / "data" / "gold.jsonl", "gold") if g["split"] == "test"]
    retried = sum(g.get("attempts", 1) > 1 or bool(g.get("flag")) for g in gold)
    return {"pairs": len(gold), "first_try": retried / len(gold),
            "left_out": sum(bool(g.get("flag")) for g in gold) / len(gold)}


def answer_texts(answers) -> dict:
    return {record_key("answer", a): a["answer"] for a in answers}


def outcomes(judgments) -> dict:
    """(task_id, persona_id, conv_id) -> outcome, sorted: agreement of the two orders is a win or a loss,
    disagreement a tie (pair_outcome)."""
    verdicts = {(r["task_id"], r["persona_id"], r["conv_id"], r["order"]): r["verdict"] for r in judgments}
    return {k: pair_outcome(verdicts[(*k, "new_first")], verdicts[(*k, "new_second")])
            for k in sorted({(r["task_id"], r["persona_id"], r["conv_id"]) for r in judgments})}


def judged_win_rate(judgments, args) -> dict:
    """win_rate of the comparisons, its interval resampling the tasks, then their pairs (then the pair's
    conversations, when each was judged)."""
    judged = outcomes(judgments)
    return win_rate(list(judged.values()), args.n_bootstrap, args.seed, clusters=[k[:-1] for k in judged])


def side_by_side(results, by_pair, n: int) -> list[dict]:
    """What changed, for the report: the first n test pairs by id (a fixed rule, never picked by hand), with the
    baseline's and the last model's conversation 0 and final answer after it, and the Judge's verdicts on the two
    answers. results: model name -> its records, the baseline first."""
    names = list(results)
    if len(names) < 2:
        return []
    base, last = names[0], names[-1]
    shown = []
    for k in sorted(by_pair)[:n]:
        first = (*k, 0)
        models = {name: {"messages": next(c["messages"] for c in results[name]["conversations"]
                                          if record_key("conversation", c) == first),
                         "answer": answer_texts(results[name]["answers"])[first]} for name in (base, last)}
        judged = {r["order"]: r for r in results[last]["judgments"] if record_key("judgment", r)[:3] == first}
        shown.append({"task_id": k[0], "persona_id": k[1], "task": by_pair[k]["task"], "bio": by_pair[k]["bio"],
                      "models": models, "verdicts": {o: judged[o]["verdict"] for o in ("new_first", "new_second")},
                      "judge_outputs": {o: judged[o]["output"] for o in ("new_first", "new_second")},
                      "outcome": pair_outcome(judged["new_first"]["verdict"], judged["new_second"]["verdict"])})
    return shown


def measure(args, by_pair, models, results, control_scores, judge_name, world) -> dict:
    """metrics.json: the log-prob controls, the value of a conversation, and per model (by name, with its spec) its
    gold log-probs, diagnostics, gain over the baseline m0 and win rates. results[name]: the model's records per
    output file (its name without .jsonl); models: (name, spec, adapter), the baseline first."""
    m0_means = per_pair(results[models[0][0]]["scores"], mean)
    no_conv = {(c["task_id"], c["persona_id"]): c["logprob"] for c in control_scores
               if c["control"] == "no_conversation"}
    select_args = Path(args.run_dir) / "iter0" / "args_03_select.json"
    measured = {"run_dir": args.run_dir, "seed": args.seed, "provenance": provenance(),
                "questioner": models[0][1], "named_models": bool(args.models), "roleplayer": args.roleplayer,
                "judge": judge_name, "test_pairs": len(by_pair), "n_conversations": args.n_conversations,
                "judged_per_pair": args.n_conversations if args.judge_all_conversations else 1,
                "target": json.loads(select_args.read_text())["target"] if select_args.exists() else None,
                "controls": {name: sum(c["logprob"] for c in control_scores if c["control"] == name) / len(by_pair)
                             for name in ("no_conversation", "persona_in_context", "other_persona")},
                "gold_flagged": gold_flags(args.run_dir),
                "conversation_value": paired(m0_means, no_conv, args.n_bootstrap),
                "min_detectable_effect": min_detectable_effect([m0_means[k] - no_conv[k] for k in m0_means]),
                "models": {}}
    for t, (name, spec, adapter) in enumerate(models):
        files = results[name]
        means = per_pair(files["scores"], mean)
        m = {"spec": spec + (f"+{adapter[0]}" if adapter else ""), "logprob_mean": mean(list(means.values())),
             "logprob_best": sum(per_pair(files["scores"], max).values()) / len(means),
             "diagnostics": diagnostics(files["conversations"], by_pair)}
        if world is not None:  # the toy preset: do the questions ask about what matters for the task?
            hits = [h for c in files["conversations"]
                    for h in world.hits(c["messages"], by_pair[(c["task_id"], c["persona_id"])]["task"])]
            m["diagnostics"]["attribute_hit_rate"] = sum(hits) / max(1, len(hits))
        dialogues = {record_key("conversation", c): c["messages"] for c in files["conversations"]}
        m["answers"] = answer_diagnostics(answer_texts(files["answers"]), dialogues, by_pair, world)
        if t > 0:
            m["answers_m0"] = answer_diagnostics(answer_texts(files["answers_m0"]), dialogues, by_pair, world)
            m["gain_over_m0"] = paired(means, m0_means, args.n_bootstrap)
            m["win_rate"] = judged_win_rate(files["judgments"], args)
            m["asks_only"] = judged_win_rate(files["judgments_asks_only"], args)
        measured["models"][name] = m
    measured["examples"] = side_by_side(results, by_pair, args.n_examples)
    # How many records of each output file come from a prompt cut to fit the context.
    written = {"controls.jsonl": control_scores} | {f"{model}/{name}.jsonl": records for model, files in results.items()
                                                     for name, records in files.items()}
    measured["truncated"] = {name: sum(r.get("truncated", False) for r in written[name]) for name in sorted(written)}
    return measured
