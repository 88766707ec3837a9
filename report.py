"""Plumbing for 05_eval.py: the report files (report.md and two plots) from metrics.json (metrics.py computes it),
and the README's results tables from several runs' metrics.json (`python report.py RUN ...`).

The paper's published numbers (PAPER, from Andukuri et al. 2024) are kept here so that the report can put ours
beside them.
"""

import json
import os
import re
from pathlib import Path

from utils import write_text_atomic

PAPER = {  # Andukuri et al. 2024, test set; the paper's numbers, not ours
    "win_rate": {1: 69.9, 2: 72.2, 3: 65.2},
    "logprob_mean": {0: -359.8, 1: -350.9, 2: -344.7, 3: -339.2},
    "logprob_best": {0: -331.3, 1: -321.2, 2: -312.0, 3: -305.0},
    "controls": {"no_conversation": -367.5, "persona_in_context": -267.5, "other_persona": -370.0},
    "ablations": {"gold": {1: 44.1, 2: 51.8, 3: 54.2}, "none": {1: 25.4, 2: 20.3, 3: 20.5},
                  "mt_asks_m0_answers": {1: 53.8, 2: 53.6, 3: 49.6}},
}


def fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def pct(value):
    return "-" if value is None else f"{100 * value:.0f}%"


def fmt_ci(ci, digits=1):
    return "-" if ci[0] is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def model_index(name: str) -> int | None:
    """t of a model named m<t> (the paper's numbers are by iteration); None for another name."""
    return int(name[1:]) if re.fullmatch(r"m\d+", name) else None


def paper(measure: str, name: str) -> float | None:
    """The paper's number for a measure of the model named m<t> (PAPER), if it has one."""
    return PAPER[measure].get(model_index(name))


def design_ci(measure: dict) -> list:
    """The 95% interval that fits the design, resampling tasks and then their pairs (cluster_bootstrap_ci); an older
    metrics.json has only the interval over pairs (use fmt_design_ci to show which)."""
    return measure.get("ci95_cluster", measure["ci95"])


def fmt_design_ci(measure: dict, digits=1) -> str:
    return fmt_ci(design_ci(measure), digits) + ("" if "ci95_cluster" in measure else " (pairs)")


def cell(text: str) -> str:
    """Text for one cell of a markdown table: no column breaks, line breaks as <br>."""
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "(empty)"


OUTCOME = {1.0: "wins", 0.5: "ties", 0.0: "loses", None: "unparseable"}


def examples_section(metrics: dict) -> list[str]:
    """The report's side-by-side examples (metrics.side_by_side): per test pair, the two models' conversation 0 turn
    by turn, their final answers, and the Judge's verdicts on them."""
    if not metrics.get("examples"):
        return []
    old, new = list(metrics["examples"][0]["models"])
    lines = ["", f"## What changed: {old} and {new} side by side", "",
             f"The first {len(metrics['examples'])} test pairs by id (task_id, then persona_id), never picked by hand: "
             f"conversation 0 of each model, its final answer after it, and the Judge's verdicts ({new}'s answer "
             f"shown first, then second; a win needs both)."]
    for e in metrics["examples"]:
        lines += ["", f"### {e['task_id']} x {e['persona_id']}: {e['task']}", "", f"Persona: {e['bio']}", "",
                  f"| | {old} | {new} |", "|---|---|---|"]
        dialogues = [e["models"][m]["messages"] for m in (old, new)]
        for i in range(max(len(d) for d in dialogues)):
            said = [d[i] if i < len(d) else None for d in dialogues]
            role = next(m["role"] for m in said if m)
            who = f"Questioner, turn {i // 2 + 1}" if role == "assistant" else "Roleplayer"
            lines.append(f"| {who} | " + " | ".join(cell(m["content"]) if m else "" for m in said) + " |")
        lines.append("| final answer | " + " | ".join(cell(e["models"][m]["answer"]) for m in (old, new)) + " |")
        first, second = (e["verdicts"][o] or "none" for o in ("new_first", "new_second"))
        lines += ["", f"Judge: {first} with {new}'s answer shown as A, {second} with it shown as B: "
                      f"**{new} {OUTCOME[e['outcome']]}**. Its words, {new}'s answer as A: "
                      f"\"{cell(e['judge_outputs']['new_first'])}\""]
    return lines


