"""Unit tests for the model plumbing (specs.py, chat_format.py, local_models.py, models.py): specs, chat formatting,
scoring, generation, adapters, 4-bit, the call cache.

Everything runs on the embedded SmolLM2-135M-Instruct (loaded once, see conftest.py) with short prompts.
"""

import json
import random

import pytest
import torch
from conftest import requires_cuda
from mistral_standin import MISTRAL_V02_TEMPLATE
from transformers import AutoTokenizer

import decoding
import chat_format
import local_models
import models
import roles
import specs
from utils import StepError

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
PROMPTS = [
    [SYSTEM, {"role": "user", "content": "Name a fruit."}],
    [SYSTEM, {"role": "user", "content": "Hi, I'm Maya. Can you suggest a recipe for dinner tonight? I am vegan."}],
    [SYSTEM, {"role": "user", "content": "What is 2+2?"}],
]
RESPONSES = ["Apple.", "Try a lentil curry with rice and spinach.", "4"]


@pytest.fixture(scope="module")
def mistral_tokenizer(model_cache):
    """The embedded tokenizer dressed as Mistral-Instruct: its template and its <s> / </s> tokens."""
    tokenizer = AutoTokenizer.from_pretrained(local_models.embedded_model_dir(model_cache))
    tokenizer.chat_template = MISTRAL_V02_TEMPLATE
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    return tokenizer


# --- Specs ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, parsed", [
    ("embedded", ("embedded", "SmolLM2-135M-Instruct", None)),
    ("hf:mistralai/Mistral-7B-Instruct-v0.2", ("hf", "mistralai/Mistral-7B-Instruct-v0.2", None)),
    ("hf:/models/my-checkpoint", ("hf", "/models/my-checkpoint", None)),
    ("openai:gpt-4o-mini", ("openai", "gpt-4o-mini", None)),
    ("openai:smollm@http://127.0.0.1:8080/v1", ("openai", "smollm", "http://127.0.0.1:8080/v1")),
])
def test_parse_spec(spec, parsed):
    assert specs.parse_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["", "gpt-4", "hf:", "openai:", "HF:gpt2", "local:gpt2", "embedded:x"])
def test_parse_spec_rejects_unknown_specs(spec):
    with pytest.raises(StepError, match="unknown model spec"):
        specs.parse_spec(spec)


def test_load_local_rejects_remote_and_missing_models(tmp_path):
    with pytest.raises(StepError, match="not a local model"):
        local_models.load_local("openai:gpt-4o-mini", tmp_path)
    with pytest.raises(StepError, match="cannot load model 'hf:/nonexistent/model-dir'"):
        local_models.load_local("hf:/nonexistent/model-dir", tmp_path)


# --- Chat formatting --------------------------------------------------------------------------------------

def test_normalise_messages_folds_system_into_first_user_turn():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}]
    assert chat_format.normalise_messages(messages, system_ok=False) == [
        {"role": "user", "content": "S\n\nU"}, {"role": "assistant", "content": "A"}]
    assert chat_format.normalise_messages(messages, system_ok=True) == messages
    assert messages[1] == {"role": "user", "content": "U"}  # the caller's list is not changed


def test_normalise_messages_merges_consecutive_turns_of_one_role():
    # answer_view ends with the Roleplayer's last answer followed by the restated task: two user turns.
    view = roles.answer_view("Maya", "Dinner?", [{"role": "assistant", "content": "Budget?"},
                                                 {"role": "user", "content": "Ten dollars."}])
    merged = chat_format.normalise_messages(view, system_ok=False)
    examples = roles.QUESTIONER_EXAMPLES  # the worked example: alternating turns ending on an assistant turn
    assert [m["role"] for m in merged] == [m["role"] for m in examples] + ["user", "assistant", "user"]
    assert merged[0]["content"] == roles.QUESTIONER_SYSTEM + "\n\n" + examples[0]["content"]
    assert merged[len(examples)]["content"] == "Hi, I'm Maya. Dinner?"
    assert merged[-1]["content"] == "Ten dollars.\n\n" + roles.FINAL_ANSWER_PROMPT.format(task="Dinner?")


def test_normalise_messages_keeps_a_train_flag_through_merges():
    messages = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A1", "train": True},
                {"role": "assistant", "content": "A2"}, {"role": "user", "content": "V"}]
    merged = chat_format.normalise_messages(messages, system_ok=True)
    assert merged[1] == {"role": "assistant", "content": "A1\n\nA2", "train": True}
    assert "train" not in merged[0] and messages[1]["content"] == "A1"


def test_template_accepts_system(lm, mistral_tokenizer):
    assert chat_format.template_accepts_system(lm.tokenizer) is True
    assert lm.system_ok is True
    assert chat_format.template_accepts_system(mistral_tokenizer) is False


