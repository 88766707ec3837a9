"""Step 5: evaluate m0 .. mT on held-out test pairs (Sec. 4.3 of the paper), and write the report.

Reads   the run's test pairs (01_generate.py) and the adapters <run_dir>/iter{t}/adapter of m1 .. mT.
Writes  <run_dir>/eval/m{t}/conversations.jsonl  N test conversations per pair with m_t asking
        <run_dir>/eval/m{t}/scores.jsonl         gold log-prob of each (scored by Q_BASE)
        <run_dir>/eval/m{t}/answers.jsonl        m_t's greedy final answer after conversation 0
        <run_dir>/eval/m{t}/answers_m0.jsonl     m0's answer after m_t's conversation ("m_t asks, m0 answers")
        <run_dir>/eval/m{t}/judgments*.jsonl     the Judge's verdicts, both orders
        <run_dir>/eval/controls.jsonl            log-prob controls: no conversation, persona in context,
                                                 a conversation from a different persona
        <run_dir>/eval/metrics.json, report.md, winrate.png, logprob.png

Every model faces the same test pairs, conversation lengths (balanced over 1 .. --max_turns turns) and random
seeds, so differences come from the model. Unlike the paper, each comparison is judged in BOTH orders
(position bias was large there): agreement is a win or a loss, disagreement a tie; win rates come with
95% bootstrap intervals. Judge calls are cached, so rerunning costs nothing.

    python 05_eval.py --run_dir runs/tiny --iterations 2 --n_conversations 3
"""

import importlib
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from models import ModelPool, parse_spec, truncated
from report import bootstrap_ci, load_metrics, min_detectable_effect, pair_outcome, win_rate, write_report
from roles import JUDGE_PROMPT, JUDGE_SYSTEM, answer_problem, answer_view, parse_verdict
from utils import (StepError, load_pairs, parse_args, provenance, questioner_adapter, read_jsonl, record_args,
                   resumable, run_main, seed_everything, write_json_atomic)

simulate_pairs = importlib.import_module("02_simulate").simulate_pairs  # the same simulation as training


@dataclass
class Args:
    run_dir: str = field(default="runs/tiny", metadata={"help": "folder of this run"})
    iterations: int = field(default=2, metadata={"help": "T: evaluate m0 .. mT (paper: 3)"})
    questioner: str = field(default="embedded", metadata={"help": "Q_BASE model spec"})
    roleplayer: str = field(default="embedded", metadata={
        "help": "Roleplayer for the test conversations; may differ from training (generalisation test)"})
    judge: str = field(default="embedded", metadata={"help": "Judge model spec (paper: GPT-4)"})
    n_conversations: int = field(default=10, metadata={"help": "N test conversations per pair for the log-probs"})
    test_pairs: int = field(default=300, metadata={"help": "test pairs used, at most (paper: 300 of 500)"})
    max_turns: int = field(default=3, metadata={"help": "test conversations have 1 .. max_turns turns, balanced (paper: 3)"})
    temperature: float = field(default=0.9, metadata={"help": "Questioner sampling temperature"})
    top_p: float = field(default=0.9, metadata={"help": "Questioner nucleus sampling"})
    question_max_tokens: int = field(default=64, metadata={"help": "token cap of a question"})
    answer_max_tokens: int = field(default=96, metadata={"help": "token cap of a Roleplayer answer"})
    final_max_tokens: int = field(default=300, metadata={"help": "token cap of a model's final answer"})
    judge_max_tokens: int = field(default=200, metadata={"help": "token cap of a Judge's comparison"})
    n_bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples for the 95%% intervals"})
    baseline_dir: str = field(default="", metadata={
        "help": "another run on the same data whose eval/m0 can be reused (ablations share m0)"})
    ablation_dirs: list[str] = field(default_factory=list, metadata={
        "help": "evaluated ablation runs to put beside this run in the report"})
    seed: int = field(default=0, metadata={"help": "seeds the test pairs, lengths and sampling"})
    chunk_pairs: int = field(default=16, metadata={"help": "pairs simulated (and saved) together"})
    batch_size: int = field(default=32, metadata={"help": "sequences per generation or scoring batch"})
    cache_dir: str = field(default="cache", metadata={"help": "model cache and Judge call cache"})
    load_in_4bit: str = field(default="auto", metadata={
        "help": "4-bit NF4 local models: auto (when CUDA is present), yes, no", "choices": ["auto", "yes", "no"]})
    dtype: str = field(default="auto", metadata={
        "help": "weights of unquantized local models: auto (bfloat16 on a GPU or a CPU with native bf16 matmuls, "
                "else float32), bfloat16, float32", "choices": ["auto", "bfloat16", "float32"]})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom model code from the hub"})


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
    """What the final answers are (pair -> answer, after the pair's conversation): the share that is no answer
    at all (a question, a refusal, empty: roles.answer_problem). In the toy world also, over the task's relevant
    attributes, the share of values the user told that the answer names (`revealed_used`), and the share of
    attributes for which it names a value the user never told (`hallucinated`, a guess right or wrong)."""
    problems = [answer_problem(a) for a in answers.values()]
    result = {"no_answer": sum(p is not None for p in problems) / len(problems),
              **{f"no_answer_{kind}": sum(p == kind for p in problems) / len(problems)
                 for kind in ("question", "refusal", "empty")}}
    if world is not None:
        use = [world.answer_use(answers[k], conversations[k], pairs[k]["task"]) for k in sorted(answers)]
        result["revealed_used"] = sum(u["used"] for u in use) / max(1, sum(u["told"] for u in use))
        result["hallucinated"] = sum(u["hallucinated"] for u in use) / sum(u["attributes"] for u in use)
    return result


