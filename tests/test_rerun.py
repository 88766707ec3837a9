"""A rerun never silently mixes settings: each step compares its settings with the args_<step>.json it recorded
beside its outputs. A setting that can change a result, changed, stops the step with one error naming it (old ->
new), exit code 2, nothing changed; --overwrite redoes the step instead; settings that cannot change a result
(utils.NOT_RESULT_SETTINGS: batch sizes, caches, ...) may change freely, and an unchanged rerun still skips.

Finished steps are mostly written by hand (a record and an output file): no model is needed to see them refused or
skipped. 02 runs the embedded model at the smallest sizes, to see --overwrite redo its work."""

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_bad_inputs import fails, run, snapshot, write_jsonl  # noqa: F401  (run: the hand-written run folder)
from transformers import HfArgumentParser

from models import ModelSettings
from stargate import SimulationSettings
from utils import StepError, read_jsonl, record_args

REPO = Path(__file__).resolve().parents[1]
SHARED = {"01_generate": (ModelSettings,), "02_simulate": (SimulationSettings, ModelSettings),
          "03_select": (ModelSettings,), "04_train": (ModelSettings,),
          "05_eval": (SimulationSettings, ModelSettings), "toy_base": ()}


def record(step: str, path: Path, *flags):
    """Write args_<step>.json as the step records it when run with these flags."""
    parts = HfArgumentParser((importlib.import_module(step).Args, *SHARED[step])).parse_args_into_dataclasses(
        args=list(map(str, flags)))
    record_args(path, *parts, prompts=getattr(importlib.import_module(step), "PROMPTED", ()))


def step_main(step: str, *flags, monkeypatch, capsys) -> str:
    """Run a step's main() in this process (no new interpreter to start: seconds saved per call); its stdout."""
    monkeypatch.setattr(sys, "argv", [f"{step}.py", *map(str, flags)])
    capsys.readouterr()
    importlib.import_module(step).main()
    return capsys.readouterr().out


def refused(step: str, *flags, folder: Path, named: str, monkeypatch, capsys) -> str:
    """main() stops with a StepError naming the change (the subprocess tests show it as one line, exit 2)."""
    before = snapshot(folder)
    with pytest.raises(StepError) as error:
        step_main(step, *flags, monkeypatch=monkeypatch, capsys=capsys)
    assert named in str(error.value) and "--overwrite" in str(error.value)
    assert snapshot(folder) == before
    return str(error.value)


