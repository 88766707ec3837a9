"""The `human` spec (human.py): a person plays the Roleplayer or the Judge in the terminal, one line per turn;
Ctrl-D (end of input) stops the step cleanly and keeps what is finished."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from human import HumanChat
from local_models import load_local
from models import CachedChat
from roles import JUDGE_PROMPT, JUDGE_SYSTEM, ORACLE_GOLD_PROMPT, ORACLE_SYSTEM, parse_verdict
from utils import StepError, Stopped, read_jsonl

REPO = Path(__file__).resolve().parents[1]
BIO = "My name is Ana. I am a vegan nurse who cooks for two."


def judge_prompt(a, b):
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_PROMPT.format(bio=BIO, task="Suggest a dinner.", a=a, b=b)}]


def test_a_person_judges_and_each_verdict_is_kept_as_soon_as_given(tmp_path):
    prompts = [judge_prompt("A steak with fries.", "A lentil curry for two."), judge_prompt("Tofu stir-fry.", "Ham.")]
    shown = io.StringIO()
    judge = CachedChat(HumanChat(stdin=io.StringIO("maybe\nb\n"), stdout=shown), tmp_path / "judge_calls.jsonl")
    with pytest.raises(Stopped):  # the input ends before the second comparison
        judge.generate(prompts)
    text = shown.getvalue()
    assert BIO in text and "Suggest a dinner." in text and "A steak with fries." in text and "A lentil curry" in text
    assert "unrecognised" in text  # "maybe" is no verdict: asked again
    # Run again: the first verdict is not asked for twice, so one line of input answers the second comparison.
    again = CachedChat(HumanChat(stdin=io.StringIO("a\n"), stdout=io.StringIO()), tmp_path / "judge_calls.jsonl")
    assert [parse_verdict(text) for text in again.generate(prompts)] == ["B", "A"]


def test_a_person_plays_only_the_roleplayer_or_the_judge(tmp_path):
    oracle = [{"role": "system", "content": ORACLE_SYSTEM},
              {"role": "user", "content": ORACLE_GOLD_PROMPT.format(bio=BIO, task="Suggest a dinner.")}]
    with pytest.raises(StepError, match="Roleplayer or the Judge only"):
        HumanChat(stdin=io.StringIO("Pasta.\n"), stdout=io.StringIO()).generate([oracle])
    with pytest.raises(StepError, match="not a local model"):  # it cannot be the Questioner, which is trained
        load_local("human", tmp_path)


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def play(run, cache, typed: str):
    """02_simulate.py with a person as the Roleplayer: two pairs, one conversation each of two turns, each
    conversation saved when it ends (--chunk_pairs 1); `typed` is what the person types."""
    command = [sys.executable, "02_simulate.py", "--run_dir", str(run), "--cache_dir", str(cache), "--roleplayer",
               "human", "--n_conversations", "1", "--chunk_pairs", "1", "--min_turns", "2", "--max_turns", "2",
               "--question_max_tokens", "8", "--dtype", "float32"]
    return subprocess.run(command, cwd=REPO, input=typed, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_a_person_plays_the_roleplayer_stops_with_ctrl_d_and_goes_on(tmp_path, model_cache):
    run = tmp_path / "run"
    tasks = [{"task_id": "t0", "split": "A", "text": "Suggest a dinner."},
             {"task_id": "t1", "split": "A", "text": "Plan a weekend trip."}]
    write_jsonl(run / "data" / "tasks.jsonl", tasks)
    write_jsonl(run / "data" / "personas.jsonl", [{"persona_id": "p0", "split": "A", "name": "Ana", "bio": BIO}])
    write_jsonl(run / "data" / "gold.jsonl", [{"task_id": t["task_id"], "persona_id": "p0", "split": "A",
                                               "gold": "An answer."} for t in tasks])

    # The person answers the first conversation (an empty line is asked again), one turn of the second, then Ctrl-D.
    first = play(run, model_cache, "I am vegan.\n\nI cook for two.\nBy train.\n")
    assert first.returncode == 1, first.stderr[-3000:]
    assert "stopped at the end of input (Ctrl-D): finished records are kept" in first.stderr
    assert "Traceback" not in first.stderr
    assert BIO in first.stdout and 'Your request to the assistant: "Suggest a dinner."' in first.stdout
    assert first.stdout.count("Assistant asks:") == 4
    saved = read_jsonl(run / "iter0" / "conversations.partial.jsonl", "conversation")
    assert [(c["task_id"], [m["content"] for m in c["messages"] if m["role"] == "user"]) for c in saved] == [
        ("t0", ["I am vegan.", "I cook for two."])]

    # The same command goes on with the second conversation only.
    second = play(run, model_cache, "By train.\nTwo days, near the sea.\n")
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("Assistant asks:") == 2
    conversations = read_jsonl(run / "iter0" / "conversations.jsonl", "conversation")
    assert conversations[0] == saved[0]
    assert [m["content"] for m in conversations[1]["messages"] if m["role"] == "user"] == [
        "By train.", "Two days, near the sea."]
    assert all(c["roleplayer"] == "human" and c["n_turns"] == 2 for c in conversations)
