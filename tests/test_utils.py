"""Unit tests for the plumbing in utils.py (JSONL hand-offs, seeds), the pure functions of roles.py and the
dialogue loop of 02_simulate.py."""

import json

import pytest

import roles
import stargate
import utils
from utils import StepError


def write_lines(path, lines, end="\n"):
    """Write raw lines (strings, or dicts dumped as JSON) exactly as given; `end` follows the last one."""
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text(text + end, encoding="utf-8")
    return path


def persona(pid, split="train"):
    return {"persona_id": pid, "split": split, "name": f"Name{pid}", "bio": f"bio of {pid}"}


def score(tid, pid, conv_id=0, logprob=-1.5):
    return {"task_id": tid, "persona_id": pid, "conv_id": conv_id, "iteration": 0, "logprob": logprob}


def leftovers(folder):
    """Temporary files left by an atomic write (named .<file>.*.tmp)."""
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# --- read_jsonl: every problem names file:line ----------------------------------------------------------

def test_read_jsonl_returns_records_and_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "personas.jsonl", [persona("p1"), "", "   ", persona("p2")])
    assert [r["persona_id"] for r in utils.read_jsonl(path, "persona")] == ["p1", "p2"]


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(StepError, match="file not found"):
        utils.read_jsonl(tmp_path / "nope.jsonl", "task")


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "personas.jsonl", [persona("p1"), persona("p2"), '{"persona_id": "p3",'])
    with pytest.raises(StepError, match=rf"{path}:3: malformed JSON"):
        utils.read_jsonl(path, "persona")


def test_line_numbers_count_blank_lines(tmp_path):
    path = write_lines(tmp_path / "personas.jsonl", [persona("p1"), "", "not json"])
    with pytest.raises(StepError, match=rf"{path}:3:"):
        utils.read_jsonl(path, "persona")


def test_missing_field_names_file_line_and_field(tmp_path):
    broken = persona("p2")
    del broken["bio"]
    path = write_lines(tmp_path / "personas.jsonl", [persona("p1"), broken])
    with pytest.raises(StepError, match=rf"{path}:2: persona record needs field 'bio' of type str"):
        utils.read_jsonl(path, "persona")


@pytest.mark.parametrize("field, value", [
    ("conv_id", "0"),        # a string where an int is needed
    ("conv_id", True),       # JSON true is not an id, although bool is an int in Python
    ("conv_id", 1.0),        # a float is not an int id
    ("logprob", "-1.5"),     # a string where a number is needed
    ("logprob", None),
])
def test_wrong_type_names_file_line_and_field(tmp_path, field, value):
    bad = dict(score("t1", "p1"), **{field: value})
    path = write_lines(tmp_path / "scores.jsonl", [score("t0", "p1"), bad])
    with pytest.raises(StepError, match=rf"{path}:2: score record needs field '{field}'"):
        utils.read_jsonl(path, "score")


def test_an_integer_is_a_valid_float_field(tmp_path):
    path = write_lines(tmp_path / "scores.jsonl", [score("t0", "p1", logprob=-3)])
    assert utils.read_jsonl(path, "score")[0]["logprob"] == -3


def test_a_line_that_is_not_an_object_is_rejected(tmp_path):
    path = write_lines(tmp_path / "tasks.jsonl", ['["t0", "train", "text"]'])
    with pytest.raises(StepError, match=rf"{path}:1: expected a JSON object, got list"):
        utils.read_jsonl(path, "task")


@pytest.mark.parametrize("messages", [[], [{"role": "user"}], [{"role": "user", "content": 3}], ["hi"]])
def test_bad_messages_are_rejected(tmp_path, messages):
    record = {"task_id": "t0", "persona_id": "p0", "conv_id": 0, "iteration": 0, "messages": messages}
    path = write_lines(tmp_path / "sft.jsonl", [record])
    with pytest.raises(StepError, match=rf"{path}:1: 'messages' must be"):
        utils.read_jsonl(path, "sft")


