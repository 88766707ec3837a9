"""Step 5: evaluate m0 .. mT on held-out test pairs (Sec. 4.3 of the paper), and write the report.

Reads   the run's test pairs (01_generate.py) and the adapters <run_dir>/iter{t}/adapter of m1 .. mT;
        or, with --models NAME=SPEC ..., the named models instead, the first the baseline (m0 below) and Q_BASE
        (then eval/<NAME>/ for eval/m{t}/ below).
Writes  <run_dir>/eval/m{t}/conversations.jsonl  N test conversations per pair with m_t asking
        <run_dir>/eval/m{t}/scores.jsonl         gold log-prob of each (scored by Q_BASE)
        <run_dir>/eval/m{t}/answers.jsonl        m_t's greedy final answer after conversation 0 (after every
                                                 conversation with --judge_all_conversations)
        <run_dir>/eval/m{t}/answers_m0.jsonl     m0's answer after m_t's conversation ("m_t asks, m0 answers")
        <run_dir>/eval/m{t}/judgments*.jsonl     the Judge's verdicts, both orders, per answered conversation
        <run_dir>/eval/controls.jsonl            log-prob controls: no conversation, persona in context,
                                                 a conversation from a different persona
        <run_dir>/eval/metrics.json, report.md, winrate.png, logprob.png

Every model faces the same test pairs, conversation lengths (balanced over --min_turns .. --max_turns turns) and
random seeds, so differences come from the model. The test conversations go through training's dialogue loop
with the same simulation settings (stargate.simulate_pairs), and are scored by its reward (stargate.gold_logprob).
Unlike the paper, each comparison is judged in BOTH orders (position bias was large there): agreement is a
win or a loss, disagreement a tie; win rates and log-prob gains come with 95% bootstrap intervals that resample
the test tasks, then the pairs within them (a pair is a task x a persona: pairs of one task are not independent).
Judge calls are cached, so rerunning costs nothing.

    python 05_eval.py --run_dir runs/tiny --iterations 2 --n_conversations 3
    python 05_eval.py --run_dir runs/released --models m0=hf:mistralai/Mistral-7B-Instruct-v0.2 \
        m2=hf:scandukuri/mistral-stargate --roleplayer ... --judge openai:gpt-4   # the authors' released m2
"""

import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from metrics import answer_texts, measure
from models import ModelSettings, truncated
from report import load_metrics, write_report
from roles import JUDGE_PROMPT, JUDGE_SYSTEM, answer_view, parse_verdict
from specs import check_specs, parse_spec
from stargate import SimulationSettings, gold_logprob, questioner_adapter, simulate_pairs
from utils import (StepError, check_rerun, load_pairs, parse_args, record_args, record_key, resumable, run_main,
                   seed_everything, write_json_atomic)

PROMPTED = ("questioner", "roleplayer", "judge")  # roles.py's prompts this step's outputs depend on


@dataclass
class Args:
    run_dir: str = field(default="runs/tiny", metadata={"help": "folder of this run"})
    iterations: int = field(default=2, metadata={"help": "T: evaluate m0 .. mT (paper: 3)"})
    questioner: str = field(default="embedded", metadata={
        "help": "Q_BASE model spec; openai:<base model>@<url>: m_t asks and Q_BASE scores on that server, with "
                "--tokenizer (docs/CLUSTER.md)"})
    roleplayer: str = field(default="embedded", metadata={
        "help": "Roleplayer for the test conversations; may differ from training (generalisation test)"})
    judge: str = field(default="embedded", metadata={"help": "Judge model spec (paper: GPT-4)"})
    n_conversations: int = field(default=10, metadata={"help": "N test conversations per pair for the log-probs"})
    test_pairs: int = field(default=300, metadata={"help": "test pairs used, at most (paper: 300 of 500)"})
    final_max_tokens: int = field(default=300, metadata={"help": "token cap of a model's final answer"})
    judge_max_tokens: int = field(default=200, metadata={"help": "token cap of a Judge's comparison"})
    n_bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples for the 95%% intervals"})
    judge_all_conversations: bool = field(default=False, metadata={
        "help": "every model answers after each of its N test conversations and the Judge compares each answer "
                "with m0's after the conversation of the same number (default: conversation 0 of each pair)"})
    n_examples: int = field(default=3, metadata={
        "help": "test pairs shown side by side in the report (the first by id): m0's and m_T's conversation 0"})
    baseline_dir: str = field(default="", metadata={
        "help": "another run on the same data whose eval/m0 can be reused (ablations share m0)"})
    models: list[str] = field(default_factory=list, metadata={
        "help": "NAME=SPEC ...: evaluate these models instead of the run's m0 .. mT (--iterations and --questioner "
                "are then not used). The first is the baseline every other is judged against, and Q_BASE (it scores "
                "the gold log-probs); each a full model spec: embedded, hf:<hub id or path> (loaded as the model "
                "settings say, 4-bit included), openai:<model>@<url> (served)"})
    ablation_dirs: list[str] = field(default_factory=list, metadata={
        "help": "evaluated ablation runs to put beside this run in the report"})
    seed: int = field(default=0, metadata={"help": "seeds the test pairs, lengths and sampling"})
    chunk_pairs: int = field(default=16, metadata={"help": "pairs simulated (and saved) together"})
    batch_size: int = field(default=32, metadata={"help": "sequences per generation or scoring batch"})
    overwrite: bool = field(default=False, metadata={
        "help": "redo the evaluation even if it exists (a rerun with other settings stops otherwise)"})