def write_report(folder: Path, metrics: dict, ablations: dict[str, dict]):
    """report.md (our numbers beside the paper's) and two PNG plots, in `folder`."""
    models = list(metrics["models"])  # their names, the baseline m0 first
    if metrics.get("named_models"):  # 05_eval.py --models: each model as its spec, the first the baseline
        specs = ", ".join(f"{name} = {metrics['models'][name]['spec']}" for name in models)
        asking = f"models {specs} (the first is the baseline, m0 below, and Q_BASE)"
    else:
        asking = f"Questioner {metrics['questioner']}"
    lines = [f"# STaR-GATE evaluation: {metrics['run_dir']}", "",
             f"{metrics['test_pairs']} test pairs x {metrics['n_conversations']} conversations per model, the final "
             f"answers after {metrics.get('judged_per_pair', 1)} of them per pair judged; "
             f"{asking}, Roleplayer {metrics['roleplayer']}, Judge {metrics['judge']}.",
             "Columns marked *paper* are the paper's published numbers (Mistral-7B, GPT-4 judge), not ours.", "",
             "## Win rate against m0 (each comparison judged in both orders; disagreement = tie)", "",
             "95% intervals: tasks resampled, then pairs within them (cluster bootstrap), and pairs alone.", "",
             "| model | win rate % | 95% CI | 95% CI, pairs alone | wins / ties / losses | unparseable "
             "| order consistency | m_t asks, m0 answers % | *paper* |", "|---|---|---|---|---|---|---|---|---|"]
    for model in models[1:]:
        m = metrics["models"][model]
        w, a = m["win_rate"], m["asks_only"]
        lines.append(f"| {model} | {fmt(w['win_rate'])} | {fmt_design_ci(w)} | {fmt_ci(w['ci95'])} "
                     f"| {w['wins']} / {w['ties']} / {w['losses']} | {w['unparseable']} "
                     f"| {fmt(w['order_consistency'], 2)} | {fmt(a['win_rate'])} {fmt_design_ci(a)} "
                     f"| *{fmt(paper('win_rate', model))}* |")
    scripted = str(metrics["judge"]).startswith("scripted:")
    lines += ["", "Order consistency: the share of pairs decided alike in both orders (a win or a loss); a tie lowers "
              "it, whether the answers were equally good or the Judge contradicted itself"
              + (". The scripted Judge never depends on the order: all its ties are answers it scores equal."
                 if scripted else "."),
              "", "## Gold-response log-prob (summed, scored by Q_BASE)", "",
              "| model | mean of N | best of N | m_t - m0 (per pair, mean of N) | 95% CI (tasks, then pairs) "
              "| 95% CI, pairs alone | *paper mean* | *paper best* |", "|---|---|---|---|---|---|---|---|"]
    for model in models:
        m = metrics["models"][model]
        d = m.get("gain_over_m0", {})
        lines.append(f"| {model} | {fmt(m['logprob_mean'])} | {fmt(m['logprob_best'])} | {fmt(d.get('mean'), 2)} "
                     f"| {fmt_design_ci(d, 2) if d else '-'} | {fmt_ci(d.get('ci95', [None, None]), 2)} "
                     f"| *{fmt(paper('logprob_mean', model))}* "
                     f"| *{fmt(paper('logprob_best', model))}* |")
    c = metrics["controls"]
    lines += ["", "| control (m0) | ours | *paper* |", "|---|---|---|"]
    for key, label in (("no_conversation", "no conversation"),
                       ("persona_in_context", "persona in context (upper bound)"),
                       ("other_persona", "conversation from a different persona")):
        lines.append(f"| {label} | {fmt(c[key])} | *{fmt(PAPER['controls'][key])}* |")
    v = metrics["conversation_value"]
    lines += ["", f"Value of m0's conversation (m0 mean minus no conversation, per pair): {fmt(v['mean'], 2)} nats, "
              f"95% CI {fmt_ci(v['ci95'], 2)}. With {metrics['test_pairs']} test pairs the smallest gain a paired test "
              f"detects (80% power) is about {fmt(metrics['min_detectable_effect'], 2)} nats.", ""]
    if "gold_flagged" in metrics:
        g = metrics["gold_flagged"]
        lines += [f"Oracle gold answers of the test pairs flagged as refusal, empty or a loop: "
                  f"{fmt(100 * g['first_try'])}% at first, {fmt(100 * g['left_out'])}% still after retries "
                  f"(left out) of {g['pairs']}.", ""]
    lines += ["## Questions asked (diagnostics)", "",
              "| model | questions / conversation | question share of turns | words per question "
              "| answered instead of asking | Roleplayer leaked persona | empty turns |",
              "|---|---|---|---|---|---|---|"]
    for model in models:
        q = metrics["models"][model]["diagnostics"]
        lines.append(f"| {model} | {fmt(q['questions_per_conversation'], 2)} | {fmt(q['question_rate'], 2)} "
                     f"| {fmt(q['words_per_question'])} | {fmt(q['answered_instead'], 2)} "
                     f"| {fmt(q['persona_leak'], 2)} | {q['empty_turns']} |")
    if "attribute_hit_rate" in metrics["models"][models[0]]["diagnostics"]:  # the toy preset's scripted world
        lines += ["", "Toy world: share of Questioner turns that ask about an attribute the task depends on: "
                  + ", ".join(f"{model} {fmt(metrics['models'][model]['diagnostics']['attribute_hit_rate'], 2)}"
                              for model in models) + "."]
    lines += ["", "## Final answers (diagnostics)", "",
              "What each model's final answer after conversation 0 is: no answer at all (a question, a refusal, "
              "empty)" + (", and in the toy world: the share of the values the user told that it names, and the "
              "share of the task's attributes for which it names a value the user never told (a guess)."
              if "revealed_used" in metrics["models"][models[0]].get("answers", {}) else "."), "",
              "| model | no answer | question / refusal / empty | revealed values used | values never told "
              "| m0 answering after m_t's conversation: no answer, used, never told |", "|---|---|---|---|---|---|"]
    for model in models:
        m = metrics["models"][model]
        a, b = m.get("answers"), m.get("answers_m0")
        if a is None:
            continue
        kinds = " / ".join(fmt(100 * a[f"no_answer_{k}"], 0) + "%" for k in ("question", "refusal", "empty"))
        other = "-" if b is None else (f"{fmt(100 * b['no_answer'], 0)}%, {pct(b.get('revealed_used'))}, "
                                       f"{pct(b.get('hallucinated'))}")
        lines.append(f"| {model} | {fmt(100 * a['no_answer'], 0)}% | {kinds} | {pct(a.get('revealed_used'))} "
                     f"| {pct(a.get('hallucinated'))} | {other} |")
    if ablations:
        # Each ablation beside this run: its win rate and its gold log-prob gain against the same m0.
        later = models[1:]
        lines += ["", "## Ablations (against the same m0)", "",
                  "| run | " + " | ".join(f"{m} win rate % [95% CI]" for m in later) + " | "
                  + " | ".join(f"{m} - m0 log-prob, 95% CI" for m in later) + " | "
                  + " | ".join(f"{m} no answer / values never told" for m in later) + " | *paper win rate* |",
                  "|---|" + "---|" * (3 * len(later)) + "---|"]
        runs = {Path(metrics["run_dir"]).name: dict(metrics, target="own"), **ablations}
        for name, other in runs.items():
            target = other.get("target", name)
            found = [other["models"].get(m, {}) for m in later]
            wins = [f"{fmt(m['win_rate']['win_rate'])} {fmt_design_ci(m['win_rate'])}" if "win_rate" in m else "-"
                    for m in found]
            answers = [f"{pct(m['answers']['no_answer'])} / {pct(m['answers'].get('hallucinated'))}"
                       if "answers" in m else "-" for m in found]
            gains = [f"{fmt(m['gain_over_m0']['mean'], 2)} {fmt_design_ci(m['gain_over_m0'], 2)}"
                     if "gain_over_m0" in m else "-" for m in found]
            rates = PAPER["win_rate"] if target == "own" else PAPER["ablations"].get(target, {})
            numbers = ", ".join(fmt(rates.get(model_index(model))) for model in models[1:])
            lines.append(f"| {name} (target {target}) | " + " | ".join(wins + gains + answers) + f" | *{numbers}* |")
    lines += examples_section(metrics)
    lines += ["", "![win rate](winrate.png)", "", "![gold log-prob](logprob.png)", ""]
    write_text_atomic(folder / "report.md", "\n".join(lines))
    plot(folder, metrics, models)