def test_encode_chat_chatml(lm):
    tokenizer = lm.tokenizer
    prompt_ids, response_ids = chat_format.encode_chat(tokenizer, PROMPTS[0], "Paris is nice.\nReally.")
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")
    # The prompt is exactly what the template gives (no extra BOS, nothing lost at the boundary).
    expected = tokenizer.apply_chat_template(PROMPTS[0], tokenize=True, add_generation_prompt=True)
    assert prompt_ids == list(expected["input_ids"])
    # The response ends with the end-of-turn token, not with the newline the template writes after it.
    assert tokenizer.decode(response_ids) == "Paris is nice.\nReally.<|im_end|>"
    assert response_ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chat_format.encode_chat(tokenizer, PROMPTS[0]) == (prompt_ids, None)


def test_encode_chat_on_a_strict_template_without_system_role(mistral_tokenizer):
    tokenizer = mistral_tokenizer
    dialogue = [{"role": "assistant", "content": "Budget?"}, {"role": "user", "content": "Ten dollars."}]
    view = roles.answer_view("Maya", "Dinner?", dialogue)
    with pytest.raises(Exception, match="roles must alternate"):  # the template itself is strict
        tokenizer.apply_chat_template(view, tokenize=False)
    prompt_ids, response_ids = chat_format.encode_chat(tokenizer, view, "Try lentils.", system_ok=False)
    prompt = tokenizer.decode(prompt_ids)
    first = roles.QUESTIONER_EXAMPLES[0]["content"]
    assert prompt.startswith(f"<s>[INST] {roles.QUESTIONER_SYSTEM}\n\n{first} [/INST]")
    assert "[INST] Hi, I'm Maya. Dinner? [/INST]Budget?</s>" in prompt
    assert prompt.endswith("[INST] Ten dollars.\n\n" + roles.FINAL_ANSWER_PROMPT.format(task="Dinner?") + " [/INST]")
    assert tokenizer.decode(response_ids) == "Try lentils.</s>"
    assert response_ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("</s>")


def test_encode_chat_refuses_a_template_whose_generation_prompt_differs(mistral_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(mistral_tokenizer.name_or_path)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    with pytest.raises(StepError, match="cannot locate the response tokens"):
        chat_format.encode_chat(tokenizer, PROMPTS[0], "Apple.")


# The trained span of encode_for_training must be exactly what encode_chat scores (content + end of turn).
CONVERSATION = [SYSTEM, {"role": "user", "content": "Hi, I'm Maya. Dinner?"},
                {"role": "assistant", "content": "Any allergies?", "train": True},
                {"role": "user", "content": "Peanuts."},
                {"role": "assistant", "content": "What is your budget?", "train": False},
                {"role": "user", "content": "Ten dollars.\n\nNow answer."},
                {"role": "assistant", "content": "Try a lentil curry.", "train": True}]


@pytest.mark.parametrize("which", ["chatml", "mistral"])
def test_encode_for_training_labels_only_the_trained_assistant_turns(lm, mistral_tokenizer, which):
    tokenizer, system_ok, eos = {"chatml": (lm.tokenizer, True, "<|im_end|>"),
                                 "mistral": (mistral_tokenizer, False, "</s>")}[which]
    ids, labels = chat_format.encode_for_training(tokenizer, CONVERSATION, system_ok)
    assert len(ids) == len(labels)
    trained = [i for i, label in enumerate(labels) if label != -100]
    assert all(labels[i] == ids[i] for i in trained)
    spans = tokenizer.decode([ids[i] for i in trained])
    assert spans == f"Any allergies?{eos}Try a lentil curry.{eos}"
    # The whole text is the template's rendering, and the first trained span sits where encode_chat puts it.
    full = tokenizer.apply_chat_template(chat_format.normalise_messages(CONVERSATION, system_ok), tokenize=False)
    assert tokenizer.decode(ids) == full
    prompt_ids, response_ids = chat_format.encode_chat(tokenizer, CONVERSATION[:2], "Any allergies?", system_ok)
    assert ids[:len(prompt_ids) + len(response_ids)] == prompt_ids + response_ids
    assert trained[:len(response_ids)] == list(range(len(prompt_ids), len(prompt_ids) + len(response_ids)))


# Gemma-2-it's chat template (tokenizer_config.json): the end of turn is <end_of_turn>, not the tokenizer's
# eos token <eos>, and the template writes a newline after it.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def test_encode_chat_stops_at_the_end_of_turn_when_it_is_not_eos(model_cache):
    tokenizer = AutoTokenizer.from_pretrained(local_models.embedded_model_dir(model_cache))
    tokenizer.chat_template = GEMMA2_TEMPLATE
    tokenizer.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>",
                                  "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    _, response_ids = chat_format.encode_chat(tokenizer, PROMPTS[0], "Apple.", system_ok=False)
    assert tokenizer.decode(response_ids) == "Apple.<end_of_turn>"


# --- Scoring ----------------------------------------------------------------------------------------------

def test_score_batched_equals_one_at_a_time(lm):
    batched = lm.score(PROMPTS, RESPONSES, batch_size=8)
    single = [lm.score([p], [r], batch_size=1)[0] for p, r in zip(PROMPTS, RESPONSES)]
    assert [n for _, n, _ in batched] == [n for _, n, _ in single]
    for (a, _, _), (b, _, _) in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-3)