def models_to_evaluate(args) -> list[tuple[str, str, tuple | None]]:
    """(name, spec, adapter) of each model, the baseline first: the run's own m0 .. mT (Q_BASE, then Q_BASE with
    the adapter 04_train.py wrote at each iteration), or the models --models names, each loaded as its spec says."""
    if not args.models:
        for t in range(1, args.iterations + 1):  # fail before any work if an adapter is missing
            if not (questioner_adapter(args.run_dir, t)[1] / "adapter_config.json").exists():
                raise StepError(f"{questioner_adapter(args.run_dir, t)[1]}: adapter of m{t} missing; run 04_train.py "
                                f"--iteration {t - 1} first (or lower --iterations)")
        return [(f"m{t}", args.questioner, questioner_adapter(args.run_dir, t)) for t in range(args.iterations + 1)]
    named = []
    for item in args.models:
        name, _, spec = item.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not spec:
            raise StepError(f"--models {item!r}: expected NAME=SPEC, NAME of letters, digits, '_', '.' or '-' "
                            "(it names the model's folder eval/NAME)")
        if parse_spec(spec)[0] not in ("embedded", "hf", "openai"):
            raise StepError(f"--models {item!r}: {spec!r} is not a model (use embedded, hf:..., openai:...)")
        if name in [n for n, _, _ in named]:
            raise StepError(f"--models: the name {name!r} is given twice")
        named.append((name, spec, None))
    if len(named) < 2:
        raise StepError("--models needs at least two models: the baseline first, then one to judge against it")
    return named


def sample_test_pairs(run_dir, n: int, seed: int, sim: SimulationSettings) -> list[dict]:
    """The test pairs every model faces: a seeded sample of n, sorted by ids, each with its number of turns,
    balanced over min_turns .. max_turns."""
    pairs = load_pairs(run_dir, "test", usable_only=True)  # as in training: no gold answer, no log-prob
    random.Random(seed).shuffle(pairs)
    pairs = sorted(pairs[:n], key=lambda p: (p["task_id"], p["persona_id"]))
    for i, p in enumerate(pairs):
        p["n_turns"] = sim.min_turns + i % (sim.max_turns - sim.min_turns + 1)
    return pairs


def scored(scorer, by_pair, records, fields, batch_size) -> list[dict]:
    """The given fields of each record, with the gold log-prob after its dialogue (03's reward, by Q_BASE)."""
    results = gold_logprob(scorer, [by_pair[(r["task_id"], r["persona_id"])] for r in records],
                           [r["messages"] for r in records], batch_size)
    return [{f: r[f] for f in fields} | {"logprob": lp, "n_tokens": n, "truncated": c}
            for r, (lp, n, c) in zip(records, results)]


def simulate_and_score(questioner, roleplayer, scorer, pairs, by_pair, args, sim_args, t, folder):
    """The N test conversations per pair of the t-th model (m_t), through the dialogue loop of training (tag "test":
    every model faces the same random draws), and the gold log-prob of each. Returns (conversations, scores)."""
    convs = simulate_pairs(questioner, roleplayer, pairs, sim_args, n_conversations=args.n_conversations,
                           seed=args.seed, batch_size=args.batch_size, chunk_pairs=args.chunk_pairs, iteration=t,
                           final=folder / "conversations.jsonl", tag="test", desc=f"{folder.name} conversations")
    fields = ("task_id", "persona_id", "conv_id", "iteration", "n_turns")
    scores = resumable(folder / "scores.jsonl", "score", convs, [record_key("conversation", c) for c in convs],
                       args.chunk_pairs * args.n_conversations, f"{folder.name} scores",
                       lambda _, chunk, keys: scored(scorer, by_pair, chunk, fields, args.batch_size))
    return convs, scores