def plot(folder: Path, metrics: dict, models: list[str]):
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ts = list(range(1, len(models)))  # positions, labelled with the models' names
    rates = [metrics["models"][model]["win_rate"] for model in models[1:]]
    ys = [r["win_rate"] if r["win_rate"] is not None else float("nan") for r in rates]
    cis = [design_ci(r) for r in rates]
    err = [[y - ci[0] if ci[0] is not None else 0 for y, ci in zip(ys, cis)],
           [ci[1] - y if ci[1] is not None else 0 for y, ci in zip(ys, cis)]]
    ax.errorbar(ts, ys, yerr=err, marker="o", capsize=4, label="ours (95% CI)")
    ax.plot(ts, [paper("win_rate", model) or float("nan") for model in models[1:]], "s--", color="gray", label="paper")
    ax.axhline(50, color="black", lw=0.8)
    ax.set(xlabel="model", ylabel="win rate vs m0 (%)", ylim=(0, 100), xticks=ts, xticklabels=models[1:])
    ax.legend()
    fig.tight_layout()
    save_figure(fig, folder / "winrate.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(len(models)), [metrics["models"][model]["logprob_mean"] for model in models], "o-", label="mean of N")
    ax.plot(range(len(models)), [metrics["models"][model]["logprob_best"] for model in models], "o-", label="best of N")
    styles = {"no_conversation": ":", "persona_in_context": "--", "other_persona": "-."}
    for key, style in styles.items():
        ax.axhline(metrics["controls"][key], ls=style, color="gray", lw=1, label=key.replace("_", " "))
    ax.set(xlabel="model m_t", ylabel="gold log-prob (nats)", xticks=range(len(models)), xticklabels=models)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, folder / "logprob.png")
    plt.close(fig)


