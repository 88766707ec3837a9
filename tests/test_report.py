"""Evaluation arithmetic: both-order verdicts, ties, win rates, intervals; and top-k selection."""

import importlib

import pytest

from metrics import bootstrap_ci, cluster_bootstrap_ci, min_detectable_effect, pair_outcome, win_rate

select = importlib.import_module("03_select")


def test_pair_outcome_reads_both_orders():
    # Order 1 shows the new model as A, order 2 shows it as B.
    assert pair_outcome("A", "B") == 1.0      # new model chosen both times: a win
    assert pair_outcome("B", "A") == 0.0      # baseline chosen both times: a loss
    assert pair_outcome("A", "A") == 0.5      # the judge picked the first position both times: a tie
    assert pair_outcome("B", "B") == 0.5
    assert pair_outcome(None, "B") is None    # unparseable: recorded, never guessed
    assert pair_outcome("A", None) is None


def test_win_rate_counts_ties_half_and_reports_consistency():
    outcomes = [1.0, 1.0, 1.0, 0.0, 0.5, None]
    result = win_rate(outcomes, n_boot=500)
    assert result["win_rate"] == pytest.approx(100 * 3.5 / 5)
    assert (result["wins"], result["losses"], result["ties"], result["unparseable"]) == (3, 1, 1, 1)
    assert result["n"] == 5
    assert result["order_consistency"] == pytest.approx(4 / 5)
    lo, hi = result["ci95"]
    assert 0 <= lo <= result["win_rate"] <= hi <= 100


def test_win_rate_with_nothing_parseable():
    result = win_rate([None, None], clusters=[("t0",), ("t1",)])
    assert result["win_rate"] is None and result["unparseable"] == 2 and result["n"] == 0
    assert result["ci95_cluster"] == [None, None]


def test_bootstrap_interval_narrows_with_more_data_and_is_degenerate_for_constants():
    assert bootstrap_ci([2.0] * 10) == [2.0, 2.0]
    small = bootstrap_ci([0.0, 1.0] * 5, n_boot=1000)
    large = bootstrap_ci([0.0, 1.0] * 200, n_boot=1000)
    assert small[0] < 0.5 < small[1] and large[0] < 0.5 < large[1]
    assert large[1] - large[0] < small[1] - small[0]
    assert bootstrap_ci([]) == [None, None]


def clustered(n_tasks=24, n_personas=5, seed=1):
    """Win/loss outcomes of tasks x personas where a task decides most of its pairs (as in the toy world: some tasks
    are easy to win on), with each pair's cluster (its task)."""
    import random

    rng = random.Random(seed)
    values, clusters = [], []
    for task in range(n_tasks):
        p = rng.choice([0.1, 0.9])  # the task's own chance of a win
        for _ in range(n_personas):
            values.append(float(rng.random() < p))
            clusters.append((f"t{task}",))
    return values, clusters


def test_the_cluster_bootstrap_resamples_tasks_and_is_wider_when_a_task_decides_its_pairs():
    values, clusters = clustered()
    pairs = bootstrap_ci(values, n_boot=1000)
    tasks = cluster_bootstrap_ci(values, clusters, n_boot=1000)
    assert tasks[0] <= sum(values) / len(values) <= tasks[1]
    assert tasks[1] - tasks[0] > 1.5 * (pairs[1] - pairs[0])  # pairs of one task are not independent draws
    # Each pair its own cluster: the same spread as the pair bootstrap (up to resampling noise).
    alone = cluster_bootstrap_ci(values, [(i,) for i in range(len(values))], n_boot=1000)
    assert abs((alone[1] - alone[0]) - (pairs[1] - pairs[0])) < 0.05
    # Deterministic given the seed; another seed, another draw; constants and no data as bootstrap_ci.
    assert cluster_bootstrap_ci(values, clusters, n_boot=1000) == tasks
    assert cluster_bootstrap_ci(values, clusters, n_boot=1000, seed=1) != tasks
    assert cluster_bootstrap_ci([3.0] * 6, [("a",), ("a",), ("b",)] * 2) == [3.0, 3.0]
    assert cluster_bootstrap_ci([], []) == [None, None]


def test_the_cluster_bootstrap_goes_down_to_conversations_and_the_win_rate_carries_it():
    # Two judged conversations per pair: tasks, then pairs, then conversations.
    values, clusters = clustered(n_personas=3)
    items = [(v, (*c, f"p{i}")) for i, (v, c) in enumerate(zip(values, clusters)) for _ in range(2)]
    nested = cluster_bootstrap_ci([v for v, _ in items], [c for _, c in items], n_boot=500)
    assert nested[0] < sum(values) / len(values) < nested[1]
    result = win_rate([v for v, _ in items] + [None], n_boot=500, clusters=[c for _, c in items] + [("t0", "x")])
    assert result["n"] == len(items) and result["unparseable"] == 1
    assert result["ci95_cluster"] == pytest.approx([100 * x for x in nested])  # the None left out, as in ci95
    assert result["ci95_cluster"][1] - result["ci95_cluster"][0] > result["ci95"][1] - result["ci95"][0]
    assert "ci95_cluster" not in win_rate([1.0, 0.0])  # no clusters given, none claimed


def test_min_detectable_effect_shrinks_with_sample_size():
    diffs = [(-1) ** i * 7.0 for i in range(40)]
    mde_40 = min_detectable_effect(diffs)
    assert mde_40 == pytest.approx(2.8 * (sum(d * d for d in diffs) / 39) ** 0.5 / 40 ** 0.5)
    assert min_detectable_effect(diffs * 4) < mde_40
    assert min_detectable_effect([1.0]) is None


