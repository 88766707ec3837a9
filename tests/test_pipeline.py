"""The whole method as a user runs it: `run_all.sh` (smoke preset: the tiny sizes of the test suite) on the
embedded model, in subprocesses, then the same command again. Checks the records every step hands on."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from local_models import LocalLM, embedded_model_dir
from roles import answer_view, gold_problem
from stargate import SimulationSettings
from utils import load_pairs, read_jsonl

REPO = Path(__file__).resolve().parents[1]
N, TOP_K, ITERATIONS = 2, 1, 2  # as in run_all.sh's smoke preset


def run_all(env, *extra):
    done = subprocess.run(["bash", "run_all.sh", "smoke", *extra], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, model_cache):
    root = tmp_path_factory.mktemp("smoke")
    # Share the dequantized embedded model; keep this run's Oracle and Judge call caches apart.
    cache = root / "cache"
    cache.mkdir()
    (cache / "SmolLM2-135M-Instruct").symlink_to(embedded_model_dir(model_cache).resolve())
    # float32: the checks below compare the run's numbers with a fresh model's, which bf16 rounding would blur
    # (a sequence scored alone and in a batch differs by up to ~0.8 nats in bf16, ~1e-3 in float32). The bf16
    # default runs every step in test_resume.
    env = dict(os.environ, RUN_DIR=str(root / "run"), CACHE_DIR=str(cache), DTYPE="float32")
    stdout = run_all(env)
    return root / "run", cache, env, stdout


def test_data_has_the_requested_splits_and_a_gold_response_per_pair(smoke):
    run = smoke[0]
    tasks = read_jsonl(run / "data" / "tasks.jsonl", "task")
    personas = read_jsonl(run / "data" / "personas.jsonl", "persona")
    gold = read_jsonl(run / "data" / "gold.jsonl", "gold")
    assert Counter(t["split"] for t in tasks) == {"A": 2, "B": 2, "test": 2}
    assert Counter(p["split"] for p in personas) == {"A": 1, "B": 1, "test": 2}
    assert len({p["name"] for p in personas}) == len(personas)  # unique first names
    assert all(p["bio"].strip() for p in personas)
    split_of = {t["task_id"]: t["split"] for t in tasks} | {p["persona_id"]: p["split"] for p in personas}
    # Every task x every persona of its split, nothing across splits.
    assert sorted((g["task_id"], g["persona_id"]) for g in gold) == sorted(
        (t["task_id"], p["persona_id"]) for t in tasks for p in personas if t["split"] == p["split"])
    assert all(split_of[g["task_id"]] == split_of[g["persona_id"]] == g["split"] for g in gold)
    # Every gold answer was checked; one still refused, empty or looping after the retries is marked and
    # left out of every later step.
    assert all(g["flag"] == gold_problem(g["gold"]) and 1 <= g["attempts"] <= 3 for g in gold)
    assert all(g["attempts"] == 3 for g in gold if g["flag"])
    used = {(c["task_id"], c["persona_id"]) for t in range(ITERATIONS)
            for c in read_jsonl(run / f"iter{t}" / "conversations.jsonl", "conversation")}
    assert not used & {(g["task_id"], g["persona_id"]) for g in gold if g["flag"]}


@pytest.mark.parametrize("iteration,split", [(0, "A"), (1, "B")])
def test_conversations_alternate_and_share_their_pairs_length(smoke, iteration, split):
    run = smoke[0]
    pairs = {(p["task_id"], p["persona_id"]) for p in load_pairs(run, split, usable_only=True)}
    convs = read_jsonl(run / f"iter{iteration}" / "conversations.jsonl", "conversation")
    assert sorted((c["task_id"], c["persona_id"], c["conv_id"]) for c in convs) == sorted(
        (*p, n) for p in pairs for n in range(N))
    for c in convs:
        roles = [m["role"] for m in c["messages"]]
        assert roles == ["assistant", "user"] * c["n_turns"]  # each turn: one question, one answer
        assert 1 <= c["n_turns"] <= 2 and c["iteration"] == iteration
        assert c["sampling"]["questioner"]["temperature"] == 0.9 and c["sampling"]["roleplayer"]["temperature"] == 0
    turns = {}
    for c in convs:
        turns.setdefault((c["task_id"], c["persona_id"]), set()).add(c["n_turns"])
    assert all(len(t) == 1 for t in turns.values())  # the N conversations of a pair have one length
    assert convs[0]["questioner"] == ("embedded" if iteration == 0 else f"embedded+m{iteration}")


@pytest.mark.parametrize("iteration", [0, 1])
def test_selection_keeps_the_best_conversation_and_trains_on_the_questioner_only(smoke, iteration):
    folder = smoke[0] / f"iter{iteration}"
    scores = read_jsonl(folder / "scores.jsonl", "score")
    sft = read_jsonl(folder / "sft.jsonl", "sft")
    assert len(scores) == len(read_jsonl(folder / "conversations.jsonl", "conversation"))
    assert all(s["logprob"] < 0 and s["n_tokens"] > 0 for s in scores)
    best = {}
    for s in sorted(scores, key=lambda s: (-s["logprob"], s["conv_id"])):
        best.setdefault((s["task_id"], s["persona_id"]), s["conv_id"])
    assert {(r["task_id"], r["persona_id"]): r["conv_id"] for r in sft} == best
    turns = {(c["task_id"], c["persona_id"], c["conv_id"]): c["n_turns"]
             for c in read_jsonl(folder / "conversations.jsonl", "conversation")}
    for r in sft:
        assert r["target"] == "own" and r["messages"][-1]["role"] == "assistant"
        trained = [m for m in r["messages"] if m["train"]]
        assert all(m["role"] == "assistant" for m in trained)  # never system, user or the fixed example
        assert len(trained) == turns[(r["task_id"], r["persona_id"], r["conv_id"])] + 1  # questions + answer
        assert trained[-1] is r["messages"][-1]


def test_evaluation_simulates_as_training_did(smoke):
    """02 and 05 parse one SimulationSettings and run_all.sh passes them one flag list: both record the same
    settings beside their outputs, and the test conversations were sampled with the training's caps."""
    run = smoke[0]
    fields = [f.name for f in dataclasses.fields(SimulationSettings)]
    train = json.loads((run / "iter0" / "args_02_simulate.json").read_text())
    evaluation = json.loads((run / "eval" / "args_05_eval.json").read_text())
    assert {f: evaluation[f] for f in fields} == {f: train[f] for f in fields}
    assert train["max_turns"] == 2 and train["question_max_tokens"] == 12  # the smoke preset's, not the defaults

    def caps(sampling):  # per role: token cap, temperature, top_p (the batch size is each step's own)
        return {role: {k: v for k, v in settings.items() if k != "batch_size"} for role, settings in sampling.items()}

    trained = caps(read_jsonl(run / "iter0" / "conversations.jsonl", "conversation")[0]["sampling"])
    for c in read_jsonl(run / "eval" / "m0" / "conversations.jsonl", "conversation"):
        assert 1 <= c["n_turns"] <= 2 and caps(c["sampling"]) == trained