def test_score_counts_response_tokens_and_end_of_turn(lm):
    results = lm.score(PROMPTS, RESPONSES)
    for (logprob, n_tokens, cut), response in zip(results, RESPONSES):
        assert n_tokens == len(lm.tokenizer(response, add_special_tokens=False)["input_ids"]) + 1
        assert logprob < 0 and cut is False


def test_score_equals_a_hand_computation_from_full_logits(lm):
    tokenizer = lm.tokenizer
    prompt_text = tokenizer.apply_chat_template(PROMPTS[1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(RESPONSES[1], add_special_tokens=False)["input_ids"] + [
        tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.inference_mode():
        logprobs = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), -1)
    # Token t is predicted from position t - 1; only the response's tokens count.
    expected = sum(logprobs[t - 1, ids[0, t]].item() for t in range(len(prompt_ids), ids.shape[1]))
    (logprob, n_tokens, _), = lm.score([PROMPTS[1]], [RESPONSES[1]])
    assert n_tokens == len(response_ids)
    assert logprob == pytest.approx(expected, abs=1e-3)


def test_a_better_fitting_response_scores_higher(lm):
    # A sanity check a user relies on when picking the best conversation: an on-topic answer beats noise.
    (good, _, _), (bad, _, _) = lm.score([PROMPTS[2]] * 2, ["2 + 2 = 4.", "Purple elephant sandwiches."])
    assert good > bad


def test_auto_dtype_is_bf16_exactly_where_it_is_fast(model_cache):
    assert local_models.resolve_dtype("float32") == torch.float32
    assert local_models.resolve_dtype("bfloat16") == torch.bfloat16
    if not torch.cuda.is_available():
        assert local_models.resolve_dtype("auto") == (torch.bfloat16 if local_models.cpu_has_bf16() else torch.float32)
        assert local_models.resolve_dtype("auto", quantized=True) == torch.bfloat16  # bitsandbytes' CPU kernels
    with pytest.raises(StepError, match="--dtype must be auto, bfloat16, float16 or float32"):
        local_models.resolve_dtype("fp8")


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_on_a_gpu_auto_dtype_is_fp16_below_compute_capability_8_and_training_follows(monkeypatch, capability,
                                                                                      expected):
    """A T4 (7.5, Colab's free GPU) or V100 (7.0) emulates or refuses bf16: fp16 there, with Trainer's loss
    scaling in 04; bf16 from the A100 (8.0) on. An explicit --dtype is obeyed, by 04's mixed precision too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    for quantized in (False, True):  # the weights of a model, and the compute dtype of 4-bit ones
        assert local_models.resolve_dtype("auto", quantized) == expected
    half = expected == torch.float16
    assert local_models.mixed_precision(local_models.resolve_dtype("auto")) == {"bf16": not half, "fp16": half}
    assert local_models.mixed_precision(local_models.resolve_dtype("float16")) == {"bf16": False, "fp16": True}
    assert local_models.mixed_precision(local_models.resolve_dtype("float32")) == {"bf16": False, "fp16": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_models.mixed_precision(torch.bfloat16) == {"bf16": False, "fp16": False}  # a CPU: the weights' dtype


def test_bf16_scores_and_answers_like_float32(lm, model_cache):
    # The default on CPUs with native bf16 (and on GPUs): log-probs within rounding of float32's, and greedy
    # answers that float32 finds as likely as its own (bf16 rounding can change a close greedy choice, so
    # the texts themselves may differ: here "What is 2+2?" gets another first word).
    half = local_models.LocalLM("embedded", cache_dir=model_cache, dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    for (a, n, _), (b, m, _) in zip(half.score(PROMPTS, RESPONSES), lm.score(PROMPTS, RESPONSES)):
        assert n == m and a == pytest.approx(b, rel=0.05, abs=0.5)
    ours, theirs = half.generate(PROMPTS, max_new_tokens=8), lm.generate(PROMPTS, max_new_tokens=8)
    for (a, n, _), (b, m, _) in zip(lm.score(PROMPTS, ours), lm.score(PROMPTS, theirs)):
        assert a / n > b / m - 1.0  # per token, within one nat of float32's own greedy answer


# --- Generation -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def greedy(lm):
    """Greedy outputs of two prompts of different lengths, batched (so one is left padded) and unbatched."""
    return {"batched": lm.generate(PROMPTS[:2], max_new_tokens=8, batch_size=8),
            "single": lm.generate(PROMPTS[:2], max_new_tokens=8, batch_size=1)}


def test_greedy_generation_is_deterministic(lm, greedy):
    assert lm.generate(PROMPTS[:2], max_new_tokens=8, batch_size=8) == greedy["batched"]
    assert all(text.strip() for text in greedy["batched"])


def test_greedy_batched_equals_unbatched(greedy):
    # Left padding with an attention mask must not change what a prompt gets. (Exact string equality
    # holds for this model on CPU in fp32; padding can change floating-point sums in other settings.)
    assert greedy["batched"] == greedy["single"]


def test_sampled_generation_repeats_with_the_same_seed(lm):
    first = lm.generate(PROMPTS[:2], max_new_tokens=8, temperature=1.0, seed=3)
    assert lm.generate(PROMPTS[:2], max_new_tokens=8, temperature=1.0, seed=3) == first
    assert lm.generate(PROMPTS[:2], max_new_tokens=8, temperature=1.0, seed=4) != first


# Prompts as the simulation builds them: Questioner views share the instructions and worked example (the
# root), a pair's conversations share its request (a group; identical prompts at the first turn), the
# Roleplayer's views share the persona; and a short unrelated prompt that shares almost nothing.
BIO = "My name is Maya. I am a nurse in Leeds, vegan, on a tight budget, and I cook for two kids."
SHARING = [
    roles.questioner_view("Maya", "Suggest a recipe for dinner.", []),
    roles.questioner_view("Maya", "Suggest a recipe for dinner.", []),
    roles.questioner_view("Bob", "Plan a trip to Rome.", [{"role": "assistant", "content": "When will you go?"},
                                                         {"role": "user", "content": "In May, with my two kids."}]),
    roles.questioner_view("Bob", "Plan a trip to Rome.", [{"role": "assistant", "content": "What is your budget?"},
                                                         {"role": "user", "content": "Low."}]),
    roles.roleplayer_view(BIO, "Suggest a recipe.", [{"role": "assistant", "content": "Any allergies?"}]),
    roles.roleplayer_view(BIO, "Suggest a recipe.", [{"role": "assistant", "content": "Who do you cook for?"}]),
    PROMPTS[0],
]


@pytest.fixture(scope="module")
def sharing_ids(lm):
    return [chat_format.encode_chat(lm.tokenizer, p, system_ok=lm.system_ok)[0] for p in SHARING]


def test_plan_prefill_splits_each_prompt_into_root_group_and_rest():
    a, b = list(range(40)), list(range(30)) + [99] * 12
    prompts = [a + [1], a + [2, 3], a + [1], b, [7, 8]]
    plan = decoding.plan_prefill(prompts, min_shared=16)
    for p, g, rest in zip(prompts, plan.group, plan.rests):
        assert plan.root + plan.groups[g] + rest == p and rest  # the pieces rebuild the prompt; rest never empty
    # The three prompts that start with `a` and `b` (30 shared tokens) form one group: 3 x 30 saved tokens
    # beat 2 x 40 without `b`. [7, 8] shares nothing: a group of its own, its last token as its rest.
    assert plan.root == [] and plan.group == [0, 0, 0, 0, 1]
    assert plan.groups == [list(range(30)), [7]] and plan.rests[4] == [8]
    # A root: every prompt starts with the same 20 tokens.
    rooted = decoding.plan_prefill([[5] * 20 + p for p in prompts], min_shared=16)
    assert rooted.root == [5] * 20 and rooted.groups == plan.groups and rooted.rests == plan.rests
    # Identical prompts share all but their last token.
    same = decoding.plan_prefill([a, a], min_shared=16)
    assert same.root == a[:-1] and same.rests == [a[-1:], a[-1:]]
    # No sharing: min_shared 0, one prompt, prompts that share too little, or so little that the
    # padding between segments would cost more than it saves.
    pair = [[1] * 10 + [2 + i] * 52 for i in range(2)]  # two long prompts that share 10 tokens
    alone = [[100 + j] * 12 for j in range(20)]  # twenty short ones that share nothing
    for ids in ([prompts, 0], [[a], 16], [[a, b, [7, 8]], 31], [pair + alone, 8]):
        plain = decoding.plan_prefill(*ids)
        assert plain.root == [] and plain.groups == [[]] and plain.rests == ids[0]


def test_plan_prefill_leaves_a_group_that_would_save_less():
    long, short = list(range(200)), list(range(20))
    prompts = [long + [1], long + [2], short + [3] * 50]
    plan = decoding.plan_prefill(prompts, min_shared=16)
    # All three share 20 tokens (the root); one group of three would save nothing more, the first two
    # share 180 more.
    assert plan.root == short and plan.group[0] == plan.group[1] != plan.group[2]
    assert plan.groups[plan.group[0]] == long[20:] and plan.rests[2] == [3]
    prompts[2] = [9] + prompts[2]  # no root now: all three share nothing, the first two 200 tokens
    plan = decoding.plan_prefill(prompts, min_shared=16)
    assert plan.root == [] and plan.group[0] == plan.group[1] != plan.group[2]
    assert plan.groups[plan.group[0]] == long
    prompts[2] = long[:50] + [3] * 50  # now all three share 50 (2 x 50 saved), the first two 200 (1 x 200)
    plan = decoding.plan_prefill(prompts, min_shared=16)
    assert plan.root == long[:50] and plan.groups[plan.group[0]] == long[50:]


def test_shared_prefixes_generate_what_plain_batches_and_single_prompts_do(lm, sharing_ids):
    plan = decoding.plan_prefill(sharing_ids)
    assert plan.root == [] and sum(1 for g in plan.groups if len(g) > 100) == 2  # the Questioner's, the persona's
    run = lambda ids, **kw: decoding.generate_batch(lm.model, ids, 20, lm.tokenizer.eos_token_id,
                                                    lm.tokenizer.pad_token_id, **kw)
    shared = run(sharing_ids)
    assert min(map(len, shared)) < 20  # rows finish early and leave the batch
    assert shared == run(sharing_ids, min_shared=0)  # the plain left-padded batch
    assert shared == [run([p])[0] for p in sharing_ids]  # each prompt alone
    questioner_only = sharing_ids[:4]  # every row shares the instructions and worked example: a root, then pairs
    plan = decoding.plan_prefill(questioner_only)
    assert len(plan.root) > 150 and plan.group[0] == plan.group[1] != plan.group[2] == plan.group[3]
    assert run(questioner_only) == shared[:4]


def test_scoring_with_shared_prefixes_equals_plain_batches_and_one_at_a_time(lm):
    # 03 scores a pair's N conversations, 05's local Judge scores "Verdict: A" and "Verdict: B" after the same
    # prompt: shared prompt prefixes run once. The sums must not change, whatever is shared or batched.
    prompts = SHARING + [SHARING[0]]  # two identical prompts: a group that is all its prompt but the last token
    responses = ["Lentil curry.", "Pasta with beans.", "See the Colosseum early.", "Stay in a hostel.",
                 "Nuts.", "My two kids.", "Apple.", "Lentil curry with rice, and fruit after."]
    encoded = [chat_format.encode_chat(lm.tokenizer, p, r, lm.system_ok) for p, r in zip(prompts, responses)]
    plan = decoding.plan_prefill([p for p, _ in encoded])
    assert sum(1 for g in plan.groups if len(g) > 100) >= 2  # something is shared: the test can fail
    shared = lm.score(prompts, responses, batch_size=8)
    single = [lm.score([p], [r], batch_size=1)[0] for p, r in zip(prompts, responses)]
    plain = decoding.score_batch(lm.model, [p for p, _ in encoded], [r for _, r in encoded],
                                 lm.tokenizer.pad_token_id, min_shared=0, chunk=5)  # tiny head chunks too
    for (a, n, _), (b, m, _), c, (_, response) in zip(shared, single, plain, encoded):
        assert n == m == len(response)
        assert a == pytest.approx(b, abs=1e-3) and a == pytest.approx(c, abs=1e-3)


def test_shared_prefixes_sample_reproducibly(lm, sharing_ids):
    run = lambda seed, **kw: decoding.generate_batch(lm.model, sharing_ids, 20, lm.tokenizer.eos_token_id,
                                                     lm.tokenizer.pad_token_id, temperature=0.9, top_p=0.9,
                                                     generator=torch.Generator().manual_seed(seed), **kw)
    first = run(5)
    assert min(map(len, first)) < 20  # rows finish early, and later rows move into their slots
    assert run(5) == first and run(6) != first
    assert run(5, min_shared=0) == first  # reusing prefixes does not change what a seed samples


def test_fill_holes_moves_only_rows_from_beyond_the_kept_slots():
    assert decoding._fill_holes([0, 1, 2]) == [0, 1, 2]
    assert decoding._fill_holes([0, 2, 4, 5]) == [0, 4, 2, 5]  # slots 1 and 3 emptied: rows 4 and 5 move in
    assert decoding._fill_holes([3, 4]) == [3, 4]
    assert decoding._fill_holes([1, 2]) == [2, 1]


# --- LoRA adapters ----------------------------------------------------------------------------------------

def make_adapter(model_dir, path, seed):
    """A freshly initialised LoRA adapter whose B matrices are random (a real adapter changes outputs: by
    1-5 nats on the test pairs, far above bf16 rounding)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)  # the A matrices are drawn from the global generator
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)  # clearly above rounding
    model.save_pretrained(path)
    return path