def test_duplicate_ids_name_both_lines(tmp_path):
    gold = [{"task_id": "t0", "persona_id": "p0", "split": "train", "gold": "g"},
            {"task_id": "t0", "persona_id": "p1", "split": "train", "gold": "g"},
            {"task_id": "t0", "persona_id": "p0", "split": "train", "gold": "again"}]
    path = write_lines(tmp_path / "gold.jsonl", gold)
    with pytest.raises(StepError, match=rf"{path}:3: duplicate id \('t0', 'p0'\) \(first seen on line 1\)"):
        utils.read_jsonl(path, "gold")
    assert len(utils.read_jsonl(path, "gold", unique=False)) == 3


# --- Torn tails: a crash while appending -----------------------------------------------------------------

def test_final_file_with_torn_tail_raises(tmp_path):
    path = write_lines(tmp_path / "scores.jsonl", [score("t0", "p0"), score("t1", "p0"), '{"task_id": "t2'],
                       end="")
    with pytest.raises(StepError, match=rf"{path}:3: last line is incomplete"):
        utils.read_jsonl(path, "score")


def test_read_partial_drops_torn_tail_and_later_appends_start_on_a_fresh_line(tmp_path):
    path = write_lines(tmp_path / "scores.partial.jsonl", [score("t0", "p0"), '{"task_id": "t1", "pers'],
                       end="")
    done = utils.read_partial(path, "score")
    assert [r["task_id"] for r in done] == ["t0"]
    assert path.read_text().endswith("\n")
    utils.append_jsonl(path, [score("t1", "p0")])
    # The file reads as a complete, strict JSONL file: the torn line is gone and nothing is glued to it.
    assert [r["task_id"] for r in utils.read_jsonl(path, "score")] == ["t0", "t1"]
    assert leftovers(tmp_path) == []


def test_read_partial_of_a_missing_file_is_empty(tmp_path):
    assert utils.read_partial(tmp_path / "none.partial.jsonl", "score") == []


def test_read_partial_leaves_a_complete_file_untouched(tmp_path):
    path = write_lines(tmp_path / "scores.partial.jsonl", [score("t0", "p0")])
    before = path.stat().st_mtime_ns, path.read_bytes()
    assert len(utils.read_partial(path, "score")) == 1
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before


def test_read_partial_still_rejects_a_bad_complete_line(tmp_path):
    path = write_lines(tmp_path / "scores.partial.jsonl", ["{oops", '{"torn'], end="")
    with pytest.raises(StepError, match=rf"{path}:1: malformed JSON"):
        utils.read_partial(path, "score")


# --- Writing ----------------------------------------------------------------------------------------------

def test_write_jsonl_atomic_round_trips_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    records = [{"task_id": "t0", "text": "crème brûlée, 寿司"}, {"task_id": "t1", "text": "line\nbreak"}]
    utils.write_jsonl_atomic(path, records)
    assert utils.read_jsonl(path) == records
    assert "寿司" in path.read_text(encoding="utf-8")  # readable UTF-8, not \u escapes
    assert leftovers(path.parent) == []


def test_write_jsonl_atomic_replaces_the_old_file(tmp_path):
    path = tmp_path / "out.jsonl"
    utils.write_jsonl_atomic(path, [{"a": i} for i in range(5)])
    utils.write_jsonl_atomic(path, [{"b": 1}])
    assert utils.read_jsonl(path) == [{"b": 1}]
    assert leftovers(tmp_path) == []


