"""Text longer than a model's context: a local model cuts the middle of what does not fit and says so;
the steps store that in each record ("truncated") and count it in their summary. Nothing is dropped, and
no model is ever fed positions past its context (docs/REFERENCE.md, "Bad inputs").

The cheap cases shrink the embedded model's context (8192 tokens) to a few hundred tokens, with
`context_length` in process or STARGATE_CONTEXT_LENGTH for a step. The server's side, a 400 "context
length" answer, is tested against llama.cpp in test_openai_server.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_cuda

from chat_format import context_override, cut_middle, encode_chat
from utils import StepError, read_jsonl

REPO = Path(__file__).resolve().parents[1]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
LONG = [SYSTEM, {"role": "user", "content": "Hi, I'm Ana. " + "I walk my two dogs every morning. " * 30
                 + "Can you suggest a recipe for dinner tonight?"}]
SHORT = [SYSTEM, {"role": "user", "content": "Name a fruit."}]


def test_cut_middle_keeps_the_head_and_the_tail():
    ids = list(range(10))
    assert cut_middle(ids, 10) == ids and cut_middle(ids, 12) == ids
    assert cut_middle(ids, 6) == [0, 1, 2, 7, 8, 9]
    assert cut_middle(ids, 5) == [0, 1, 7, 8, 9]


def test_the_context_is_the_models_own_unless_shortened(lm, monkeypatch):
    config = json.loads((Path(lm.model.name_or_path) / "config.json").read_text())
    assert lm.context_length == config["max_position_embeddings"] == 8192
    monkeypatch.setenv("STARGATE_CONTEXT_LENGTH", "300")
    assert context_override() == 300
    for bad in ("many", "1", "-5"):
        monkeypatch.setenv("STARGATE_CONTEXT_LENGTH", bad)
        with pytest.raises(StepError, match="STARGATE_CONTEXT_LENGTH must be a whole number"):
            context_override()


def test_generation_from_a_prompt_over_the_context_keeps_its_head_and_tail(lm, monkeypatch):
    monkeypatch.setattr(lm, "context_length", 96)
    full = encode_chat(lm.tokenizer, LONG)[0]
    assert len(full) > 200
    assert lm.truncated([LONG, SHORT], max_new_tokens=8) == [True, False]
    ids, cut = lm.prompt_ids(LONG, max_new_tokens=8)
    assert cut and len(ids) == 96 - 8 and ids == full[:44] + full[-44:]  # instructions ... latest turn + "assistant"
    with pytest.raises(StepError, match="a cap of 96 new tokens leaves no room for the prompt"):
        lm.generate([LONG], max_new_tokens=96)

    # What the model is fed: never a position past the context, prompt and new tokens together.
    positions = []
    spy = lm.model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: positions.append(int(kwargs["position_ids"].max())), with_kwargs=True)
    try:
        text, short = lm.generate([LONG, SHORT], max_new_tokens=8)
    finally:
        spy.remove()
    assert text.strip() and short.strip()
    assert positions and max(positions) < 96


def test_scoring_over_the_context_cuts_the_prompt_and_says_so(lm, monkeypatch):
    response = "Try a lentil curry."
    (full_logprob, n_full, cut), = lm.score([LONG], [response])
    assert not cut
    monkeypatch.setattr(lm, "context_length", 96)
    prompt_ids, response_ids = encode_chat(lm.tokenizer, LONG, response)
    (logprob, n_tokens, cut), = lm.score([LONG], [response])
    assert cut and n_tokens == n_full == len(response_ids)  # the whole response is scored ...
    kept = cut_middle(prompt_ids, 96 - len(response_ids))  # ... after the prompt's head and tail
    ids = torch.tensor([kept + response_ids])
    with torch.inference_mode():
        logprobs = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), -1)
    expected = sum(logprobs[t - 1, ids[0, t]].item() for t in range(len(kept), ids.shape[1]))
    assert logprob == pytest.approx(expected, abs=1e-3) and logprob != pytest.approx(full_logprob, abs=1e-3)

    # A response longer than half the context: only its head is scored, and n_tokens says how much.
    long_response = "Chop the onions. " * 30
    (_, n_tokens, cut), = lm.score([SHORT], [long_response])
    assert cut and n_tokens == 96 - len(encode_chat(lm.tokenizer, SHORT)[0])
    assert n_tokens < len(encode_chat(lm.tokenizer, SHORT, long_response)[1])


def test_a_prompt_longer_than_the_real_context_is_cut_to_it(lm):
    """SmolLM2's own context, 8192 tokens, with no override: the fitting is checked on the CPU. Running the
    model on 8192 positions is left to the CUDA test below: on the CPU with one thread it took 60 s to
    generate and 46 s to score (measured on a busy 2-core machine), too slow for the suite."""
    huge = [SYSTEM, {"role": "user", "content": "Hi, I'm Ana. " + "word " * 9000 + "What should I cook?"}]
    assert len(encode_chat(lm.tokenizer, huge)[0]) > 9000
    ids, cut = lm.prompt_ids(huge, max_new_tokens=16)
    assert cut and len(ids) == 8192 - 16
    assert lm.truncated([huge, SHORT], max_new_tokens=16) == [True, False]


@requires_cuda
def test_generation_and_scoring_past_the_real_context_on_cuda(model_cache):
    from local_models import LocalLM

    gpu = LocalLM("embedded", cache_dir=model_cache)
    huge = [SYSTEM, {"role": "user", "content": "Hi, I'm Ana. " + "word " * 9000 + "What should I cook?"}]
    (text,) = gpu.generate([huge], max_new_tokens=16)
    assert isinstance(text, str)
    (logprob, n_tokens, cut), = gpu.score([huge], ["Pasta."])
    assert cut and n_tokens == 3 and logprob < 0


# --- A step with a short context: records say which prompts were cut, the summary counts them ---------

def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_steps_record_and_count_what_was_cut(tmp_path, model_cache):
    """Two pairs, one with a task far longer than a 400-token context: 02 and 03 finish, keep both
    pairs, flag exactly the long one's records and count them in their summary lines."""
    run = tmp_path / "run"
    long_task = "Help me plan my week. " + "I have a lot of meetings and errands to fit in. " * 40
    tasks = [{"task_id": "t0", "split": "A", "text": "Can you suggest a recipe for dinner?"},
             {"task_id": "t1", "split": "A", "text": long_task}]
    write_jsonl(run / "data" / "tasks.jsonl", tasks)
    write_jsonl(run / "data" / "personas.jsonl", [{"persona_id": "p0", "split": "A", "name": "Ana",
                                                    "bio": "My name is Ana. I am a vegan nurse."}])
    write_jsonl(run / "data" / "gold.jsonl", [{"task_id": t["task_id"], "persona_id": "p0", "split": "A",
                                               "gold": "Here is a plan."} for t in tasks])
    env = {**os.environ, "STARGATE_CONTEXT_LENGTH": "400"}
    common = ["--run_dir", str(run), "--cache_dir", str(model_cache), "--n_conversations", "1"]
    outputs = []
    for script, extra in (("02_simulate.py", ["--max_turns", "1", "--question_max_tokens", "6",
                                              "--answer_max_tokens", "6"]),
                          ("03_select.py", ["--answer_max_tokens", "6"])):
        done = subprocess.run([sys.executable, script, *common, *extra], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(done.stdout)

    for name, kind in (("conversations", "conversation"), ("scores", "score"), ("sft", "sft")):
        records = read_jsonl(run / "iter0" / f"{name}.jsonl", kind)
        assert {r["task_id"]: r["truncated"] for r in records} == {"t0": False, "t1": True}, name
    assert "1 with a prompt cut to fit the context" in outputs[0]
    assert "cut to fit the context: 1 scored pairs, 1 answer prompts" in outputs[1]