def final_answers(model, by_pair, convs, args, path: Path) -> list[dict]:
    """A model's greedy final answer after each of the given conversations, asked as in 03."""
    def make(_, chunk, keys):
        views = [answer_view(by_pair[k[:2]]["name"], by_pair[k[:2]]["task"], c["messages"])
                 for k, c in zip(keys, chunk)]
        texts = model.generate(views, max_new_tokens=args.final_max_tokens, temperature=0.0, batch_size=args.batch_size)
        return [{"task_id": k[0], "persona_id": k[1], "conv_id": k[2], "answer": a.strip(), "answerer": model.name,
                 "truncated": c} for k, a, c in zip(keys, texts, truncated(model, views, args.final_max_tokens))]
    keys = [record_key("conversation", c) for c in convs]
    return as_asked(path, "answer", keys,
                    resumable(path, "answer", convs, keys, args.chunk_pairs, f"{path.parent.name} {path.name}", make))


def as_asked(path: Path, kind: str, keys: list[tuple], records: list[dict]) -> list[dict]:
    """The records, checked to be the ones asked for: a file written with another --judge_all_conversations
    is an error, never reused in silence."""
    if sorted(record_key(kind, r) for r in records) != sorted(keys):
        raise StepError(f"{path}: holds {len(records)} records, not the {len(keys)} this evaluation asks for "
                        f"(written with another --judge_all_conversations?); remove it or use another --run_dir")
    return records


def controls(scorer, by_pair, m0_convs, args, path: Path) -> list[dict]:
    """Log-prob controls on m0 (Sec. 4.3): no conversation; the persona told outright (an upper bound); and
    m0's conversation with a different persona on the same task (does the conversation carry persona info?)."""
    m0_first = {(c["task_id"], c["persona_id"]): c["messages"] for c in m0_convs if c["conv_id"] == 0}
    items, keys = [], []
    for k, p in by_pair.items():
        others = [o for o in by_pair if o[0] == k[0] and o[1] != k[1]] or [o for o in by_pair if o != k]
        reveal = [{"role": "assistant", "content": "Could you tell me about yourself?"},
                  {"role": "user", "content": p["bio"]}]
        for name, dialogue in (("no_conversation", []), ("persona_in_context", reveal),
                               ("other_persona", m0_first[others[0]] if others else [])):
            items.append({"task_id": k[0], "persona_id": k[1], "control": name, "messages": dialogue})
            keys.append((k[0], k[1], name))
    return resumable(path, "control", items, keys, 3 * args.chunk_pairs, "controls",
                     lambda _, chunk, _keys: scored(scorer, by_pair, chunk, ("task_id", "persona_id", "control"),
                                                    args.batch_size))


