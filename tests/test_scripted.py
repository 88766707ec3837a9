"""The toy preset's scripted world (scripted.py): it must reward exactly the questions that matter."""

import json
import os
import subprocess
import sys

import pytest

import roles
from models import ModelPool, parse_spec
from report import pair_outcome
from roles import JUDGE_PROMPT, ORACLE_GOLD_PROMPT, PERSONA_PROMPT, ROLEPLAYER_SYSTEM, parse_verdict, unformat
from scripted import VAGUE_REPLY, ScriptedChat, mentions
from utils import StepError, read_jsonl

from conftest import REPO

TASK = "Can you suggest a recipe for dinner tonight?"  # depends on diet and cuisine in data/toy/tasks.jsonl


@pytest.fixture(scope="module")
def world():
    return ScriptedChat(REPO / "data" / "toy")


def ask(chat, *prompts):
    return chat.generate([[{"role": "system", "content": s}, {"role": "user", "content": u}] for s, u in prompts])


@pytest.fixture(scope="module")
def bio(world):
    prompt = PERSONA_PROMPT.format(examples="(examples)", name="Ada")
    text, = ask(world, (roles.ORACLE_SYSTEM, prompt))
    return text


@pytest.mark.parametrize("template", [PERSONA_PROMPT, ORACLE_GOLD_PROMPT, JUDGE_PROMPT, ROLEPLAYER_SYSTEM])
def test_unformat_inverts_format(template):
    fields = {f: f"<{f} with {{braces}}, newlines\n and 'quotes'>" for f in
              ("examples", "name", "bio", "task", "a", "b") if "{" + f + "}" in template}
    assert unformat(template, template.format(**fields)) == fields
    assert unformat(template, "something else entirely") is None


def test_a_persona_has_one_value_of_every_attribute_drawn_from_its_name_and_seed(world, bio):
    assert bio.startswith("My name is Ada.")
    assert set(world.world.persona(bio)) == set(world.world.attributes)
    again = ask(world, (roles.ORACLE_SYSTEM, PERSONA_PROMPT.format(examples="x", name="Ada")))[0]
    assert again == bio  # deterministic: a rerun writes the same persona
    others = {world.generate([[{"role": "user", "content": PERSONA_PROMPT.format(examples="x", name="Ada")}]],
                             seed=s)[0] for s in range(8)}
    assert len(others) > 1  # the seed varies it


def test_gold_states_exactly_the_task_s_relevant_values(world, bio):
    gold, = ask(world, (roles.ORACLE_SYSTEM, ORACLE_GOLD_PROMPT.format(bio=bio, task=TASK)))
    values = world.world.persona(bio)
    assert values["diet"] in gold and values["cuisine"] in gold
    assert values["city"] not in gold and values["music"] not in gold
    assert roles.gold_problem(gold) is None


@pytest.mark.parametrize("question, attribute", [
    ("Do you have any dietary restrictions?", "diet"),
    ("Are there any foods you avoid?", "diet"),
    ("What type of cuisine do you enjoy?", "cuisine"),
    ("Where are you located?", "city"),
    ("What do you like to do for fun?", "hobby"),
    ("How much money do you want to spend?", "budget"),
    ("What's your favourite colour?", None),
    ("Can you help me?", None),
    ("I can recommend a Mexican meal for you.", None),  # not a question: the world rewards only questions
])
def test_roleplayer_reveals_the_attribute_a_question_asks_about(world, bio, question, attribute):
    system = ROLEPLAYER_SYSTEM.format(bio=bio, task=TASK)
    reply, = ask(world, (system, question))
    if attribute is None:
        assert reply == VAGUE_REPLY
    else:
        sentence = world.world.sentences[attribute][world.world.persona(bio)[attribute]]
        assert reply.lower() == sentence.lower() + "."


def test_judge_prefers_the_answer_that_uses_what_matters_and_ties_by_order(world, bio):
    values = world.world.persona(bio)
    good = f"A {values['diet']} dish in the {values['cuisine']} style."
    half = f"A {values['diet']} dish."
    none = "A nice dish."

    def outcome(new, old):
        verdicts = [parse_verdict(ask(world, (roles.JUDGE_SYSTEM, JUDGE_PROMPT.format(bio=bio, task=TASK, a=a, b=b)))[0])
                    for a, b in ((new, old), (old, new))]
        return pair_outcome(*verdicts)

    assert outcome(good, none) == 1.0 and outcome(half, good) == 0.0
    assert outcome(good, half) == 1.0
    assert outcome(none, "Another dish.") == 0.5  # equal fit: the orders disagree, a tie, never unparseable


def test_hits_count_questions_about_relevant_attributes(world):
    conversation = [{"role": "assistant", "content": "Are you vegetarian?"}, {"role": "user", "content": "Yes."},
                    {"role": "assistant", "content": "Where do you live?"}, {"role": "user", "content": "Lisbon."}]
    assert world.world.hits(conversation, TASK) == [True, False]


def test_unknown_prompts_and_missing_worlds_fail_clearly(world, tmp_path):
    with pytest.raises(StepError, match="cannot play this role"):
        ask(world, ("You are a helpful assistant.", "Hi"))
    with pytest.raises(StepError, match="world.json: file not found"):
        ScriptedChat(tmp_path)
    with pytest.raises(StepError, match="not a local model"):
        ModelPool().local("scripted:data/toy")
    assert parse_spec("scripted:data/toy") == ("scripted", "data/toy", None)


def test_every_toy_task_names_known_attributes():
    world = json.loads((REPO / "data" / "toy" / "world.json").read_text())["attributes"]
    tasks = read_jsonl(REPO / "data" / "toy" / "tasks.jsonl")
    assert len(tasks) >= 36
    assert all(len(t["attributes"]) == 2 and set(t["attributes"]) <= set(world) for t in tasks)
    keywords = [k for a in world.values() for k in a["values"]]
    # A keyword inside another value's sentence would let the Judge credit the wrong value.
    assert all(sum(mentions(s, k) for a in world.values() for s in a["values"].values()) == 1 for k in keywords)


def test_toy_data_step_with_the_scripted_oracle(tmp_path, model_cache):
    """01_generate.py, unchanged, with the scripted Oracle: structured personas and keyword gold answers."""
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "01_generate.py", "--run_dir", str(run), "--tasks", "data/toy/tasks.jsonl",
                           "--oracle", "scripted:data/toy", "--n_tasks", "2", "2", "2", "--n_personas", "2", "2", "3",
                           "--cache_dir", str(tmp_path / "cache")], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    gold = read_jsonl(run / "data" / "gold.jsonl", "gold")
    assert len(gold) == 2 * 2 + 2 * 2 + 2 * 3 and not any(g["flag"] for g in gold)
    assert "0 of 14 gold responses flagged" in done.stdout
