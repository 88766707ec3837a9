"""bench/told.py on a tiny synthetic toy run: the distinct relevant values each conversation revealed, whether the
first reply already stated one, and the conversations in which the user had to state the same relevant value twice."""

import json
import subprocess
import sys

from scripted import VAGUE_REPLY
from utils import write_jsonl_atomic

from conftest import REPO

RECIPE = "Can you suggest a recipe for dinner tonight?"  # data/toy/tasks.jsonl: it needs diet and cuisine


def test_told_counts_distinct_relevant_values_and_repeats(tmp_path):
    run = tmp_path / "run"
    write_jsonl_atomic(run / "data" / "tasks.jsonl", [{"task_id": "t0", "split": "A", "text": RECIPE}])
    replies = [["I am vegan.", "I love Japanese food."],  # both relevant values: 2
               ["I am vegan.", "I am vegan."],  # the same value twice: 1, repeated
               ["I live in Lisbon.", VAGUE_REPLY],  # an irrelevant value only: 0
               [VAGUE_REPLY, "I love Japanese food."]]  # a relevant value, but not in the first reply: 1
    conversations = [{"task_id": "t0", "persona_id": "p0", "conv_id": i, "messages": [
        m for reply in turns for m in ({"role": "assistant", "content": "Any preference?"},
                                       {"role": "user", "content": reply})]} for i, turns in enumerate(replies)]
    write_jsonl_atomic(run / "iter0" / "conversations.jsonl", conversations)
    write_jsonl_atomic(run / "iter0" / "sft.jsonl", [{"task_id": "t0", "persona_id": "p0", "conv_id": 0}])
    write_jsonl_atomic(run / "eval" / "m0" / "conversations.jsonl", conversations[2:])
    done = subprocess.run([sys.executable, "bench/told.py", str(run)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("{")[0].strip(): json.loads("{" + line.split("{", 1)[1])
            for line in done.stdout.splitlines() if "{" in line}
    assert rows["iter0 all"] == {"n": 4, "values": 1.0, "share_0_1_2": [0.25, 0.5, 0.25], "first": 0.5,
                                 "repeated": 0.25}
    assert rows["iter0 kept"] == {"n": 1, "values": 2.0, "share_0_1_2": [0.0, 0.0, 1.0], "first": 1.0,
                                 "repeated": 0.0}
    assert rows["m0 all"] == {"n": 2, "values": 0.5, "share_0_1_2": [0.5, 0.5, 0.0], "first": 0.0, "repeated": 0.0}