def test_scores_come_from_the_base_model_even_with_adapters_loaded(smoke, model_cache):
    # 05_eval scored m1's test conversations with the m1 and m2 adapters attached to the shared model. The
    # run is float32, where batching changes a score by ~1e-3 nats; the adapters move these scores by 1-8 nats.
    run = smoke[0]
    fresh = LocalLM("embedded", cache_dir=model_cache, dtype="float32")
    for t in (1, 2):
        fresh.add_adapter(f"m{t}", run / f"iter{t - 1}" / "adapter")
    pairs = {(p["task_id"], p["persona_id"]): p for p in load_pairs(run, "test", usable_only=True)}
    convs = {(c["task_id"], c["persona_id"], c["conv_id"]): c
             for c in read_jsonl(run / "eval" / "m1" / "conversations.jsonl", "conversation")}
    for s in read_jsonl(run / "eval" / "m1" / "scores.jsonl", "score")[:3]:
        pair, conv = pairs[(s["task_id"], s["persona_id"])], convs[(s["task_id"], s["persona_id"], s["conv_id"])]
        context = [answer_view(pair["name"], pair["task"], conv["messages"])]
        base, m1, m2 = (fresh.score(context, [pair["gold"]], adapter=a)[0][0] for a in (None, "m1", "m2"))
        assert abs(base - s["logprob"]) < 0.05
        assert abs(m1 - s["logprob"]) > 0.3 and abs(m2 - s["logprob"]) > 0.3


def test_each_iteration_leaves_a_peft_adapter(smoke):
    from safetensors.torch import load_file

    for t in range(ITERATIONS):
        adapter = smoke[0] / f"iter{t}" / "adapter"
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA"
        weights = load_file(adapter / "adapter_model.safetensors")
        assert weights and all(torch.isfinite(w).all() for w in weights.values())
        assert not (smoke[0] / f"iter{t}" / "checkpoints").exists()