def test_top_k_keeps_the_best_per_pair_and_breaks_ties_by_conv_id():
    scores = [{"task_id": "t1", "persona_id": "p1", "conv_id": c, "logprob": lp}
              for c, lp in enumerate([-10.0, -3.0, -3.0, -7.0])]
    scores += [{"task_id": "t0", "persona_id": "p1", "conv_id": c, "logprob": lp}
               for c, lp in enumerate([-1.0, -2.0])]
    kept = select.top_k(scores, 1)
    assert [(s["task_id"], s["conv_id"]) for s in kept] == [("t0", 0), ("t1", 1)]
    kept = select.top_k(list(reversed(scores)), 2)  # input order does not matter
    assert [(s["task_id"], s["conv_id"]) for s in kept] == [("t0", 0), ("t0", 1), ("t1", 1), ("t1", 2)]


def fake_metrics(seed, commit="abc1234", win=61.0, cluster=True):
    later = {"diagnostics": {"question_rate": 0.9, "attribute_hit_rate": 0.3},
             "answers": {"no_answer": 0.05, "revealed_used": 0.7, "hallucinated": 0.01},
             "win_rate": {"win_rate": win, "ci95": [55.0, 67.0], "wins": 30, "ties": 80, "losses": 10},
             "asks_only": {"win_rate": 58.0}, "gain_over_m0": {"mean": 1.25, "ci95": [0.5, 2.0]}}
    if cluster:  # written since 05 resamples tasks, then pairs
        later["win_rate"]["ci95_cluster"], later["gain_over_m0"]["ci95_cluster"] = [52.0, 70.0], [0.25, 2.25]
    return {"seed": seed, "provenance": {"commit": commit, "uncommitted_changes": False,
                                         "machine": "Some CPU, 2 cores", "date": "2026-12-02"},
            "models": {"m0": {"diagnostics": {"question_rate": 0.8, "attribute_hit_rate": 0.2},
                              "answers": {"no_answer": 0.0, "revealed_used": 0.67, "hallucinated": 0.0}},
                       "m1": later}}


def test_results_tables_come_from_the_runs_metrics_and_say_where_they_came_from(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    from conftest import REPO

    for run, metrics in (("toy", fake_metrics(0)), ("toy-seed1", fake_metrics(1, win=47.5, cluster=False)),
                         ("toy-none", fake_metrics(0, win=40.0))):
        (tmp_path / run / "eval").mkdir(parents=True)
        (tmp_path / run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results table: begin -->\nthe previous table\n<!-- results table: end -->\noutro\n")
    command = [sys.executable, str(REPO / "report.py"), "toy", "toy-seed1", "--readme", str(readme)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results table: begin -->\n")
    assert text.endswith("<!-- results table: end -->\noutro\n")
    assert "the previous table" not in text
    # A run's intervals resample tasks, then pairs; m_t beside m0.
    assert ("| toy | 0 | m1 | 61.0 [52.0, 70.0] | 30 / 80 / 10 | 58.0 | 1.25 [0.25, 2.25] | 80% (20%) -> 90% (30%) "
            "| 5% | 67% -> 70% | 1% |") in text
    assert "| toy-seed1 | 1 | m1 | 47.5 [55.0, 67.0] (pairs) |" in text  # an older run's interval, marked
    # The two seeds' mean, with a t-interval (1 degree of freedom: 12.71 x 6.75) across them; tallies summed; how
    # many runs' own intervals clear no effect.
    assert ("| mean of 2 runs | - | m1 | 54.2 [-31.5, 140.0]; 2 of 2 above 50 | 60 / 160 / 20 | 58.0 "
            "| 1.25 [1.25, 1.25]; 2 of 2 above 0 |") in text
    assert "| toy-none | 0 | none | m1 | 40.0 [52.0, 70.0]" in text  # the ablation found beside its run
    assert "commit abc1234, Some CPU, 2 cores, 2026-12-02" in text
    # Another block of the same README (--table): written in its own markers, the results table left as it was.
    readme.write_text(text + "<!-- ablations table: begin -->\nthe old ablations\n<!-- ablations table: end -->\n")
    done = subprocess.run(command[:-2] + ["--readme", str(readme), "--table", "ablations"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert readme.read_text().startswith(text) and "the old ablations" not in readme.read_text()
    assert readme.read_text().count("| toy-none | 0 | none | m1 |") == 2
    no_block = subprocess.run(command + ["--table", "seeds"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
    assert no_block.returncode != 0 and "no <!-- seeds table: begin --> ... <!-- seeds table: end --> block" in \
        no_block.stderr
    missing = subprocess.run([sys.executable, str(REPO / "report.py"), "nowhere"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode != 0 and "nowhere/eval/metrics.json: file not found" in missing.stderr


def test_the_mean_over_seeds_has_a_t_interval_that_widens_with_their_spread():
    from report import across_seeds

    mean, ci = across_seeds([1.0, 2.0, 3.0])  # sd 1, 2 degrees of freedom: 4.30 / sqrt(3)
    assert mean == 2.0 and ci == pytest.approx([2 - 4.30 / 3 ** 0.5, 2 + 4.30 / 3 ** 0.5])
    assert across_seeds([2.0, 2.0, 2.0]) == (2.0, [2.0, 2.0])
    assert across_seeds([5.0]) == (5.0, [None, None])  # one run: no spread to measure