def test_a_failed_atomic_write_keeps_the_old_file_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    utils.write_jsonl_atomic(path, [{"old": True}])

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(utils.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        utils.write_jsonl_atomic(path, [{"new": True}])
    assert utils.read_jsonl(path) == [{"old": True}]
    assert leftovers(tmp_path) == []


def test_append_jsonl_creates_folders_and_appends(tmp_path):
    path = tmp_path / "a" / "b" / "x.jsonl"
    utils.append_jsonl(path, [{"i": 0}, {"i": 1}])
    utils.append_jsonl(path, [{"i": 2}])
    utils.append_jsonl(path, [])
    assert path.read_text().splitlines() == ['{"i": 0}', '{"i": 1}', '{"i": 2}']


def test_write_json_atomic(tmp_path):
    path = tmp_path / "args.json"
    utils.write_json_atomic(path, {"seed": 1, "name": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"seed": 1, "name": "é"}
    assert leftovers(tmp_path) == []


# --- finish_partial ----------------------------------------------------------------------------------------

def test_finish_partial_writes_sorted_final_file_and_removes_partial(tmp_path):
    partial, final = tmp_path / "scores.partial.jsonl", tmp_path / "scores.jsonl"
    utils.append_jsonl(partial, [score("t1", "p0"), score("t0", "p1"), score("t0", "p0")])
    order = [("t0", "p0", 0), ("t0", "p1", 0), ("t1", "p0", 0)]
    utils.finish_partial(partial, final, "score", order)
    assert [utils.record_key("score", r) for r in utils.read_jsonl(final, "score")] == order
    assert not partial.exists()
    assert leftovers(tmp_path) == []


def test_finish_partial_with_missing_records_keeps_partial(tmp_path):
    partial, final = tmp_path / "scores.partial.jsonl", tmp_path / "scores.jsonl"
    utils.append_jsonl(partial, [score("t0", "p0")])
    before = partial.read_bytes()
    with pytest.raises(StepError, match=r"1 records missing \(first \('t1', 'p0', 0\)\)"):
        utils.finish_partial(partial, final, "score", [("t0", "p0", 0), ("t1", "p0", 0)])
    assert partial.read_bytes() == before
    assert not final.exists()


# --- resumable: chunked, appended, finished atomically -----------------------------------------------------

def scores_of(index, chunk, chunk_keys, calls):
    calls.append(index)
    return [score(tid, pid, conv) for tid, pid, conv in chunk]


def test_resumable_computes_every_chunk_and_writes_the_final_file(tmp_path):
    final = tmp_path / "scores.jsonl"
    keys = [("t0", "p0", 0), ("t0", "p0", 1), ("t1", "p0", 0), ("t1", "p1", 0), ("t2", "p0", 0)]
    calls = []
    records = utils.resumable(final, "score", keys, keys, 2, "scoring",
                              lambda *chunk: scores_of(*chunk, calls))
    assert calls == [0, 1, 2]
    assert [utils.record_key("score", r) for r in records] == keys
    assert utils.read_jsonl(final, "score") == records
    assert not (tmp_path / "scores.partial.jsonl").exists()
    # Done: a rerun reads the final file and computes nothing.
    assert utils.resumable(final, "score", keys, keys, 2, "scoring", lambda *chunk: scores_of(*chunk, calls)) \
        == records and calls == [0, 1, 2]


def test_resumable_after_a_crash_computes_only_the_missing_chunks(tmp_path):
    final = tmp_path / "scores.jsonl"
    keys = [("t0", "p0", 0), ("t0", "p1", 0), ("t1", "p0", 0), ("t1", "p1", 0)]
    calls = []

    def crash_on_second_chunk(index, chunk, chunk_keys):
        if index == 1:
            raise KeyboardInterrupt
        return scores_of(index, chunk, chunk_keys, calls)

    with pytest.raises(KeyboardInterrupt):
        utils.resumable(final, "score", keys, keys, 2, "scoring", crash_on_second_chunk)
    assert not final.exists()
    assert len(utils.read_jsonl(tmp_path / "scores.partial.jsonl", "score")) == 2
    with open(tmp_path / "scores.partial.jsonl", "a") as f:  # and the crash tore a line
        f.write('{"task_id": "t1", "pers')
    records = utils.resumable(final, "score", keys, keys, 2, "scoring", lambda *chunk: scores_of(*chunk, calls))
    assert calls == [0, 1]
    assert [utils.record_key("score", r) for r in records] == keys


def test_iterations_alternate_splits_and_adapters():
    assert [stargate.split_of_iteration(t) for t in range(4)] == ["A", "B", "A", "B"]
    assert stargate.questioner_adapter("runs/x", 0) is None
    name, folder = stargate.questioner_adapter("runs/x", 2)
    assert name == "m2" and folder.as_posix() == "runs/x/iter1/adapter"


# --- load_pairs -------------------------------------------------------------------------------------------

def make_run(tmp_path, gold_lines):
    data = tmp_path / "data"
    data.mkdir()
    write_lines(data / "tasks.jsonl", [{"task_id": t, "split": "train", "text": f"task {t}"} for t in ("t0", "t1")])
    write_lines(data / "personas.jsonl", [persona("p0"), persona("p1", "test")])
    write_lines(data / "gold.jsonl", gold_lines)
    return data


def gold(tid, pid, split="train"):
    return {"task_id": tid, "persona_id": pid, "split": split, "gold": f"gold {tid} {pid}"}


def test_load_pairs_joins_filters_and_sorts(tmp_path):
    make_run(tmp_path, [gold("t1", "p0"), gold("t0", "p1", "test"), gold("t0", "p0")])
    pairs = utils.load_pairs(tmp_path, "train", usable_only=True)
    assert [(p["task_id"], p["persona_id"]) for p in pairs] == [("t0", "p0"), ("t1", "p0")]
    assert pairs[0] == {"task_id": "t0", "persona_id": "p0", "split": "train", "task": "task t0",
                        "name": "Namep0", "bio": "bio of p0", "gold": "gold t0 p0"}
    assert len(utils.load_pairs(tmp_path, usable_only=True)) == 3


def test_load_pairs_gold_naming_a_missing_persona(tmp_path):
    data = make_run(tmp_path, [gold("t0", "p0"), gold("t1", "p9")])
    with pytest.raises(StepError, match=rf"{data / 'gold.jsonl'}:2: names persona 'p9', which is not in "
                                        r"personas.jsonl"):
        utils.load_pairs(tmp_path, usable_only=True)


def test_load_pairs_gold_naming_a_missing_task_in_another_split(tmp_path):
    # A broken reference is an error even when it is outside the split asked for.
    data = make_run(tmp_path, [gold("t0", "p0"), gold("t7", "p1", "test")])
    with pytest.raises(StepError, match=rf"{data / 'gold.jsonl'}:2: names task 't7'"):
        utils.load_pairs(tmp_path, "train", usable_only=True)


def test_load_pairs_error_names_the_file_line_after_a_blank_line(tmp_path):
    data = make_run(tmp_path, ["", gold("t0", "p0"), gold("t1", "p9")])
    with pytest.raises(StepError, match=rf"{data / 'gold.jsonl'}:3:"):
        utils.load_pairs(tmp_path, usable_only=True)


def test_load_pairs_leaves_out_pairs_whose_gold_was_flagged(tmp_path):
    make_run(tmp_path, [gold("t0", "p0") | {"flag": "refusal"}, gold("t1", "p0") | {"flag": None}])
    assert [p["task_id"] for p in utils.load_pairs(tmp_path, "train", usable_only=True)] == ["t1"]
    assert [p["task_id"] for p in utils.load_pairs(tmp_path, "train", usable_only=False)] == ["t0", "t1"]


def test_load_pairs_without_gold_says_which_step_to_run(tmp_path):
    with pytest.raises(StepError, match="run 01_generate.py"):
        utils.load_pairs(tmp_path, usable_only=True)


def test_load_pairs_of_an_empty_split(tmp_path):
    make_run(tmp_path, [gold("t0", "p0")])
    with pytest.raises(StepError, match="no usable pairs in split 'test'"):
        utils.load_pairs(tmp_path, "test", usable_only=True)


# --- Seeds ------------------------------------------------------------------------------------------------

def test_stable_hash_is_fixed_across_processes_and_versions():
    # Hard-coded (Python's hash() would differ per process): a change here changes the seeds of every
    # record of every earlier run.
    assert utils.stable_hash("t000", "s00", 0) == 3437122862
    assert utils.stable_hash() == 1330892193


def test_stable_hash_depends_on_every_part_and_their_order():
    values = {utils.stable_hash("t0", "p0", 0), utils.stable_hash("t0", "p0", 1),
              utils.stable_hash("t0", "p1", 0), utils.stable_hash("p0", "t0", 0)}
    assert len(values) == 4
    assert all(0 <= v < 2 ** 32 for v in values)


# --- roles.py: pure functions -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, verdict", [
    ("Verdict: B", "B"),
    ("verdict: a", "A"),
    ("**Verdict:** A", "A"),
    ("**Verdict: B**", "B"),
    ("VERDICT - B", "B"),
    ("Verdict: (A)", "A"),
    ("A mentions her diet; B does not.\nVerdict: A", "A"),
    ("Verdict: A. Response A uses the vegan detail, B ignores it.", "A"),
    ("Verdict: A\nOn reflection B fits the budget better.\nVerdict: B", "B"),
    ("Response A is better.", None),
    ("A is better", None),
    ("Verdict: Both are equally good.", None),
    ("", None),
    (None, None),
])
def test_parse_verdict(text, verdict):
    assert roles.parse_verdict(text) == verdict