def gold_flags(run_dir) -> dict:
    """How often the Oracle's gold answer for a test pair was unusable (01_generate.py's check):
    at first, and still after its retries (those pairs are left out of the evaluation)."""
    gold = [g for g in read_jsonl(Path(run_dir) / "data" / "gold.jsonl", "gold") if g["split"] == "test"]
    return {"pairs": len(gold), "first_try": sum(g.get("attempts", 1) > 1 or bool(g.get("flag")) for g in gold) / len(gold),
            "left_out": sum(bool(g.get("flag")) for g in gold) / len(gold)}


def per_pair(records, reduce) -> dict:
    by_pair = {}
    for r in records:
        by_pair.setdefault((r["task_id"], r["persona_id"]), []).append(r["logprob"])
    return {k: reduce(v) for k, v in by_pair.items()}


def paired(new: dict, old: dict, n_boot: int) -> dict:
    diffs = [new[k] - old[k] for k in sorted(old)]
    return {"mean": sum(diffs) / len(diffs), "ci95": bootstrap_ci(diffs, n_boot), "n": len(diffs)}


def main():
    args = parse_args(Args)
    seed_everything(args.seed)
    out = Path(args.run_dir) / "eval"

    # Test pairs: a seeded sample, lengths balanced over 1 .. max_turns turns, the same for every model.
    if args.max_turns < 1:
        raise StepError("--max_turns must be at least 1")
    pairs = load_pairs(args.run_dir, "test")
    random.Random(args.seed).shuffle(pairs)
    pairs = sorted(pairs[:args.test_pairs], key=lambda p: (p["task_id"], p["persona_id"]))
    for i, p in enumerate(pairs):
        p["n_turns"] = 1 + i % args.max_turns
    by_pair = {(p["task_id"], p["persona_id"]): p for p in pairs}
    models = list(range(args.iterations + 1))
    for t in models[1:]:  # fail before any work if an adapter is missing
        if not (questioner_adapter(args.run_dir, t)[1] / "adapter_config.json").exists():
            raise StepError(f"{questioner_adapter(args.run_dir, t)[1]}: adapter of m{t} missing; run 04_train.py "
                            f"--iteration {t - 1} first (or lower --iterations)")
    if args.baseline_dir and not (out / "m0").exists() and (Path(args.baseline_dir) / "eval" / "m0").is_dir():
        shutil.copytree(Path(args.baseline_dir) / "eval" / "m0", out / "m0")

    pool = ModelPool(args.cache_dir, args.load_in_4bit, args.trust_remote_code, args.dtype)
    roleplayer = pool.chat(args.roleplayer)
    scorer = pool.local(args.questioner)
    base = pool.chat(args.questioner)

    cut = {}  # output file -> how many of its records come from a prompt cut to fit the context (metrics.json)

    def count_cut(name, records):
        cut[name] = sum(r.get("truncated", False) for r in records)

    def score(fields):
        """Gold log-prob after each record's dialogue, by Q_BASE (every adapter off), as in 03_select.py."""
        def make(_, chunk, keys):
            contexts = [answer_view(by_pair[k[:2]]["name"], by_pair[k[:2]]["task"], r["messages"])
                        for k, r in zip(keys, chunk)]
            results = scorer.score(contexts, [by_pair[k[:2]]["gold"] for k in keys], adapter=None,
                                   batch_size=args.batch_size)
            return [{f: r[f] for f in fields} | {"logprob": lp, "n_tokens": n, "truncated": c}
                    for r, (lp, n, c) in zip(chunk, results)]
        return make

    def answer(model, folder, name, convs):
        """A model's greedy final answer after each conversation (conv 0 of each pair)."""
        def make(_, chunk, keys):
            views = [answer_view(by_pair[k[:2]]["name"], by_pair[k[:2]]["task"], c["messages"]) for k, c in zip(keys, chunk)]
            texts = model.generate(views, max_new_tokens=args.final_max_tokens, temperature=0.0, batch_size=args.batch_size)
            return [{"task_id": k[0], "persona_id": k[1], "conv_id": k[2], "answer": a.strip(), "answerer": model.name,
                     "truncated": c} for k, a, c in zip(keys, texts, truncated(model, views, args.final_max_tokens))]
        keys = [(c["task_id"], c["persona_id"], c["conv_id"]) for c in convs]
        records = resumable(folder / name, "answer", convs, keys, args.chunk_pairs, f"{folder.name} {name}", make)
        count_cut(f"{folder.name}/{name}", records)
        return {k[:2]: r["answer"] for k, r in zip(keys, records)}

    # 1-3. Each model converses with the Roleplayer on every test pair, is scored, and answers.
    results = {}
    for t in models:
        folder = out / f"m{t}"
        questioner = pool.chat(args.questioner, adapter=questioner_adapter(args.run_dir, t))
        convs = simulate_pairs(questioner, roleplayer, pairs, args, t, folder / "conversations.jsonl", tag="test")
        keys = [(c["task_id"], c["persona_id"], c["conv_id"]) for c in convs]
        scores = resumable(folder / "scores.jsonl", "score", convs, keys, args.chunk_pairs * args.n_conversations,
                           f"m{t} scores", score(("task_id", "persona_id", "conv_id", "iteration", "n_turns")))
        count_cut(f"m{t}/conversations.jsonl", convs)
        count_cut(f"m{t}/scores.jsonl", scores)
        first = [c for c in convs if c["conv_id"] == 0]
        results[t] = {"convs": convs, "scores": scores, "answers": answer(questioner, folder, "answers.jsonl", first)}
        if t > 0:  # "m_t asks, m0 answers": is the gain in the questions or in the answer?
            results[t]["answers_m0"] = answer(base, folder, "answers_m0.jsonl", first)

    # Controls on m0 (Sec. 4.3): no conversation; the persona told outright (an upper bound); and m0's
    # conversation with a different persona on the same task (does the conversation carry persona info?).
    m0_first = {(c["task_id"], c["persona_id"]): c["messages"] for c in results[0]["convs"] if c["conv_id"] == 0}
    control_items, control_keys = [], []
    for k, p in by_pair.items():
        others = [o for o in by_pair if o[0] == k[0] and o[1] != k[1]] or [o for o in by_pair if o != k]
        reveal = [{"role": "assistant", "content": "Could you tell me about yourself?"},
                  {"role": "user", "content": p["bio"]}]
        for name, dialogue in (("no_conversation", []), ("persona_in_context", reveal),
                               ("other_persona", m0_first[others[0]] if others else [])):
            control_items.append({"task_id": k[0], "persona_id": k[1], "control": name, "messages": dialogue})
            control_keys.append((k[0], k[1], name))
    controls = resumable(out / "controls.jsonl", "control", control_items, control_keys, 3 * args.chunk_pairs,
                         "controls", score(("task_id", "persona_id", "control")))
    count_cut("controls.jsonl", controls)

    # 4. The Judge compares m_t's answer with m0's, in both orders (cached calls).
    # The verdict is parsed from the Judge's text. A local judge that wrote none (the embedded model rarely
    # does) gives it as the likelier of "Verdict: A" and "Verdict: B" after its own comparison.
    judge = pool.chat(args.judge, call_cache=Path(args.cache_dir) / "judge_calls.jsonl")
    judge_lm = pool.local(args.judge) if parse_spec(args.judge)[0] in ("embedded", "hf") else None

    def judged(folder, name, new: dict, old: dict):
        items, keys = [], []
        for k in sorted(new):
            p = by_pair[k]
            for order, (a, b) in (("new_first", (new[k], old[k])), ("new_second", (old[k], new[k]))):
                items.append([{"role": "system", "content": JUDGE_SYSTEM},
                              {"role": "user", "content": JUDGE_PROMPT.format(bio=p["bio"], task=p["task"], a=a, b=b)}])
                keys.append((k[0], k[1], order))

        def make(_, chunk, chunk_keys):
            texts = judge.generate(chunk, max_new_tokens=args.judge_max_tokens, temperature=0.0, batch_size=args.batch_size)
            records = [{"task_id": k[0], "persona_id": k[1], "order": k[2], "judge": judge.name, "output": text,
                        "verdict": parse_verdict(text), "truncated": c}
                       for k, text, c in zip(chunk_keys, texts, truncated(judge, chunk, args.judge_max_tokens))]
            if judge_lm is not None:  # a local judge: read the verdict off its next-token likelihoods
                ends = [f"{r['output']}\n\nVerdict: {x}" for r in records for x in "AB"]
                lps = judge_lm.score([p for p in chunk for _ in "AB"], ends, batch_size=args.batch_size)
                for r, (a, _, cut_a), (b, _, cut_b) in zip(records, lps[0::2], lps[1::2]):
                    r["logprob_A"], r["logprob_B"] = a, b
                    r["truncated"] = r["truncated"] or cut_a or cut_b
                    if r["verdict"] is None:
                        r["verdict"], r["verdict_source"] = "A" if a > b else "B" if b > a else None, "likelihood"
            return records
        records = resumable(folder / name, "judgment", items, keys, 2 * args.chunk_pairs, f"{folder.name} {name}", make)
        count_cut(f"{folder.name}/{name}", records)
        verdicts = {(r["task_id"], r["persona_id"], r["order"]): r["verdict"] for r in records}
        return [pair_outcome(verdicts[(*k, "new_first")], verdicts[(*k, "new_second")]) for k in sorted(new)]

    # 5. Metrics and report.
    mean_of = per_pair(results[0]["scores"], lambda v: sum(v) / len(v))
    no_conv = {(c["task_id"], c["persona_id"]): c["logprob"] for c in controls if c["control"] == "no_conversation"}
    select_args = Path(args.run_dir) / "iter0" / "args_03_select.json"
    metrics = {"run_dir": args.run_dir, "seed": args.seed, "provenance": provenance(), "questioner": args.questioner,
               "roleplayer": args.roleplayer,
               "judge": judge.name, "test_pairs": len(pairs), "n_conversations": args.n_conversations,
               "target": json.loads(select_args.read_text())["target"] if select_args.exists() else None,
               "controls": {name: sum(c["logprob"] for c in controls if c["control"] == name) / len(pairs)
                            for name in ("no_conversation", "persona_in_context", "other_persona")},
               "gold_flagged": gold_flags(args.run_dir),
               "conversation_value": paired(mean_of, no_conv, args.n_bootstrap),
               "min_detectable_effect": min_detectable_effect([mean_of[k] - no_conv[k] for k in mean_of]),
               "models": {}}
    for t in models:
        r = results[t]
        means = per_pair(r["scores"], lambda v: sum(v) / len(v))
        m = {"logprob_mean": sum(means.values()) / len(means),
             "logprob_best": sum(per_pair(r["scores"], max).values()) / len(means),
             "diagnostics": diagnostics(r["convs"], by_pair)}
        world = getattr(roleplayer, "world", None)  # the toy preset's scripted world, which knows what matters
        if world is not None:  # do the questions ask about what matters for the task?
            hits = [h for c in r["convs"] for h in world.hits(c["messages"], by_pair[(c["task_id"], c["persona_id"])]["task"])]
            m["diagnostics"]["attribute_hit_rate"] = sum(hits) / max(1, len(hits))
        dialogues = {(c["task_id"], c["persona_id"]): c["messages"] for c in r["convs"] if c["conv_id"] == 0}
        m["answers"] = answer_diagnostics(r["answers"], dialogues, by_pair, world)
        if t > 0:
            m["answers_m0"] = answer_diagnostics(r["answers_m0"], dialogues, by_pair, world)
        if t > 0:
            m["gain_over_m0"] = paired(means, mean_of, args.n_bootstrap)
            m["win_rate"] = win_rate(judged(out / f"m{t}", "judgments.jsonl", r["answers"], results[0]["answers"]),
                                     args.n_bootstrap, args.seed)
            m["asks_only"] = win_rate(judged(out / f"m{t}", "judgments_asks_only.jsonl", r["answers_m0"],
                                             results[0]["answers"]), args.n_bootstrap, args.seed)
        metrics["models"][f"m{t}"] = m
    metrics["truncated"] = dict(sorted(cut.items()))  # judgments are counted by judged(), above
    ablations = {Path(d).name: load_metrics(d) for d in args.ablation_dirs if load_metrics(d)}
    write_json_atomic(out / "metrics.json", metrics)
    write_report(out, metrics, ablations)
    record_args(out / "args_05_eval.json", args)
    summary = ", ".join(f"m{t} {metrics['models'][f'm{t}']['win_rate']['win_rate']}" for t in models[1:])
    print(f"05_eval: {len(pairs)} test pairs; win rate vs m0 (%): {summary or '-'}; {sum(cut.values())} "
          f"records made from a prompt cut to fit the context (metrics.json: truncated); report in {out / 'report.md'}")


if __name__ == "__main__":
    run_main(main)