def succeeds(step, *flags) -> str:
    done = subprocess.run([sys.executable, step, *map(str, flags)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture
def evaluated(tmp_path):
    """A finished evaluation as 05_eval.py leaves it: its record, metrics and a report with an ablation section.
    Its Questioner names a model that does not exist: a rerun that loaded any model would fail."""
    run = tmp_path / "run"
    flags = ["--run_dir", run, "--questioner", f"hf:{tmp_path}/no-such-model", "--roleplayer", "scripted:data/toy",
             "--judge", "scripted:data/toy", "--iterations", 1, "--test_pairs", 4, "--cache_dir", tmp_path / "cache"]
    record("05_eval", run / "eval" / "args_05_eval.json", *flags)
    (run / "eval" / "metrics.json").write_text(json.dumps({"models": {"m0": {}, "m1": {"win_rate": {
        "win_rate": 53.333333333333336}}}}))
    (run / "eval" / "report.md").write_text("# report\n\n## Ablations\n\n| run-gold | ... |\n")
    return run, flags


def test_a_finished_evaluation_rerun_with_another_judge_is_one_error(evaluated):
    run, flags = evaluated
    fails("05_eval.py", *flags, "--judge", "embedded", folder=run,
          expected="--judge 'scripted:data/toy' -> 'embedded'")


@pytest.mark.parametrize("change,named", [
    (["--test_pairs", 5], "--test_pairs 4 -> 5"),
    (["--roleplayer", "embedded"], "--roleplayer 'scripted:data/toy' -> 'embedded'"),
    (["--iterations", 2, "--n_conversations", 3], "--iterations 1 -> 2")])
def test_a_finished_evaluation_rerun_with_other_settings_is_refused(evaluated, change, named, monkeypatch, capsys):
    run, flags = evaluated
    error = refused("05_eval", *flags, *change, folder=run, named=named, monkeypatch=monkeypatch, capsys=capsys)
    if "--n_conversations" in change:
        assert "--n_conversations 10 -> 3" in error  # every differing setting is named


def test_a_finished_evaluation_reruns_in_seconds_and_keeps_its_report(evaluated):
    """No model or sentence encoder is loaded and no metric recomputed (the Questioner's weights do not exist);
    the report keeps the ablation section a run with --ablation_dirs gave it. Batch sizes may change."""
    run, flags = evaluated
    before = snapshot(run)
    start = time.monotonic()
    stdout = succeeds("05_eval.py", *flags, "--batch_size", 4, "--batch_tokens", 4096)
    assert time.monotonic() - start < 60
    assert snapshot(run) == before
    assert "is complete (win rate vs m0 (%): m1 53.3)" in stdout and "report kept as it was" in stdout


def test_an_ablation_run_not_yet_evaluated_is_one_error(evaluated, tmp_path, monkeypatch, capsys):
    """--ablation_dirs naming a run with no eval/metrics.json stops with an error naming that file; the report
    is never written without it."""
    run, flags = evaluated
    before = snapshot(run)
    with pytest.raises(StepError, match=r"run-gold/eval/metrics.json: file not found; evaluate that run first"):
        step_main("05_eval", *flags, "--ablation_dirs", tmp_path / "run-gold", monkeypatch=monkeypatch, capsys=capsys)
    assert snapshot(run) == before


def test_simulation_rerun_with_another_n_is_refused_and_overwrite_redoes_it(run, model_cache, monkeypatch, capsys):
    flags = ["--run_dir", run, "--cache_dir", model_cache, "--dtype", "float32", "--max_turns", 1,
             "--question_max_tokens", 4, "--answer_max_tokens", 4]
    step_main("02_simulate", *flags, "--n_conversations", 1, monkeypatch=monkeypatch, capsys=capsys)
    conversations = run / "iter0" / "conversations.jsonl"
    assert len(read_jsonl(conversations, "conversation")) == 2
    fails("02_simulate.py", *flags, "--n_conversations", 2, folder=run, expected="--n_conversations 1 -> 2")
    unchanged = step_main("02_simulate", *flags, "--n_conversations", 1, "--batch_size", 3, monkeypatch=monkeypatch,
                          capsys=capsys)
    assert "nothing to do" in unchanged
    step_main("02_simulate", *flags, "--n_conversations", 2, "--overwrite", monkeypatch=monkeypatch, capsys=capsys)
    assert len(read_jsonl(conversations, "conversation")) == 4
    assert json.loads((run / "iter0" / "args_02_simulate.json").read_text())["n_conversations"] == 2


def test_selection_and_training_reruns_compare_their_settings(run, monkeypatch, capsys):
    def main(step, *flags):
        return step_main(step, "--run_dir", run, *flags, monkeypatch=monkeypatch, capsys=capsys)

    iter0 = run / "iter0"
    write_jsonl(iter0 / "sft.jsonl", [])
    record("03_select", iter0 / "args_03_select.json", "--run_dir", run, "--n_conversations", 2)
    refused("03_select", "--run_dir", run, "--n_conversations", 2, "--target", "gold", folder=run,
            named="--target 'own' -> 'gold'", monkeypatch=monkeypatch, capsys=capsys)
    assert "nothing to do" in main("03_select", "--n_conversations", 2, "--chunk_size", 8)
    made = json.loads((iter0 / "args_03_select.json").read_text())  # scored under other Questioner prompts
    (iter0 / "args_03_select.json").write_text(json.dumps(dict(made, prompts={"questioner": "0123456789ab"})))
    refused("03_select", "--run_dir", run, "--n_conversations", 2, folder=run,
            named="roles.py's questioner prompts 0123456789ab -> ", monkeypatch=monkeypatch, capsys=capsys)
    (iter0 / "args_03_select.json").write_text(json.dumps(made))

    (iter0 / "adapter").mkdir()
    (iter0 / "adapter" / "adapter_config.json").write_text("{}")
    record("04_train", iter0 / "args_04_train.json", "--run_dir", run)
    for change, named in ((["--lora_r", 8], "--lora_r 16 -> 8"), (["--batch_size", 2], "--batch_size 4 -> 2")):
        refused("04_train", "--run_dir", run, *change, folder=run, named=named, monkeypatch=monkeypatch,
                capsys=capsys)  # 04's batch_size is its training batch: it counts
    assert "nothing to do" in main("04_train", "--save_steps", 7)


def test_data_and_toy_base_reruns_compare_their_settings(run, tmp_path, monkeypatch, capsys):
    record("01_generate", run / "data" / "args_01_generate.json", "--run_dir", run, "--n_tasks", 2, 1, 1)
    refused("01_generate", "--run_dir", run, "--n_tasks", 2, 1, 2, folder=run, named="--n_tasks [2, 1, 1] -> [2, 1, 2]",
            monkeypatch=monkeypatch, capsys=capsys)
    assert "nothing to do" in step_main("01_generate", "--run_dir", run, "--n_tasks", 2, 1, 1, "--batch_size", 2,
                                        monkeypatch=monkeypatch, capsys=capsys)

    out = tmp_path / "toy-base"
    out.mkdir()
    (out / "config.json").write_text("{}")
    made = tmp_path / "toy-base.build" / "args_toy_base.json"
    record("toy_base", made, "--out", out)
    refused("toy_base", "--out", out, "--epochs", 3, folder=tmp_path, named="--epochs 2.0 -> 3.0",
            monkeypatch=monkeypatch, capsys=capsys)
    assert "nothing to do" in step_main("toy_base", "--out", out, "--cache_dir", tmp_path / "elsewhere",
                                        monkeypatch=monkeypatch, capsys=capsys)
    # A base warmed up under other Questioner prompts (roles.py's since edited) is another model: refused; so is
    # one whose record predates the prompts' hashes (its prompts cannot be known).
    recorded = json.loads(made.read_text())
    made.write_text(json.dumps(dict(recorded, prompts={"questioner": "0123456789ab"})))
    refused("toy_base", "--out", out, folder=tmp_path, named="roles.py's questioner prompts 0123456789ab -> ",
            monkeypatch=monkeypatch, capsys=capsys)
    made.write_text(json.dumps({k: v for k, v in recorded.items() if k != "prompts"}))
    refused("toy_base", "--out", out, folder=tmp_path, named="roles.py's questioner prompts unrecorded -> ",
            monkeypatch=monkeypatch, capsys=capsys)


def test_the_evaluation_summary_rounds_and_says_when_no_verdict_could_be_read():
    summary = importlib.import_module("05_eval").win_rate_summary
    measured = {"models": {"m0": {}, "m1": {"win_rate": {"win_rate": 53.333333333333336}},
                           "m2": {"win_rate": {"win_rate": None}}}}
    assert summary(measured) == "m1 53.3, m2 no verdict"