@pytest.mark.parametrize("text, problem", [
    ("", "empty"),
    ("   \n", "empty"),
    ("I'm sorry, but as an AI I cannot give personal advice.", "refusal"),
    ("Unfortunately, I am unable to help with that.", "refusal"),
    ("I apologise for the confusion.", "refusal"),
    ("Popeye the Barbarian:\n\nPopeye the Barbarian:\n\nPopeye the Barbarian:\n", "repetition"),
    ("Try a lentil curry. It is cheap. Try a lentil curry. Try a lentil curry!", "repetition"),
    ("Since you are vegan and on a tight budget, cook a big pot of lentil curry.", None),
    ("You can't go wrong with a walk in the park.", None),  # "can't" alone is no refusal
])
def test_gold_problem(text, problem):
    assert roles.gold_problem(text) == problem


def test_parse_verdict_bold_label_before_colon():
    assert roles.parse_verdict("**Verdict**: A") == "A"


@pytest.mark.parametrize("text, question", [
    ("What is your budget? Also, do you cook?", "What is your budget?"),
    ("  Do you have any allergies?\nI ask because...", "Do you have any allergies?"),
    ("Tell me more about yourself.  ", "Tell me more about yourself."),
    ("", ""),
])
def test_cut_at_question(text, question):
    assert stargate.cut_at_question(text) == question


