"""Bad input gets one clear error (naming the file:line or the setting), exit code 2, and changes nothing.

Each case is a row of the table "Bad inputs" in docs/REFERENCE.md. The run folder is written by hand (no model
needed)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def run(tmp_path):
    """A small, valid run folder as 01_generate.py leaves it."""
    run = tmp_path / "run"
    tasks = [{"task_id": f"t{i}", "split": s, "text": f"Task {i}?"} for i, s in enumerate("AABT")]
    tasks[3]["split"] = "test"
    personas = [{"persona_id": f"p{i}", "split": s, "name": n, "bio": f"My name is {n}."}
                for i, (s, n) in enumerate([("A", "Ana"), ("B", "Ben"), ("test", "Cy")])]
    gold = [{"task_id": t["task_id"], "persona_id": p["persona_id"], "split": t["split"], "gold": "An answer."}
            for t in tasks for p in personas if t["split"] == p["split"]]
    write_jsonl(run / "data" / "tasks.jsonl", tasks)
    write_jsonl(run / "data" / "personas.jsonl", personas)
    write_jsonl(run / "data" / "gold.jsonl", gold)
    return run


def snapshot(folder):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def fails(step, *args, folder, expected, env=None):
    """Run a step that must fail: exit code 2, one 'error:' line containing `expected`, nothing changed."""
    before = snapshot(folder)
    environment = dict(os.environ, STARGATE_MAX_RETRIES="0", **(env or {}))
    done = subprocess.run([sys.executable, step, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in environment.items() if v is not None})
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(errors) == 1 and expected in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert snapshot(folder) == before
    return errors[0]


# --- 01_generate.py: task files, sizes, model specs, API settings -----------------------------------

def test_missing_task_file(tmp_path):
    fails("01_generate.py", "--run_dir", tmp_path / "r", "--tasks", tmp_path / "nope.jsonl", folder=tmp_path,
          expected="nope.jsonl: file not found")


def test_empty_task_file(tmp_path):
    (tmp_path / "tasks.txt").write_text("\n  \n")
    fails("01_generate.py", "--run_dir", tmp_path / "r", "--tasks", tmp_path / "tasks.txt", folder=tmp_path,
          expected="tasks.txt: no tasks found")


def test_malformed_jsonl_line_is_named(tmp_path):
    (tmp_path / "tasks.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    fails("01_generate.py", "--run_dir", tmp_path / "r", "--tasks", tmp_path / "tasks.jsonl", folder=tmp_path,
          expected="tasks.jsonl:2: malformed JSON")


def test_task_record_without_text(tmp_path):
    (tmp_path / "tasks.jsonl").write_text('{"task": "a"}\n')
    fails("01_generate.py", "--run_dir", tmp_path / "r", "--tasks", tmp_path / "tasks.jsonl", folder=tmp_path,
          expected="tasks.jsonl:1: a task record needs a string field 'text'")


def test_more_tasks_asked_for_than_the_file_has(tmp_path):
    fails("01_generate.py", "--run_dir", tmp_path / "r", "--n_tasks", 100, 100, 100, folder=tmp_path,
          expected="--n_tasks asks for 300")


def test_split_sizes_need_three_numbers(tmp_path):
    fails("01_generate.py", "--run_dir", tmp_path / "r", "--n_tasks", 1, 1, folder=tmp_path,
          expected="three numbers")


def test_too_few_names_for_the_personas(tmp_path):
    (tmp_path / "names.txt").write_text("Ana\nAna\nBen\n")
    fails("01_generate.py", "--run_dir", tmp_path / "r", "--names", tmp_path / "names.txt", "--n_tasks", 1, 1, 1,
          folder=tmp_path, expected="2 unique names, but --n_personas asks for 110")


def test_unknown_model_spec(tmp_path):
    fails("01_generate.py", "--run_dir", tmp_path / "r", "--n_tasks", 1, 1, 1, "--n_personas", 1, 1, 1,
          "--oracle", "gpt4", folder=tmp_path, expected="unknown model spec 'gpt4'")


def test_openai_role_without_a_key(tmp_path):
    fails("01_generate.py", "--run_dir", tmp_path / "r", "--n_tasks", 1, 1, 1, "--n_personas", 1, 1, 1,
          "--oracle", "openai:gpt-4o", folder=tmp_path, expected="OPENAI_API_KEY", env={"OPENAI_API_KEY": None})


def test_unreachable_base_url(tmp_path):
    fails("01_generate.py", "--run_dir", tmp_path / "r", "--n_tasks", 1, 1, 1, "--n_personas", 1, 1, 1,
          "--oracle", "openai:gpt-4o@http://127.0.0.1:9/v1", "--cache_dir", tmp_path / "c", folder=tmp_path,
          expected="cannot reach the OpenAI-compatible server at http://127.0.0.1:9/v1",
          env={"OPENAI_API_KEY": "sk-test-not-a-real-key"})


def test_invalid_choice_is_refused_by_the_argument_parser(tmp_path):
    done = subprocess.run([sys.executable, "01_generate.py", "--load_in_4bit", "maybe"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'maybe'" in done.stderr


# --- 02-05: records handed between steps ----------------------------------------------------------

def test_a_step_before_its_input_exists(tmp_path):
    fails("02_simulate.py", "--run_dir", tmp_path / "r", folder=tmp_path,
          expected="gold.jsonl: file not found; run 01_generate.py")


def test_duplicate_ids(run):
    with open(run / "data" / "gold.jsonl", "a") as f:
        f.write((run / "data" / "gold.jsonl").read_text().splitlines()[0] + "\n")
    fails("02_simulate.py", "--run_dir", run, folder=run, expected="gold.jsonl:5: duplicate id ('t0', 'p0')")


def test_pair_naming_a_missing_persona(run):
    with open(run / "data" / "gold.jsonl", "a") as f:
        f.write(json.dumps({"task_id": "t0", "persona_id": "p9", "split": "A", "gold": "x"}) + "\n")
    fails("02_simulate.py", "--run_dir", run, folder=run, expected="gold.jsonl:5: names persona 'p9'")


def test_wrong_field_type(run):
    write_jsonl(run / "iter0" / "conversations.jsonl", [{"task_id": "t0", "persona_id": "p0", "conv_id": "0",
                                                          "iteration": 0, "n_turns": 1, "messages": []}])
    fails("03_select.py", "--run_dir", run, "--n_conversations", 1, folder=run,
          expected="conversations.jsonl:1: conversation record needs field 'conv_id' of type int")


def test_a_cut_off_file(run):
    message = [{"role": "assistant", "content": "Q?"}, {"role": "user", "content": "A."}]
    record = {"task_id": "t0", "persona_id": "p0", "conv_id": 0, "iteration": 0, "n_turns": 1, "messages": message}
    (run / "iter0").mkdir()
    (run / "iter0" / "conversations.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(record)[:30])
    fails("03_select.py", "--run_dir", run, "--n_conversations", 1, folder=run,
          expected="conversations.jsonl:2: last line is incomplete")
    # Without --n_conversations, 03 selects from the N conversations that 02's record says it simulated.
    fails("03_select.py", "--run_dir", run, folder=run,
          expected="args_02_simulate.json: not found (the step that writes it has not run here); pass --n_")


def test_top_k_larger_than_n(run):
    fails("03_select.py", "--run_dir", run, "--n_conversations", 2, "--top_k", 3, folder=run,
          expected="--top_k must be between 1 and --n_conversations")


def test_impossible_turn_range(run):
    fails("02_simulate.py", "--run_dir", run, "--min_turns", 3, "--max_turns", 1, folder=run,
          expected="1 <= min_turns <= max_turns")


def test_missing_model_path(run, tmp_path):
    fails("02_simulate.py", "--run_dir", run, "--questioner", f"hf:{tmp_path}/no-such-model", folder=run,
          expected="cannot load model")


def test_iteration_without_the_previous_adapter(run, model_cache):
    fails("02_simulate.py", "--run_dir", run, "--iteration", 1, "--cache_dir", model_cache, folder=run,
          expected="iter0/adapter: no LoRA adapter here")


def test_evaluating_models_that_were_not_trained(run):
    fails("05_eval.py", "--run_dir", run, "--iterations", 2, folder=run, expected="adapter of m1 missing")


def test_training_records_with_nothing_to_learn(run, model_cache):
    write_jsonl(run / "iter0" / "sft.jsonl", [{"task_id": "t0", "persona_id": "p0", "conv_id": 0, "iteration": 0,
                                               "messages": [{"role": "user", "content": "hi", "train": False},
                                                            {"role": "assistant", "content": "yo", "train": False}]}])
    fails("04_train.py", "--run_dir", run, "--cache_dir", model_cache, "--load_in_4bit", "no", folder=run,
          expected="no message is marked for training")


# --- Flags: misspelled, abbreviated, out of range; specs checked before any work ------------------------

@pytest.mark.parametrize("flag", ["--n_taks", "--n_task"])  # a typo, and a prefix argparse would take for --n_tasks
def test_a_flag_must_be_spelled_out(tmp_path, flag):
    fails("01_generate.py", "--run_dir", tmp_path / "r", flag, 2, 2, 2, folder=tmp_path,
          expected=f"unknown argument '{flag}'")


@pytest.mark.parametrize("step,flag", [("02_simulate.py", "--n_conversations"), ("05_eval.py", "--test_pairs")])
def test_a_count_below_one_is_refused(run, step, flag):
    fails(step, "--run_dir", run, flag, 0, folder=run, expected=f"{flag} must be at least 1 (got 0)")


@pytest.mark.parametrize("role,spec,expected", [("--judge", "foo:bar", "unknown model spec 'foo:bar'"),
                                                ("--questioner", "scripted:data/toy", "cannot be the questioner")])
def test_every_role_spec_is_checked_before_any_work(run, model_cache, role, spec, expected):
    fails("05_eval.py", "--run_dir", run, "--iterations", 0, "--n_conversations", 1, "--cache_dir", model_cache,
          role, spec, folder=run, expected=expected)


def test_run_all_refuses_an_unknown_argument(tmp_path):
    done = subprocess.run(["bash", "run_all.sh", "toy", "--ablation"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, RUN_DIR=str(tmp_path / "run")))
    assert done.returncode == 2 and done.stderr.startswith("error: unknown argument '--ablation'")
    assert not (tmp_path / "run").exists() and done.stdout == ""


def test_run_all_takes_ablations_before_or_after_the_preset(tmp_path):
    """`bash run_all.sh --ablations smoke` runs the commands `bash run_all.sh smoke --ablations` runs (DRY_RUN prints
    them; the run's data and iteration-0 files the ablations share are there)."""
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "iter0").mkdir()
    for name in ("conversations.jsonl", "args_02_simulate.json", "scores.jsonl"):
        (run / "iter0" / name).write_text("")
    printed = []
    for args in (["smoke", "--ablations"], ["--ablations", "smoke"]):
        done = subprocess.run(["bash", "run_all.sh", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, DRY_RUN="1", RUN_DIR=str(run)))
        assert done.returncode == 0, done.stderr
        printed.append(done.stdout)
    assert printed[0] == printed[1] and f"--run_dir {run}-gold" in printed[0] and f"--run_dir {run}-none" in printed[0]


def test_human_py_explains_itself():
    done = subprocess.run([sys.executable, "human.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--roleplayer human" in done.stdout and "--judge human" in done.stdout