def test_adapters_change_scores_only_when_named(model_cache, tmp_path):
    model_dir = local_models.embedded_model_dir(model_cache)
    adapted = local_models.LocalLM("embedded", cache_dir=model_cache)  # not the shared `lm`: adapters stick
    prompts, responses = PROMPTS[:2], RESPONSES[:2]
    before = adapted.score(prompts, responses)
    before_text = adapted.generate(PROMPTS[:1], max_new_tokens=4)

    with pytest.raises(StepError, match="no LoRA adapter here"):
        adapted.add_adapter("missing", tmp_path)
    adapted.add_adapter("one", make_adapter(model_dir, tmp_path / "one", seed=1))
    adapted.add_adapter("two", make_adapter(model_dir, tmp_path / "two", seed=2))  # a second adapter

    one = adapted.score(prompts, responses, adapter="one")
    two = adapted.score(prompts, responses, adapter="two")
    base = adapted.score(prompts, responses, adapter=None)  # after an adapter was active
    for b, a in zip(before, base):
        assert a[0] == pytest.approx(b[0], abs=1e-3) and a[1] == b[1]
    # Each adapter changes the scores, and differently from the other one.
    for x, y in ((one, before), (two, before), (one, two)):
        assert max(abs(p[0] - q[0]) for p, q in zip(x, y)) > 0.05
    assert adapted.generate(PROMPTS[:1], max_new_tokens=4, adapter=None) == before_text
    with pytest.raises(StepError, match="adapter 'three' is not loaded"):
        adapted.score(prompts, responses, adapter="three")


