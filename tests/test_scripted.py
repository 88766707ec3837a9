"""The toy preset's scripted world (scripted.py): it must reward exactly the questions that matter."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import roles
from metrics import pair_outcome
from models import ModelPool
from roles import JUDGE_PROMPT, ORACLE_GOLD_PROMPT, PERSONA_PROMPT, ROLEPLAYER_SYSTEM, parse_verdict, unformat
from scripted import VAGUE_REPLY, ScriptedChat, mentions
from specs import parse_spec
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


def judge_outcome(world, bio, new, old):
    """pair_outcome of the scripted Judge on two answers, judged in both orders (as 05_eval.py does)."""
    verdicts = [parse_verdict(ask(world, (roles.JUDGE_SYSTEM, JUDGE_PROMPT.format(bio=bio, task=TASK, a=a, b=b)))[0])
                for a, b in ((new, old), (old, new))]
    return pair_outcome(*verdicts)


def other_value(world, bio, attribute):
    return next(k for k in world.world.sentences[attribute] if k != world.world.persona(bio)[attribute])


def test_toy_judge_rewards_right_values_and_punishes_wrong_ones_and_non_answers(world, bio):
    values = world.world.persona(bio)
    good = f"A {values['diet']} dish in the {values['cuisine']} style."
    half = f"A {values['diet']} dish."
    none = "A nice dish."
    wrong = f"A {other_value(world, bio, 'diet')} dish."
    mixed = f"A {values['cuisine']} dish, {other_value(world, bio, 'diet')}."  # one right, one wrong: 0
    assert judge_outcome(world, bio, good, none) == 1.0 and judge_outcome(world, bio, half, good) == 0.0
    assert judge_outcome(world, bio, half, none) == 1.0  # a correct value beats none
    assert judge_outcome(world, bio, wrong, none) == 0.0  # a value the user never had loses to none
    assert judge_outcome(world, bio, mixed, none) == 0.5
    assert judge_outcome(world, bio, f"Irrelevant: {values['city']}.", none) == 0.5  # only the task's attributes count
    for non_answer in (f"Are you {values['diet']}?", "What's your next question?", "I'm sorry, I cannot help.", ""):
        assert judge_outcome(world, bio, non_answer, wrong) == 0.0  # no answer loses even to a wrong one
        assert judge_outcome(world, bio, wrong, non_answer) == 1.0
    assert judge_outcome(world, bio, "What's your budget?", "") == 0.5  # two non-answers tie
    assert judge_outcome(world, bio, none, "Another dish.") == 0.5  # equal scores: the orders disagree, a tie


def test_answer_use_counts_told_used_and_hallucinated_values(world, bio):
    values = world.world.persona(bio)
    said = world.world.sentences["diet"][values["diet"]]
    conversation = [{"role": "assistant", "content": "Any dietary restrictions?"},
                    {"role": "user", "content": said + "."},
                    {"role": "assistant", "content": "Where do you live?"},
                    {"role": "user", "content": world.world.sentences["city"][values["city"]] + "."}]
    assert world.world.told(conversation) == {"diet": values["diet"], "city": values["city"]}
    use = world.world.answer_use
    assert use(f"A {values['diet']} dish.", conversation, TASK) == {"attributes": 2, "told": 1, "used": 1,
                                                                    "hallucinated": 0}
    # Naming the cuisine, which the user never told, is a guess, right or wrong.
    for cuisine in world.world.sentences["cuisine"]:
        assert use(f"A {values['diet']} {cuisine} dish.", conversation, TASK)["hallucinated"] == 1
    assert use(f"A {other_value(world, bio, 'diet')} dish.", conversation, TASK) == {
        "attributes": 2, "told": 1, "used": 0, "hallucinated": 1}
    assert use("A nice dish.", [], TASK) == {"attributes": 2, "told": 0, "used": 0, "hallucinated": 0}


@pytest.mark.parametrize("text, problem", [
    ("", "empty"), ("  ", "empty"), ("I'm sorry, I can't do that.", "refusal"), ("What is your budget?", "question"),
    ("I'm glad I could help. What's your next question?", "question"), ("Try a vegan curry tonight.", None),
    ("Since you mentioned jazz, I suggest a small club", None)])
def test_answer_problem_names_what_is_no_answer(text, problem):
    assert roles.answer_problem(text) == problem


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


def test_stratified_splits_give_every_test_task_training_tasks_of_its_family():
    """--stratify_by attributes (01_generate.stratified): every family of toy tasks (its pair of attributes) is
    spread over A, B and test in proportion; one plain shuffle leaves test tasks whose family is never trained on."""
    import collections
    import importlib
    import random

    generate = importlib.import_module("01_generate")
    source = str(REPO / "data" / "toy" / "tasks.jsonl")
    texts, family = generate.load_task_texts(source), generate.task_families(source, "attributes")
    assert len(set(family.values())) == 12

    def splits(n_tasks, seed, stratify):
        shuffled, rng = list(texts), random.Random(seed)
        rng.shuffle(shuffled)
        if stratify:
            shuffled = generate.stratified(shuffled, family, n_tasks, rng)
        cuts = [sum(n_tasks[:i]) for i in range(4)]
        return [collections.Counter(family[t] for t in shuffled[a:b]) for a, b in zip(cuts, cuts[1:])]

    def unseen(a, b, test):  # test tasks with no task of their family in A or none in B
        return sum(n for f, n in test.items() if not a[f] or not b[f])

    for seed in range(5):
        a, b, test = splits([24, 24, 24], seed, stratify=True)  # the toy preset's sizes
        assert all(a[f] == b[f] == test[f] == 2 for f in set(family.values()))
        assert unseen(*splits([36, 18, 18], seed, stratify=True)) == 0
        assert [sum(c.values()) for c in splits([8, 8, 8], seed, stratify=True)] == [8, 8, 8]
    assert max(unseen(*splits([24, 24, 24], seed, stratify=False)) for seed in range(5)) > 0


def test_the_data_step_stratifies_by_a_field_of_the_task_file(tmp_path):
    def generate(run, tasks, n_tasks):
        return subprocess.run([sys.executable, "01_generate.py", "--run_dir", str(run), "--oracle", "scripted:data/toy",
                               "--tasks", str(tasks), "--n_tasks", *n_tasks, "--n_personas", "1", "1", "1",
                               "--stratify_by", "attributes", "--cache_dir", str(tmp_path / "cache")], cwd=REPO,
                              capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)

    done = generate(tmp_path / "run", "data/toy/tasks.jsonl", ["24", "24", "24"])
    assert done.returncode == 0, done.stderr[-2000:]
    family = {t["text"]: tuple(t["attributes"]) for t in read_jsonl(REPO / "data" / "toy" / "tasks.jsonl")}
    written = read_jsonl(tmp_path / "run" / "data" / "tasks.jsonl", "task")
    for split in ("A", "B", "test"):
        counts = {f: sum(family[t["text"]] == f and t["split"] == split for t in written) for f in set(family.values())}
        assert set(counts.values()) == {2}
    args = json.loads((tmp_path / "run" / "data" / "args_01_generate.json").read_text())
    assert args["stratify_by"] == "attributes"
    # A record without the field: one error line naming the file and line, nothing written.
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"text": "Plan a trip.", "attributes": ["city", "budget"]}\n{"text": "Cook something."}\n')
    done = generate(tmp_path / "bad", tasks, ["1", "0", "1"])
    assert done.returncode == 2 and f"error: {tasks}:2: no field 'attributes'" in done.stderr
    assert not (tmp_path / "bad").exists()


def test_toy_evaluation_judges_answers_and_reports_what_they_used(tmp_path, model_cache, trained):
    """05_eval.py in the toy world (scripted Roleplayer and Judge), with conftest's adapter as m1 and
    --judge_all_conversations: the answer after every test conversation is judged in both orders by the toy Judge,
    metrics.json and the report carry the answers' use of what was revealed, and the report shows the first test
    pairs by id side by side."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    cache.mkdir()
    (cache / "SmolLM2-135M-Instruct").symlink_to((model_cache / "SmolLM2-135M-Instruct").resolve())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["--run_dir", str(run), "--cache_dir", str(cache), "--dtype", "float32"]
    done = subprocess.run([sys.executable, "01_generate.py", *common, "--tasks", "data/toy/tasks.jsonl",
                           "--oracle", "scripted:data/toy", "--n_tasks", "0", "0", "2", "--n_personas", "0", "0", "2"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shutil.copytree(trained[0] / "adapter", run / "iter0" / "adapter")
    command = [sys.executable, "05_eval.py", *common, "--iterations", "1", "--questioner", "embedded",
               "--roleplayer", "scripted:data/toy", "--judge", "scripted:data/toy", "--n_conversations", "2",
               "--test_pairs", "4", "--question_max_tokens", "12", "--final_max_tokens", "16",
               "--judge_all_conversations"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    m1 = metrics["models"]["m1"]
    assert m1["win_rate"]["n"] == 8 and m1["win_rate"]["unparseable"] == 0  # 4 pairs x 2 conversations
    assert metrics["judged_per_pair"] == 2 and len(m1["win_rate"]["ci95_cluster"]) == 2
    judgments = read_jsonl(run / "eval" / "m1" / "judgments.jsonl", "judgment")
    assert len(judgments) == 16 and all(j["output"].startswith("Response A scores") for j in judgments)
    assert {j["conv_id"] for j in judgments} == {0, 1}
    for name in ("m0/answers.jsonl", "m1/answers.jsonl", "m1/answers_m0.jsonl"):
        assert len(read_jsonl(run / "eval" / name, "answer")) == 8
    for name in ("m0", "m1"):
        answers = metrics["models"][name]["answers"]
        assert 0 <= answers["no_answer"] <= 1 and 0 <= answers["hallucinated"] <= 1
        kinds = sum(answers[f"no_answer_{k}"] for k in ("question", "refusal", "empty"))
        assert answers["no_answer"] == pytest.approx(kinds)
        assert "revealed_used" in answers
    assert "answers_m0" in m1 and metrics["provenance"]["commit"]
    report = (run / "eval" / "report.md").read_text()
    assert "## Final answers" in report and "values never told" in report
    assert "The scripted Judge never depends on the order" in report  # why its order consistency is low
    # What changed, side by side: the first 3 test pairs by id, m0's and m1's conversation 0, answers, verdicts.
    assert "## What changed: m0 and m1 side by side" in report and "The first 3 test pairs by id" in report
    pairs = sorted({(j["task_id"], j["persona_id"]) for j in judgments})
    shown = [line for line in report.splitlines() if line.startswith("### ")]
    assert [line.split(":")[0] for line in shown] == [f"### {t} x {p}" for t, p in pairs[:3]]
    answers = {(a["task_id"], a["persona_id"], a["conv_id"]): a["answer"]
               for a in read_jsonl(run / "eval" / "m1" / "answers.jsonl", "answer")}
    section = report.split(shown[0])[1].split("### ")[0]
    assert answers[(*pairs[0], 0)].replace("\n", "<br>").replace("|", "\\|") in section
    assert "| Questioner, turn 1 |" in section and "| final answer |" in section
    assert "with m1's answer shown as A" in section
    # A rerun that asks for other answers (one per pair) than the evaluation was made with says so, reusing nothing.
    done = subprocess.run(command[:-1], cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 2 and "--judge_all_conversations True -> False" in done.stderr
