"""Crash and resume: each step is SIGKILLed while it writes, then run again. The final outputs equal those
of an uninterrupted run with the same seed, no id is missing or doubled, and no final file is half-written."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils import read_jsonl

REPO = Path(__file__).resolve().parents[1]
GEN = ["--n_tasks", "3", "1", "1", "--n_personas", "2", "1", "1", "--persona_max_tokens", "24",
       "--gold_max_tokens", "12", "--n_examples", "1", "--batch_size", "2"]
SIM = ["--n_conversations", "2", "--chunk_pairs", "1", "--question_max_tokens", "8", "--answer_max_tokens", "8",
       "--max_turns", "2"]
SELECT = ["--n_conversations", "2", "--chunk_size", "2", "--batch_size", "2", "--answer_max_tokens", "8"]


def step(script, run, cache, *args):
    return [sys.executable, script, "--run_dir", str(run), "--cache_dir", str(cache), *args]


def finish(command):
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def kill_after(command, watched: Path, lines: int):
    """Start the command and SIGKILL it once `watched` holds at least `lines` lines (or it ends)."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        if watched.exists() and watched.read_text().count("\n") >= lines:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    return process.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_cache):
    """The same small run twice: once straight through, once killed at several points and resumed."""
    from models import embedded_model_dir

    root = tmp_path_factory.mktemp("resume")
    caches = {}
    for name in ("straight", "killed"):  # separate Oracle caches: the killed run must redo its own calls
        caches[name] = root / f"cache-{name}"
        caches[name].mkdir()
        (caches[name] / "SmolLM2-135M-Instruct").symlink_to(embedded_model_dir(model_cache).resolve())
    straight, killed = root / "straight", root / "killed"
    for command in (step("01_generate.py", straight, caches["straight"], *GEN),
                    step("02_simulate.py", straight, caches["straight"], *SIM),
                    step("03_select.py", straight, caches["straight"], *SELECT)):
        finish(command)

    kills = 0
    gen = step("01_generate.py", killed, caches["killed"], *GEN)
    for lines in (1, 3):  # the Oracle call cache: killed after the first batches of personas / gold answers
        kills += kill_after(gen, caches["killed"] / "oracle_calls.jsonl", lines)
    finish(gen)
    sim = step("02_simulate.py", killed, caches["killed"], *SIM)
    for lines in (2, 4):
        kills += kill_after(sim, killed / "iter0" / "conversations.partial.jsonl", lines)
    partial = killed / "iter0" / "conversations.partial.jsonl"
    if partial.exists():  # a write cut off halfway through a line, as a crash mid-write leaves it
        with open(partial, "a") as f:
            f.write('{"task_id": "t00')
    finish(sim)
    select = step("03_select.py", killed, caches["killed"], *SELECT)
    kills += kill_after(select, killed / "iter0" / "scores.partial.jsonl", 2)
    kills += kill_after(select, killed / "iter0" / "sft.partial.jsonl", 1)
    finish(select)
    return straight, killed, kills


def test_processes_were_really_killed(runs):
    assert runs[2] >= 3


@pytest.mark.parametrize("name,kind", [("data/personas.jsonl", "persona"), ("data/gold.jsonl", "gold"),
                                       ("iter0/conversations.jsonl", "conversation"), ("iter0/scores.jsonl", "score"),
                                       ("iter0/sft.jsonl", "sft")])
def test_resumed_outputs_equal_an_uninterrupted_run(runs, name, kind):
    straight, killed, _ = runs
    resumed = read_jsonl(killed / name, kind)  # schema and unique ids are checked on read
    assert resumed == read_jsonl(straight / name, kind)


def test_no_partial_or_temporary_file_is_left(runs):
    leftovers = [p for p in runs[1].rglob("*") if ".partial." in p.name or p.name.endswith(".tmp")]
    assert leftovers == []