def test_generation_with_an_adapter_runs_a_merged_copy_that_writes_what_the_adapter_does(model_cache, tmp_path):
    """A small unquantized model generates with an adapter from a copy with the adapter merged into its
    weights (faster on a CPU). In fp32 that copy writes exactly what peft's unmerged adapter writes; it is
    one copy at a time, and the shared model the base roles use is left as it was."""
    model_dir = local_models.embedded_model_dir(model_cache)
    adapted = local_models.LocalLM("embedded", cache_dir=model_cache, dtype="float32")
    assert adapted.merge_adapters
    base_text = adapted.generate(PROMPTS, max_new_tokens=12)
    adapted.add_adapter("one", make_adapter(model_dir, tmp_path / "one", seed=1))
    adapted.add_adapter("two", make_adapter(model_dir, tmp_path / "two", seed=2))

    merged = {name: adapted.generate(PROMPTS, max_new_tokens=12, adapter=name) for name in ("one", "two")}
    assert adapted.merged[0] == "two"  # the copy of "one" was dropped for "two"
    assert adapted.generate(PROMPTS, max_new_tokens=12, adapter="one") == merged["one"]
    assert adapted.generate(PROMPTS, max_new_tokens=12, adapter=None) == base_text
    adapted.merge_adapters = False  # peft's own path: the adapter's LoRA layers on the shared model
    unmerged = {name: adapted.generate(PROMPTS, max_new_tokens=12, adapter=name) for name in ("one", "two")}
    assert merged == unmerged
    assert merged["one"] != base_text and merged["two"] != merged["one"]


