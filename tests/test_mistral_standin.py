"""The miniature Mistral-7B-Instruct stand-in (tests/mistral_standin.py) through the project's 4-bit path on
the CPU: it loads as `hf:<folder>` with --load_in_4bit yes, generates (stopping at the cap, whatever odd
tokens random weights write), scores, and takes a LoRA adapter on its quantized base."""

import pytest
import torch
from mistral_standin import MISTRAL_7B_INSTRUCT_V02, STANDIN_SIZES, build_standin, standin_tokenizer

import decoding
import local_models
import stargate

bnb = pytest.importorskip("bitsandbytes")

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
PROMPTS = [[SYSTEM, {"role": "user", "content": "Hi, I'm Maya. Can you suggest a recipe for dinner tonight?"}],
           [SYSTEM, {"role": "user", "content": "Name a fruit."}],
           [SYSTEM, {"role": "user", "content": "Plan my weekend in Rome, cheaply, with two children."}]]
RESPONSES = ["Try a lentil curry with rice and spinach.", "Apple.", "Walk, eat pizza, see the Colosseum."]


@pytest.fixture(scope="module")
def standin(tmp_path_factory, model_cache):
    return build_standin(tmp_path_factory.mktemp("mistral") / "standin", local_models.embedded_model_dir(model_cache))


@pytest.fixture(scope="module")
def quantized(standin, model_cache):
    return local_models.LocalLM(f"hf:{standin}", cache_dir=model_cache, load_in_4bit="yes")


def test_the_tokenizer_is_mistral_shaped(model_cache):
    tokenizer = standin_tokenizer(local_models.embedded_model_dir(model_cache))
    assert len(tokenizer) == MISTRAL_7B_INSTRUCT_V02["vocab_size"] == 32000
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    text = "Hi, I'm Maya. Can you suggest a recipe for dinner tonight?"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < 32000 and tokenizer.decode(ids) == text  # a valid BPE after the cut: text round-trips
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes?"}],
                                         tokenize=False)
    assert chat == "<s>[INST] Hi [/INST]Yes?</s>"


def test_it_loads_in_4bit_as_mistral_would(quantized):
    model = quantized.model
    assert type(model).__name__ == "MistralForCausalLM" and model.config.vocab_size == 32000
    assert model.config.sliding_window is None and model.config.max_position_embeddings == 32768
    linear = [m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))]
    assert len(linear) == 5 * STANDIN_SIZES["num_hidden_layers"]
    assert all(isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state.quant_type == "nf4" for m in linear)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert quantized.system_ok is False and quantized.stop_ids == {2} and quantized.tokenizer.pad_token_id == 2
    assert not quantized.merge_adapters  # 4-bit: adapters run unmerged


def test_generation_stops_at_the_cap_and_survives_odd_tokens(quantized):
    encoded = [quantized.prompt_ids(p, 12)[0] for p in PROMPTS]
    for temperature in (0.0, 1.0):
        new = decoding.generate_batch(quantized.model, encoded, 12, {2}, 2, temperature, 1.0,
                                      torch.Generator().manual_seed(0))
        assert all(len(ids) <= 12 for ids in new) and any(len(ids) == 12 for ids in new)
    texts = quantized.generate(PROMPTS, max_new_tokens=12, temperature=1.0, top_p=1.0)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    # Random weights write any token, special ones and byte fragments included; decoding them all must work,
    # and so must the dialogue loop that feeds them back through the strict template.
    assert isinstance(quantized.tokenizer.decode(list(range(32000)), skip_special_tokens=True), str)
    chat = local_models.LocalChat(quantized, None)
    items = [{"name": "Maya", "task": "Plan a dinner.", "bio": "I am a nurse in Leeds.", "n_turns": 2}] * 2
    gen = {role: dict(max_new_tokens=8, temperature=1.0, top_p=1.0, batch_size=2)
           for role in ("questioner", "roleplayer")}
    dialogues, _ = stargate.simulate(chat, chat, items, gen, seed=0)
    assert [len(d) for d in dialogues] == [4, 4]


def test_scores_batched_equal_one_at_a_time(quantized):
    batched = quantized.score(PROMPTS, RESPONSES)
    single = [quantized.score([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES)]
    for (a, n, _), (b, m, _) in zip(batched, single):
        assert n == m and a < 0
        assert a == pytest.approx(b, abs=0.05)  # bf16 compute: padding moves the rounding (measured: <= 0.006)


def test_a_lora_adapter_attaches_to_the_4bit_base(standin, quantized, model_cache, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = quantized.score(PROMPTS, RESPONSES)
    unquantized, _ = local_models.load_local(f"hf:{standin}", model_cache, load_in_4bit="no", dtype="float32")
    torch.manual_seed(0)  # init_lora_weights=False: a random B, so the adapter changes the outputs
    get_peft_model(unquantized, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                           task_type="CAUSAL_LM")).save_pretrained(tmp_path / "adapter")
    quantized.add_adapter("m1", tmp_path / "adapter")
    assert isinstance(quantized.model, PeftModel)
    q_proj = quantized.model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and "m1" in q_proj.lora_A  # on the 4-bit weights
    with quantized.using("m1", merged=True) as model:
        assert model is quantized.model  # no merged copy of a quantized model
    adapted = quantized.score(PROMPTS, RESPONSES, adapter="m1")
    assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(adapted, base))
    # Switched off, the adapter leaves the base's scores (to bf16 compute's rounding: peft's wrapper runs the
    # 4-bit layers through another path; measured: 0.003 nats in 124).
    assert [s[0] for s in quantized.score(PROMPTS, RESPONSES)] == pytest.approx([s[0] for s in base], rel=1e-4)
    assert len(quantized.generate(PROMPTS[:1], adapter="m1", max_new_tokens=6)) == 1