def test_evaluation_writes_metrics_report_and_plots(smoke):
    run, _, _, stdout = smoke
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["test_pairs"] == 3
    for t in range(1, ITERATIONS + 1):
        m = metrics["models"][f"m{t}"]
        w = m["win_rate"]
        assert w["n"] + w["unparseable"] == 3 and w["wins"] + w["ties"] + w["losses"] == w["n"]
        judgments = read_jsonl(run / "eval" / f"m{t}" / "judgments.jsonl", "judgment")
        assert len(judgments) == 6 and {j["conv_id"] for j in judgments} == {0}  # both orders, conversation 0
        assert m["gain_over_m0"]["n"] == 3 and "asks_only" in m
    assert set(metrics["controls"]) == {"no_conversation", "persona_in_context", "other_persona"}
    report = (run / "eval" / "report.md").read_text()
    assert "Win rate against m0" in report and "*paper*" in report
    for plot in ("winrate.png", "logprob.png"):
        assert (run / "eval" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Report: {run}/eval/report.md" in stdout


@pytest.mark.parametrize("target", ["gold", "none"])
def test_ablation_targets(smoke, tmp_path, target):
    """The paper's ablations, as run_all.sh --ablations runs them: same data and iteration-0 conversations,
    another final message (the Oracle's gold answer; none: questions only)."""
    run, cache, env, _ = smoke
    other = tmp_path / f"run-{target}"
    (other / "iter0").mkdir(parents=True)
    (other / "data").symlink_to(run / "data")
    for name in ("conversations.jsonl", "scores.jsonl"):
        (other / "iter0" / name).write_bytes((run / "iter0" / name).read_bytes())
    done = subprocess.run([sys.executable, "03_select.py", "--run_dir", str(other), "--n_conversations", str(N),
                           "--target", target, "--cache_dir", str(cache)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sft = read_jsonl(other / "iter0" / "sft.jsonl", "sft")
    main = read_jsonl(run / "iter0" / "sft.jsonl", "sft")
    assert [(r["task_id"], r["persona_id"], r["conv_id"]) for r in sft] == \
        [(r["task_id"], r["persona_id"], r["conv_id"]) for r in main]  # the same selection
    assert all(r["target"] == target for r in sft)
    if target == "none":  # questions only: the record ends on the Roleplayer's answer
        assert all(r["messages"][-1]["role"] == "user" for r in sft)
    else:
        gold = {(g["task_id"], g["persona_id"]): g["gold"] for g in read_jsonl(run / "data" / "gold.jsonl", "gold")}
        assert all(r["messages"][-1]["content"] == gold[(r["task_id"], r["persona_id"])] for r in sft)


def test_report_puts_ablations_beside_the_main_run(smoke, tmp_path):
    from report import write_report

    metrics = json.loads((smoke[0] / "eval" / "metrics.json").read_text())
    ablation = dict(metrics, target="gold")
    ablation["models"] = dict(metrics["models"], m1=dict(metrics["models"]["m1"], gain_over_m0={
        "mean": 1.234, "ci95": [0.5, 2.0], "ci95_cluster": [0.4, 2.1]}))  # its own gain: its row must show it
    write_report(tmp_path, metrics, {"run-gold": ablation})
    report = (tmp_path / "report.md").read_text()
    assert "## Ablations" in report and "*44.1, 51.8*" in report
    main_row = next(line for line in report.splitlines() if line.startswith(f"| {smoke[0].name} (target own) |"))
    gold_row = next(line for line in report.splitlines() if line.startswith("| run-gold (target gold) |"))
    assert "| 1.23 [0.40, 2.10] |" in gold_row  # the interval resampling tasks, then pairs
    gain = metrics["models"]["m1"]["gain_over_m0"]
    assert f"| {gain['mean']:.2f} [{gain['ci95_cluster'][0]:.2f}, {gain['ci95_cluster'][1]:.2f}] |" in main_row


def test_a_second_run_recomputes_nothing(smoke):
    run, cache, env, _ = smoke

    def snapshot():
        files = [p for d in (run, cache) for p in sorted(d.rglob("*"))
                 if p.is_file() and "SmolLM2" not in str(p) and p.suffix in (".jsonl", ".safetensors")]
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    before = snapshot()
    stdout = run_all(env)
    assert snapshot() == before  # no record, adapter or cached Oracle/Judge call was made again
    assert stdout.count("nothing to do") == 1 + 3 * ITERATIONS
    assert f"05_eval: {run}/eval is complete" in stdout  # metrics not recomputed, no model loaded
