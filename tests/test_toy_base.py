"""The toy preset's base model (toy_base.py): a warm-up on answering with what the user told, and nothing else."""

import json
import subprocess
import sys

import pytest

from models import ModelPool
from roles import questioner_view
from scripted import mentions
from toy_base import warmup_records
from utils import read_jsonl

from conftest import REPO

WORLD = REPO / "data" / "toy"
FIRST_TURN = len(questioner_view("x", "y", [])) - 1  # the user's request, after the instructions and example
EXAMPLE_QUESTIONS = {q for a in json.loads((WORLD / "world.json").read_text())["attributes"].values()
                     for q in a["questions"]}


@pytest.fixture(scope="module")
def world_chat():
    return ModelPool().chat(f"scripted:{WORLD}")


@pytest.fixture(scope="module")
def warmup(world_chat, lm):
    """Warm-up records from 8 tasks, the embedded model (fp32) asking."""
    from local_models import LocalChat

    tasks = read_jsonl(WORLD / "warmup_tasks.jsonl")[:8]
    return tasks, *warmup_records(LocalChat(lm, None), world_chat, tasks, 3, 24, seed=0)


def test_the_warm_up_shares_no_task_with_any_split_of_a_run(warmup):
    """Runs draw their A, B and test splits from tasks.jsonl only, so the warm-up never sees a test task."""
    tasks, records, _ = warmup
    toy_tasks = {t["text"] for t in read_jsonl(WORLD / "tasks.jsonl")}
    every_warmup_task = {t["text"] for t in read_jsonl(WORLD / "warmup_tasks.jsonl")}
    assert every_warmup_task and not every_warmup_task & toy_tasks
    asked = {r["messages"][FIRST_TURN]["content"].split(". ", 1)[1] for r in records}
    assert asked == {t["text"] for t in tasks}  # the records' requests are the warm-up tasks, every one


def test_trained_are_the_model_s_own_turns_and_an_answer_naming_exactly_what_the_user_told(warmup, world_chat):
    tasks, records, revealed = warmup
    world = world_chat.world
    assert revealed[2] >= len(tasks) // 2 and revealed[0] >= len(tasks) // 2  # dialogues that told both or none
    assert sum(revealed) == len(records) == 3 * len(tasks)
    for record in records:
        *context, answer = record["messages"]
        assert answer["role"] == "assistant" and answer["train"] is True
        # The instructions, the worked example, every user turn and the world's example questions are never
        # trained on; the one question the model asked itself is (it anchors its asking), as the model asked it.
        trained = [m for m in context if m["train"]]
        assert len(trained) == 1 and trained[0]["role"] == "assistant"
        assert context.index(trained[0]) > FIRST_TURN and trained[0]["content"] not in EXAMPLE_QUESTIONS
        dialogue = context[FIRST_TURN + 1:-1]  # between the request and the request for the final answer
        told = world.told(dialogue)
        for attribute in world.attributes:
            named = world.stated(answer["content"], attribute)
            assert named == ({told[attribute]} if attribute in told else set()), (attribute, answer["content"])
        task = context[FIRST_TURN]["content"].split(". ", 1)[1]
        assert world.answer_use(answer["content"], dialogue, task)["hallucinated"] == 0


def test_suggestions_name_no_value_of_the_world(world_chat):
    """A general answer (nothing told) must not state a preference by accident."""
    keywords = [k for values in world_chat.world.sentences.values() for k in values]
    for task in read_jsonl(WORLD / "warmup_tasks.jsonl"):
        assert not any(mentions(task["suggestion"], k) for k in keywords), task


def test_toy_base_refuses_warm_up_tasks_that_a_run_could_test_on(tmp_path):
    world = tmp_path / "world"
    world.mkdir()
    (world / "world.json").write_text((WORLD / "world.json").read_text())
    task = read_jsonl(WORLD / "tasks.jsonl")[0]
    (world / "tasks.jsonl").write_text(json.dumps(task) + "\n")
    (world / "warmup_tasks.jsonl").write_text(json.dumps(dict(task, suggestion="a walk")) + "\n")
    done = subprocess.run([sys.executable, "toy_base.py", "--world", str(world), "--out", str(tmp_path / "base")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "shares a task with tasks.jsonl" in done.stderr
    assert not (tmp_path / "base").exists()