def save_figure(fig, path: Path):
    """fig as a PNG file written beside, then renamed (as utils' atomic writes): never half a plot."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)


def load_metrics(run_dir) -> dict | None:
    path = Path(run_dir) / "eval" / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


# --- Results tables for the README, generated from runs' metrics.json -----------------------------------


# Two-sided 95% quantiles of Student's t by degrees of freedom: the interval of a mean over a few seeds.
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def across_seeds(values: list[float]) -> tuple[float, list]:
    """Mean over runs (one per seed) and its 95% t-interval: the seed-to-seed spread, training's noise included,
    which an interval over one run's test pairs does not see."""
    n, mean = len(values), sum(values) / len(values)
    if n < 2:
        return mean, [None, None]
    half = T95.get(n - 1, 1.96) * (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5
    return mean, [mean - half, mean + half]


def results_table(runs: list[str]) -> str:
    """Markdown tables of evaluated runs (one per seed, say): per run the method's trained models beside m0, a
    row of their mean over the runs, then the ablations (the folders <run>-gold and <run>-none, where evaluated),
    each cell from the runs' metrics.json, stamped with the commit and machine the numbers came from."""
    found = [(run, load_metrics(run)) for run in runs]
    missing = [run for run, m in found if m is None]
    if missing:
        raise SystemExit(f"error: {missing[0]}/eval/metrics.json: file not found; run 05_eval.py (run_all.sh) first")
    lines = ["| run | seed | model | win rate vs m0 % [95% CI] | wins / ties / losses | m_t asks, m0 answers % "
             "| gold log-prob m_t - m0 [95% CI] | questions (about a relevant attribute), m0 -> m_t | no answer "
             "| revealed values used, m0 -> m_t | values never told | *paper win rate* |", "|---" * 12 + "|"]
    ablation_lines, per_model = [], {}
    for run, metrics in found:
        m0 = metrics["models"]["m0"]
        for name, m in sorted(metrics["models"].items()):
            if name == "m0":
                continue
            q, a, w, asks, gain = m["diagnostics"], m["answers"], m["win_rate"], m["asks_only"], m["gain_over_m0"]
            questions = " -> ".join(pct(d["question_rate"]) + (f" ({pct(d['attribute_hit_rate'])})"
                                                               if "attribute_hit_rate" in d else "")
                                    for d in (m0["diagnostics"], q))
            per_model.setdefault(name, []).append((w, asks, gain))
            lines.append(
                f"| {run} | {metrics.get('seed', '-')} | {name} | {fmt(w['win_rate'])} {fmt_design_ci(w)} "
                f"| {w['wins']} / {w['ties']} / {w['losses']} | {fmt(asks['win_rate'])} "
                f"| {fmt(gain['mean'], 2)} {fmt_design_ci(gain, 2)} | {questions} | {pct(a.get('no_answer'))} "
                f"| {pct(m0['answers'].get('revealed_used'))} -> {pct(a.get('revealed_used'))} "
                f"| {pct(a.get('hallucinated'))} | *{fmt(paper('win_rate', name))}* |")
        for target in ("gold", "none"):
            other = load_metrics(f"{run}-{target}")
            if other is None:
                continue
            for name, m in sorted(other["models"].items()):
                if name == "m0":
                    continue
                a, w, gain = m.get("answers", {}), m["win_rate"], m["gain_over_m0"]
                ablation_lines.append(
                    f"| {run}-{target} | {other.get('seed', '-')} | {target} | {name} | {fmt(w['win_rate'])} "
                    f"{fmt_design_ci(w)} | {fmt(gain['mean'], 2)} {fmt_design_ci(gain, 2)} "
                    f"| {pct(a.get('no_answer'))} | {pct(a.get('hallucinated'))} "
                    f"| *{fmt(PAPER['ablations'][target].get(model_index(name)))}* |")
    if len(found) > 1:
        for name, rows in sorted(per_model.items()):
            win, win_ci = across_seeds([w["win_rate"] for w, _, _ in rows])
            asks, _ = across_seeds([asks["win_rate"] for _, asks, _ in rows])
            gain, gain_ci = across_seeds([gain["mean"] for _, _, gain in rows])
            tally = " / ".join(str(sum(w[key] for w, _, _ in rows)) for key in ("wins", "ties", "losses"))
            # How many runs show the effect on their own: each run's interval (tasks, then pairs) above no effect.
            wins_clear = sum((design_ci(w)[0] or 0) > 50 for w, _, _ in rows)
            gains_clear = sum((design_ci(g)[0] or 0) > 0 for _, _, g in rows)
            lines.append(f"| mean of {len(rows)} runs | - | {name} | {fmt(win)} {fmt_ci(win_ci)}; "
                         f"{wins_clear} of {len(rows)} above 50 | {tally} | {fmt(asks)} | {fmt(gain, 2)} "
                         f"{fmt_ci(gain_ci, 2)}; {gains_clear} of {len(rows)} above 0 | | | | "
                         f"| *{fmt(paper('win_rate', name))}* |")
    if ablation_lines:
        lines += ["", "| run | seed | trained on | model | win rate vs m0 % [95% CI] | gold log-prob m_t - m0 [95% CI] "
                  "| no answer | values never told | *paper win rate* |", "|---|---|---|---|---|---|---|---|---|"]
        lines += ablation_lines
    stamps = sorted({(m["provenance"]["commit"] + ("+changes" if m["provenance"]["uncommitted_changes"] else ""),
                      m["provenance"]["machine"], m["provenance"]["date"]) for _, m in found if "provenance" in m})
    lines += ["", "Generated by `python report.py " + " ".join(runs) + "` from the runs' metrics.json; "
              + "; ".join(f"commit {c}, {machine}, {date}" for c, machine, date in stamps) + ". A run's 95% "
              "intervals resample its test tasks, then the pairs within them (a cluster bootstrap; \"(pairs)\": an "
              "older run's, over pairs alone). Mean of runs: over seeds, with a 95% t-interval across them (tallies "
              "summed), and how many runs' own intervals lie above no effect (50%; 0 nats)."]
    return "\n".join(lines) + "\n"


def main():
    import argparse

    parser = argparse.ArgumentParser(description="Results tables (markdown) from evaluated runs' metrics.json.")
    parser.add_argument("runs", nargs="+", help="run folders, e.g. runs/toy runs/toy-seed1 runs/toy-seed2")
    parser.add_argument("--readme", default="", help="write the tables into this file between the markers of "
                                                     "--table instead of printing them")
    parser.add_argument("--table", default="results",
                        help="which block of --readme to write: between <!-- TABLE table: begin --> and "
                             "<!-- TABLE table: end --> (default: results)")
    args = parser.parse_args()
    table = results_table(args.runs)
    if not args.readme:
        print(table, end="")
        return
    text = Path(args.readme).read_text()
    begin, end = f"<!-- {args.table} table: begin -->", f"<!-- {args.table} table: end -->"  # one README, several
    if begin not in text or end not in text:
        raise SystemExit(f"error: {args.readme}: no {begin} ... {end} block to write the tables into")
    head, rest = text.split(begin, 1)
    write_text_atomic(args.readme, head + begin + "\n" + table + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