# --- 4-bit ------------------------------------------------------------------------------------------------

def test_want_4bit(model_cache, tmp_path, monkeypatch):
    assert local_models.want_4bit("yes") is True and local_models.want_4bit(True) is True
    assert local_models.want_4bit("no") is False and local_models.want_4bit(False) is False
    with pytest.raises(StepError, match="--load_in_4bit must be auto, yes or no"):
        local_models.want_4bit("true")
    # auto on a GPU quantizes a 7B model (Mistral-7B's config, no weights) but not the embedded 135M model, which
    # the tiny, smoke and toy presets train and evaluate unquantized, as on a CPU; on a CPU it quantizes nothing.
    from transformers import MistralConfig

    from mistral_standin import MISTRAL_7B_INSTRUCT_V02

    MistralConfig(**MISTRAL_7B_INSTRUCT_V02).save_pretrained(tmp_path)
    embedded = local_models.embedded_model_dir(model_cache)
    assert local_models.count_params(tmp_path) == 7_241_732_096  # Mistral-7B-v0.2's count
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        assert local_models.want_4bit("auto", tmp_path) is cuda
        assert local_models.want_4bit("auto", embedded) is False
        assert local_models.want_4bit("yes", embedded) is True


def test_a_4bit_model_is_quantized_once_then_loaded_as_saved(model_cache, tmp_path, monkeypatch):
    """The NF4 weights are saved in the cache at the first 4-bit load and read from there by later ones (a step
    no longer reads and quantizes a 14.5 GB checkpoint each time): the same model, to the bit."""
    pytest.importorskip("bitsandbytes")
    from mistral_standin import build_standin
    from transformers import AutoModelForCausalLM

    standin = build_standin(tmp_path / "standin", local_models.embedded_model_dir(model_cache))
    first, tokenizer = local_models.load_local(f"hf:{standin}", tmp_path / "cache", load_in_4bit="yes")
    [saved] = (tmp_path / "cache" / "nf4").iterdir()
    read, from_pretrained = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda path, **options: read.append((path, options)) or from_pretrained(path, **options))
    second, _ = local_models.load_local(f"hf:{standin}", tmp_path / "cache", load_in_4bit="yes")
    assert read[0][0] == str(saved) and "quantization_config" not in read[0][1]
    assert getattr(second, "is_loaded_in_4bit", False)
    ids = torch.tensor([tokenizer("Hello there, how are you?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)
    # A model rewritten in place (toy_base.py rebuilds its folder) is quantized anew, not read from the old copy.
    (standin / "config.json").write_text((standin / "config.json").read_text() + "\n")
    local_models.load_local(f"hf:{standin}", tmp_path / "cache", load_in_4bit="yes")
    assert read[-1][0] == str(standin) and len(list((tmp_path / "cache" / "nf4").iterdir())) == 2


def test_4bit_loading_on_cpu(model_cache):
    bnb = pytest.importorskip("bitsandbytes")
    quantized = local_models.LocalLM("embedded", cache_dir=model_cache, load_in_4bit="yes")
    layers = [m for name, m in quantized.model.named_modules() if name.endswith(("q_proj", "down_proj"))]
    assert layers and all(isinstance(m, bnb.nn.Linear4bit) for m in layers)
    assert all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    assert not quantized.merge_adapters  # 4-bit weights cannot take a merged adapter: peft's LoRA layers run
    assert quantized.generate(PROMPTS[:1], max_new_tokens=6)[0].strip()
    (logprob, n_tokens, _), = quantized.score(PROMPTS[:1], RESPONSES[:1])
    assert n_tokens == 3 and logprob < 0


@requires_cuda
def test_local_model_on_cuda_scores_like_one_at_a_time(model_cache):
    gpu = local_models.LocalLM("embedded", cache_dir=model_cache)
    assert gpu.device.type == "cuda" and next(gpu.model.parameters()).dtype == torch.bfloat16
    batched = gpu.score(PROMPTS, RESPONSES)
    single = [gpu.score([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES)]
    for (a, n, _), (b, m, _) in zip(batched, single):
        assert n == m and a == pytest.approx(b, abs=0.1)  # bf16 sums: looser than fp32
    assert gpu.generate(PROMPTS[:1], max_new_tokens=6)[0].strip()


# --- CachedChat -------------------------------------------------------------------------------------------

class Counting:
    """Wraps a chat model and counts the prompts it is asked to complete."""

    def __init__(self, inner):
        self.inner, self.name, self.prompts = inner, inner.name, 0

    def generate(self, prompts, **settings):
        self.prompts += len(prompts)
        return self.inner.generate(prompts, **settings)


def test_cached_chat_never_pays_twice(lm, tmp_path):
    path = tmp_path / "calls.jsonl"
    counter = Counting(local_models.LocalChat(lm, None))
    cached = models.CachedChat(counter, path)
    first = cached.generate(PROMPTS[:2], max_new_tokens=6)
    assert counter.prompts == 2
    assert cached.generate(PROMPTS[:2], max_new_tokens=6) == first
    assert counter.prompts == 2
    assert len(path.read_text().splitlines()) == 2  # one line per completed call

    # A rerun (a new process) reads the file, even after a crash left half a line at its end.
    with open(path, "a") as f:
        f.write('{"key": "abc", "outp')
    rerun = models.CachedChat(counter, path)
    assert rerun.generate(PROMPTS[:2], max_new_tokens=6) == first
    assert counter.prompts == 2

    # Only the new prompt is sent to the model; the cached one is not.
    mixed = rerun.generate([PROMPTS[0], PROMPTS[2]], max_new_tokens=6)
    assert mixed[0] == first[0] and counter.prompts == 3
    assert [json.loads(line)["output"] for line in path.read_text().splitlines()] == first + [mixed[1]]


def test_cached_chat_key_includes_model_settings_and_seed(lm, tmp_path):
    cached = models.CachedChat(local_models.LocalChat(lm, None), tmp_path / "calls.jsonl")
    settings = dict(max_new_tokens=6, temperature=0.0, top_p=1.0)
    key = cached.key(PROMPTS[0], settings, 0)
    assert key == cached.key(PROMPTS[0], dict(settings), 0)
    assert key != cached.key(PROMPTS[1], settings, 0)
    assert key != cached.key(PROMPTS[0], dict(settings, temperature=0.7), 0)
    assert key != cached.key(PROMPTS[0], settings, 1)
    other = models.CachedChat(local_models.LocalChat(lm, "adapter"), tmp_path / "calls.jsonl")
    assert key != other.key(PROMPTS[0], settings, 0)


# --- Batches by token budget ------------------------------------------------------------------------------

def test_token_batches_bound_rows_times_the_longest_row():
    lengths = [900, 120, 100, 100, 90, 80, 80, 60]
    batches = local_models.token_batches(list(range(8)), lengths, batch_size=4, batch_tokens=500)
    assert batches == [[0], [1, 2, 3, 4], [5, 6, 7]]  # the long row alone; the rest by the row count
    assert local_models.token_batches(list(range(8)), lengths, 4, 0) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 0: no bound
    for order in ([7, 0, 1, 2, 3, 4, 5, 6], [1, 7, 2, 0, 3, 6, 4, 5]):  # any order: a longer row closes a batch
        batches = local_models.token_batches(order, lengths, 4, 500)
        assert sorted(sum(batches, [])) == list(range(8)) and sum(batches, []) == order
        assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 500 for b in batches)


def test_the_token_budget_counts_the_kv_cache_the_decoder_allocates(lm, monkeypatch):
    """Shared prefixes can make the prefilled cache wider than the longest prompt (one group's long shared part
    beside another group's long rests): the budget counts the width generate_batch allocates, not the prompt."""
    rng = random.Random(0)
    draw = lambda n: [rng.randrange(100, 20000) for _ in range(n)]  # noqa: E731
    long_shared, short_shared, new = draw(99), draw(75), 4
    prompts = [long_shared + draw(1) for _ in range(6)] + [short_shared + draw(25) for _ in range(2)]  # 100 each
    width = decoding.allocated_width(prompts, [new] * len(prompts))
    assert width == 99 + 25 + new > 100 + new
    capacities, new_cache = [], decoding._new_cache
    monkeypatch.setattr(decoding, "_new_cache", lambda config, capacity: capacities.append(capacity)
                        or new_cache(config, capacity))
    decoding.generate_batch(lm.model, prompts, new, lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id)
    assert capacities == [width]  # what generate_batch allocates per row
    budget = len(prompts) * (100 + new)  # rows x the longest row: a budget these rows seemed to fit
    monkeypatch.setattr(lm, "batch_tokens", budget)
    batches = lm.batches(prompts, [new] * len(prompts), batch_size=8)
    assert sorted(sum(batches, [])) == list(range(len(prompts))) and len(batches) > 1
    for rows in batches:
        assert len(rows) * decoding.allocated_width([prompts[i] for i in rows], [new] * len(rows)) <= budget


def test_a_long_prompt_runs_in_a_batch_within_the_token_budget(lm, monkeypatch):
    """One long prompt among short ones: generation and scoring run it in a batch of its own, so no batch
    computes more than batch_tokens (rows x padded length), and the outputs are those of unbounded batches."""
    long_prompt = [{"role": "user", "content": "Plan a trip. " + "I like quiet places and trains. " * 80}]
    prompts, responses = [long_prompt] + PROMPTS, ["Take the train to the coast."] + RESPONSES
    shapes = []  # (rows, longest row) of each batch run
    generate_batch, score_batch = local_models.generate_batch, local_models.score_batch

    def generate_recorded(model, ids, max_new_tokens, *args):
        shapes.append((len(ids), max(map(len, ids)) + max_new_tokens))
        return generate_batch(model, ids, max_new_tokens, *args)

    def score_recorded(model, ids, response_ids, *args):
        shapes.append((len(ids), max(len(p) + len(r) for p, r in zip(ids, response_ids))))
        return score_batch(model, ids, response_ids, *args)

    unbounded = lm.batch_tokens
    try:
        lm.batch_tokens = 0
        free_texts, free_scores = lm.generate(prompts, max_new_tokens=6, batch_size=8), lm.score(prompts, responses)
        lm.batch_tokens = 600
        monkeypatch.setattr(local_models, "generate_batch", generate_recorded)
        monkeypatch.setattr(local_models, "score_batch", score_recorded)
        texts, scores = lm.generate(prompts, max_new_tokens=6, batch_size=8), lm.score(prompts, responses)
    finally:
        lm.batch_tokens = unbounded
    assert len(lm.prompt_ids(long_prompt, 6)[0]) > 300  # the long prompt cannot share a batch of 600 tokens
    assert [rows for rows, _ in shapes] == [1, len(PROMPTS)] * 2  # generation, then scoring: long alone, rest together
    assert all(rows == 1 or rows * length <= 600 for rows, length in shapes), shapes
    assert texts == free_texts
    for (a, n, _), (b, m, _) in zip(scores, free_scores):
        assert n == m and a == pytest.approx(b, abs=1e-3)