DIALOGUE = [{"role": "assistant", "content": "Any allergies?"}, {"role": "user", "content": "Peanuts."},
            {"role": "assistant", "content": "Budget?"}, {"role": "user", "content": "Ten dollars."}]


def test_roleplayer_view_swaps_roles_and_carries_the_persona():
    view = roles.roleplayer_view("I am Maya, a vegan student.", "Suggest a dinner.", DIALOGUE)
    assert view[0]["role"] == "system"
    assert "I am Maya, a vegan student." in view[0]["content"] and "Suggest a dinner." in view[0]["content"]
    assert [m["role"] for m in view[1:]] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in view[1:]] == [m["content"] for m in DIALOGUE]
    assert DIALOGUE[0]["role"] == "assistant"  # the stored dialogue is not changed


def test_questioner_never_sees_the_persona():
    bio = "SECRET-BIO vegan student"
    for view in (roles.questioner_view("Maya", "Suggest a dinner.", DIALOGUE),
                 roles.answer_view("Maya", "Suggest a dinner.", DIALOGUE)):
        assert view[0] == {"role": "system", "content": roles.QUESTIONER_SYSTEM}
        assert view[1:1 + len(roles.QUESTIONER_EXAMPLES)] == roles.QUESTIONER_EXAMPLES
        first = {"role": "user", "content": "Hi, I'm Maya. Suggest a dinner."}
        assert view[1 + len(roles.QUESTIONER_EXAMPLES)] == first
        assert not any(bio in m["content"] for m in view)