def judge_both_orders(judge, judge_lm, by_pair, new: dict, old: dict, args, path: Path) -> list[dict]:
    """The Judge compares each new answer (m_t's) with the old one (m0's) after the conversation of the same pair
    and number, in both orders (cached calls). new, old: (task_id, persona_id, conv_id) -> answer.

    The verdict is parsed from the Judge's text. A local judge that wrote none (the embedded model rarely
    does) gives it as the likelier of "Verdict: A" and "Verdict: B" after its own comparison (judge_lm).
    """
    items, keys = [], []
    for k in sorted(new):
        p = by_pair[k[:2]]
        for order, (a, b) in (("new_first", (new[k], old[k])), ("new_second", (old[k], new[k]))):
            items.append([{"role": "system", "content": JUDGE_SYSTEM},
                          {"role": "user", "content": JUDGE_PROMPT.format(bio=p["bio"], task=p["task"], a=a, b=b)}])
            keys.append((*k, order))

    def make(_, chunk, chunk_keys):
        texts = judge.generate(chunk, max_new_tokens=args.judge_max_tokens, temperature=0.0, batch_size=args.batch_size)
        records = [{"task_id": k[0], "persona_id": k[1], "conv_id": k[2], "order": k[3], "judge": judge.name,
                    "output": text, "verdict": parse_verdict(text), "truncated": c}
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
    return as_asked(path, "judgment", keys, resumable(path, "judgment", items, keys, 2 * args.chunk_pairs,
                                                      f"{path.parent.name} {path.name}", make))


def win_rate_summary(measured: dict) -> str:
    """'m1 53.3, m2 no verdict': each trained model's win rate, rounded as in the report."""
    rates = {name: m["win_rate"]["win_rate"] for name, m in measured["models"].items() if "win_rate" in m}
    return ", ".join(f"{name} {'no verdict' if rate is None else f'{rate:.1f}'}"
                     for name, rate in rates.items()) or "-"


def ablation_metrics(ablation_dirs: list[str]) -> dict:
    """Run folder name -> metrics.json of each evaluated ablation run (--ablation_dirs); one not evaluated yet is an
    error, never left out of the report in silence."""
    for folder in ablation_dirs:
        if load_metrics(folder) is None:
            raise StepError(f"--ablation_dirs {folder}: {Path(folder) / 'eval' / 'metrics.json'}: file not found; "
                            "evaluate that run first (05_eval.py --run_dir <it> --baseline_dir <this run>)")
    return {Path(folder).name: load_metrics(folder) for folder in ablation_dirs}


def report_only(out: Path, ablations: dict):
    """A finished evaluation's rerun: its metrics stand; with --ablation_dirs (ablations: their metrics) the report
    is written again with them beside it, and otherwise left as it is (an ablation section it has stays)."""
    measured = json.loads((out / "metrics.json").read_text())
    if ablations:
        write_report(out, measured, ablations)
    kept = "written again with the ablations beside it" if ablations else "kept as it was"
    print(f"05_eval: {out} is complete (win rate vs m0 (%): {win_rate_summary(measured)}); report {kept}: "
          f"{out / 'report.md'} (--overwrite evaluates again)")


def main():
    args, sim_args, model_args = parse_args(Args, SimulationSettings, ModelSettings)
    seed_everything(args.seed)
    out = Path(args.run_dir) / "eval"
    check_specs(questioner=args.questioner, roleplayer=args.roleplayer, judge=args.judge)
    check_rerun(out / "args_05_eval.json", sorted(out.glob("*")), args.overwrite, args, sim_args, model_args,
                prompts=PROMPTED)
    ablations = ablation_metrics(args.ablation_dirs)  # checked before any work
    if (out / "metrics.json").exists():  # finished: no model is loaded, nothing is recomputed
        report_only(out, ablations)
        return
    pairs = sample_test_pairs(args.run_dir, args.test_pairs, args.seed, sim_args)
    by_pair = {(p["task_id"], p["persona_id"]): p for p in pairs}
    models = models_to_evaluate(args)  # (name, spec, adapter), the baseline m0 first
    if args.baseline_dir and not (out / "m0").exists() and (Path(args.baseline_dir) / "eval" / "m0").is_dir():
        shutil.copytree(Path(args.baseline_dir) / "eval" / "m0", out / "m0")
    record_args(out / "args_05_eval.json", args, sim_args, model_args, prompts=PROMPTED)

    pool = model_args.pool()
    roleplayer = pool.chat(args.roleplayer)
    scorer = pool.scorer(models[0][1])  # Q_BASE: the baseline's model, without adapter
    base = pool.chat(models[0][1], questioner=True)

    # 1-3. Each model converses with the Roleplayer on every test pair, is scored, and answers after its first
    # conversation (or each); from m1 on, m0 answers after it too ("m_t asks, m0 answers": questions or answer?).
    results = {}
    for t, (name, spec, adapter) in enumerate(models):
        folder = out / name
        questioner = pool.chat(spec, adapter=adapter, questioner=True)
        convs, scores = simulate_and_score(questioner, roleplayer, scorer, pairs, by_pair, args, sim_args, t, folder)
        answered = [c for c in convs if args.judge_all_conversations or c["conv_id"] == 0]
        results[name] = {"conversations": convs, "scores": scores,
                         "answers": final_answers(questioner, by_pair, answered, args, folder / "answers.jsonl")}
        if t > 0:
            results[name]["answers_m0"] = final_answers(base, by_pair, answered, args, folder / "answers_m0.jsonl")
    baseline = results[models[0][0]]
    control_scores = controls(scorer, by_pair, baseline["conversations"], args, out / "controls.jsonl")

    # 4. The Judge compares m_t's answer, and m0's after m_t's conversation, with m0's own, in both orders.
    judge = pool.chat(args.judge, call_cache=Path(model_args.cache_dir) / "judge_calls.jsonl")
    judge_lm = pool.local(args.judge) if parse_spec(args.judge)[0] in ("embedded", "hf") else None
    m0_answers = answer_texts(baseline["answers"])
    for name, _, _ in models[1:]:
        folder, files = out / name, results[name]
        files["judgments"] = judge_both_orders(judge, judge_lm, by_pair, answer_texts(files["answers"]), m0_answers,
                                               args, folder / "judgments.jsonl")
        files["judgments_asks_only"] = judge_both_orders(judge, judge_lm, by_pair, answer_texts(files["answers_m0"]),
                                                         m0_answers, args, folder / "judgments_asks_only.jsonl")

    # 5. Metrics (metrics.py: win rates, log-prob gains, their intervals, diagnostics) and the report (report.py).
    measured = measure(args, by_pair, models, results, control_scores, judge.name, getattr(roleplayer, "world", None))
    write_json_atomic(out / "metrics.json", measured)
    write_report(out, measured, ablations)
    print(f"05_eval: {len(pairs)} test pairs; win rate vs {models[0][0]} (%): {win_rate_summary(measured)}; "
          f"{sum(measured['truncated'].values())} records made from a prompt cut to fit the context "
          f"(metrics.json: truncated); report in {out / 'report.md'}")


if __name__ == "__main__":
    run_main(main)
