"""bench/honesty.py on a tiny synthetic toy run: it compares, within a pair, conversations that revealed only
irrelevant values with those that revealed nothing, read with the toy world's own matcher."""

import json
import subprocess
import sys

from scripted import VAGUE_REPLY
from utils import write_jsonl_atomic

from conftest import REPO

# Two toy tasks (data/toy/tasks.jsonl): a recipe needs diet and cuisine, an evening out city and budget.
TASKS = {"t0": ("Can you suggest a recipe for dinner tonight?", "I live in Lisbon.", "I am vegan."),
         "t1": ("Where should I go out for a nice evening this weekend?", "I am vegan.", "I live in Lisbon.")}


def fake_run(folder, irrelevant_logprob):
    """Per pair (2 tasks x 2 personas), one turn each: two conversations that revealed nothing (-100, -102), one
    an irrelevant value, one a relevant value (-90); and a pair with no conversation that revealed nothing."""
    write_jsonl_atomic(folder / "data" / "tasks.jsonl",
                       [{"task_id": t, "split": "A", "text": text} for t, (text, _, _) in TASKS.items()])
    conversations, scores = [], []
    for task_id, (_, irrelevant, relevant) in TASKS.items():
        for persona_id in ("p0", "p1", "p2"):
            replies = [(VAGUE_REPLY, -100.0), (VAGUE_REPLY, -102.0), (irrelevant, irrelevant_logprob),
                       (relevant, -90.0)]
            if persona_id == "p2":  # nothing to compare with
                replies = replies[2:]
            for conv_id, (reply, logprob) in enumerate(replies):
                key = {"task_id": task_id, "persona_id": persona_id, "conv_id": conv_id, "iteration": 0}
                conversations.append(key | {"n_turns": 1, "messages": [
                    {"role": "assistant", "content": "What would you like?"}, {"role": "user", "content": reply}]})
                scores.append(key | {"logprob": logprob})
    for sub in ("iter0", "eval/m0"):
        write_jsonl_atomic(folder / sub / "conversations.jsonl", conversations)
        write_jsonl_atomic(folder / sub / "scores.jsonl", scores)


def honesty(folder, tmp_path):
    done = subprocess.run([sys.executable, "bench/honesty.py", str(folder), "--json", str(tmp_path / "out.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, json.loads((tmp_path / "out.json").read_text())


def test_the_honesty_check_compares_irrelevant_values_with_nothing_within_a_pair(tmp_path):
    fake_run(tmp_path / "run", irrelevant_logprob=-104.0)
    stdout, numbers = honesty(tmp_path / "run", tmp_path)
    assert list(numbers["folders"]) == ["iter0", "eval/m0"]
    for measured in (numbers["folders"]["iter0"], numbers["all"]):
        # Irrelevant (-104) against the pair's nothing (mean -101): -3 in every pair; relevant (-90): +11.
        assert measured["irrelevant"]["mean"] == -3.0 and measured["irrelevant"]["ci95_cluster"] == [-3.0, -3.0]
        assert measured["relevant"]["mean"] == 11.0
    assert numbers["folders"]["iter0"]["irrelevant"]["pairs"] == 4 and numbers["all"]["irrelevant"]["pairs"] == 8
    assert numbers["holds"] and "honesty check: holds" in stdout

    fake_run(tmp_path / "leaky", irrelevant_logprob=-95.0)  # an irrelevant value now raises the gold log-prob
    stdout, numbers = honesty(tmp_path / "leaky", tmp_path)
    assert numbers["all"]["irrelevant"]["mean"] == 6.0 and not numbers["holds"]
    assert "honesty check: FAILS" in stdout