def test_answer_view_ends_with_the_restated_task_as_a_user_turn():
    view = roles.answer_view("Maya", "Suggest a dinner.", DIALOGUE)
    nudged = f"Peanuts.\n\n{roles.NEXT_QUESTION}"  # a question followed this answer; none follows the last
    dialogue = view[2 + len(roles.QUESTIONER_EXAMPLES):-1]
    assert dialogue == [DIALOGUE[0], dict(DIALOGUE[1], content=nudged), *DIALOGUE[2:]]
    assert view[-1]["role"] == "user"
    assert view[-1]["content"] == roles.FINAL_ANSWER_PROMPT.format(task="Suggest a dinner.")
    assert view[-1]["content"].endswith("Suggest a dinner.")


class FakeChat:
    """Answers every prompt with a fixed text; remembers what it was shown."""

    def __init__(self, reply):
        self.reply, self.seen = reply, []

    def generate(self, prompts, seed=0, desc=None, **settings):
        self.seen.append((prompts, seed, settings))
        return [self.reply for _ in prompts]


def test_simulate_runs_each_conversation_for_its_own_number_of_turns():
    questioner, roleplayer = FakeChat("Any allergies? And your budget?"), FakeChat("  Peanuts.  ")
    items = [{"name": "Maya", "task": "Dinner?", "bio": "bio M", "n_turns": 2},
             {"name": "Ben", "task": "Lunch?", "bio": "bio B", "n_turns": 1}]
    gen = {"questioner": {"max_new_tokens": 8}, "roleplayer": {"max_new_tokens": 9}}
    dialogues, cut = stargate.simulate(questioner, roleplayer, items, gen, seed=5)
    turn = [{"role": "assistant", "content": "Any allergies?"}, {"role": "user", "content": "Peanuts."}]
    assert dialogues == [turn + turn, turn]
    assert cut == [False, False]  # not local models: only a local model cuts a prompt to fit its context
    assert [len(prompts) for prompts, _, _ in questioner.seen] == [2, 1]
    assert [seed for _, seed, _ in questioner.seen] == [5, 1005]
    assert questioner.seen[0][2] == {"max_new_tokens": 8} and roleplayer.seen[0][2] == {"max_new_tokens": 9}
    # The Roleplayer sees its own persona and the question as a user turn.
    first_rp_prompt = roleplayer.seen[0][0][0]
    assert "bio M" in first_rp_prompt[0]["content"]
    assert first_rp_prompt[1:] == [{"role": "user", "content": "Any allergies?"}]


def test_each_question_is_trained_in_the_context_it_was_asked_in():
    # 03's training record is answer_view(dialogue) + the final answer; the Questioner asked turn k's question
    # seeing questioner_view(dialogue[:2k]). The two must agree on everything before that question, and
    # only the answers a question followed carry the request for a next question.
    record = roles.answer_view("Maya", "Suggest a dinner.", DIALOGUE)
    for k in range(len(DIALOGUE) // 2):
        asked_in = roles.questioner_view("Maya", "Suggest a dinner.", DIALOGUE[:2 * k])
        assert record[:len(asked_in)] == asked_in
        assert record[len(asked_in)] == DIALOGUE[2 * k]  # then the question itself
        if k:
            assert asked_in[-1]["content"].endswith(roles.NEXT_QUESTION)
    assert not any(roles.NEXT_QUESTION in m["content"] for m in record[-2:])  # the last answer, the final request
