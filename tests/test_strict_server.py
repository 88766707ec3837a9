"""The served Questioner against a server as strict as vLLM serving Mistral-7B-Instruct-v0.2 (tests/strict_server.py):
its chat template (tests/mistral_standin.py) refuses a system message and two turns of one role in a row, and the
server applies it to the messages as they come. The model behind it is the Mistral stand-in, so a role played on
the server can be compared with the same model played locally, token for token."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from mistral_standin import build_standin
from strict_server import StrictServer

from chat_format import encode_chat
from local_models import LocalLM, embedded_model_dir
from models import ModelPool
from roles import answer_view, questioner_view
from scripted import World
from utils import StepError, read_jsonl, write_jsonl_atomic

ROOT = Path(__file__).resolve().parents[1]
DUMMY_KEY = "sk-dummy-5b1e-not-a-real-key"
DIALOGUE = [{"role": "assistant", "content": "What food do you like?"}, {"role": "user", "content": "Spicy noodles."}]


@pytest.fixture(scope="module")
def standin(tmp_path_factory, model_cache):
    return build_standin(tmp_path_factory.mktemp("mistral") / "standin", embedded_model_dir(model_cache))


@pytest.fixture(scope="module")
def local(standin, model_cache):
    """The stand-in loaded as the steps load it locally, in float32 (the server below runs this same object)."""
    return LocalLM(f"hf:{standin}", cache_dir=model_cache, load_in_4bit="no", dtype="float32")


@pytest.fixture(autouse=True)
def dummy_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", DUMMY_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def test_the_served_questioner_sees_exactly_the_turns_the_local_one_sees(standin, local, model_cache):
    """questioner_view has a system message, answer_view two user turns in a row: both reach the strict server
    folded and merged as the local model's template has them, so the server renders the local prompt and
    writes the local text."""
    views = [questioner_view("Ada", "Plan a dinner.", DIALOGUE), answer_view("Ada", "Plan a dinner.", DIALOGUE)]
    with StrictServer(local, "standin") as server:
        pool = ModelPool(model_cache, tokenizer=f"hf:{standin}")
        served = pool.chat(f"openai:standin@{server.base_url}", questioner=True).generate(views, max_new_tokens=6)
        # A role that is not the Questioner keeps its system message (an Oracle on GPT-4 reads it as one), but
        # turns of one role in a row are merged on every server.
        with pytest.raises(StepError, match="400"):
            ModelPool(model_cache).chat(f"openai:standin@{server.base_url}").generate(views[:1], max_new_tokens=4)
        roleplayer = ModelPool(model_cache).chat(f"openai:standin@{server.base_url}")
        assert roleplayer.generate([views[1][1:]], max_new_tokens=4)  # no system message: merged, then served
    rendered = [local.tokenizer.decode(local.prompt_ids(v, 6)[0]) for v in views]
    assert server.prompts[:2] == rendered
    assert served == local.generate(views, max_new_tokens=6)


def write_run(run: Path):
    """A run's data (as 01_generate.py writes it): one pair in split A (iteration 0), one in split B (iteration 1)."""
    world, rng = World(ROOT / "data" / "toy"), random.Random(1)
    tasks = [{"task_id": f"t{i}", "split": split, "text": text}
             for i, (split, text) in enumerate(zip(["A", "B", "test"], sorted(world.task_attributes)))]
    personas = [{"persona_id": f"p{i}", "split": split, "name": name, "bio": world.bio(name, rng)}
                for i, (split, name) in enumerate(zip(["A", "B", "test"], ["Ada", "Ben", "Cy"]))]
    gold = [{"task_id": t["task_id"], "persona_id": p["persona_id"], "split": t["split"],
             "gold": world.gold(p["bio"], t["text"])} for t in tasks for p in personas if t["split"] == p["split"]]
    for name, records in (("tasks", tasks), ("personas", personas), ("gold", gold)):
        write_jsonl_atomic(run / "data" / f"{name}.jsonl", records)


def step(script, *args, env):
    done = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{script}: {done.stderr[-3000:]}"
    return done


def test_the_served_questioner_route_runs_02_03_04_02_on_a_strict_server(standin, local, model_cache, tmp_path):
    """SERVED_QUESTIONER's route at iterations 0 and 1: 02 asks on the server, 03 scores there (token ids,
    prompt_logprobs) and answers there (answer_view), 04 trains the stand-in locally, and 02 asks again as the
    adapter the server loaded (POST /v1/load_lora_adapter)."""
    run = tmp_path / "run"
    write_run(run)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "SmolLM2-135M-Instruct").symlink_to(embedded_model_dir(model_cache).resolve())
    env = {**os.environ, "OPENAI_API_KEY": DUMMY_KEY}
    env.pop("OPENAI_BASE_URL", None)
    with StrictServer(local, "standin") as server:
        shared = ["--run_dir", run, "--cache_dir", cache, "--questioner", f"openai:standin@{server.base_url}",
                  "--tokenizer", f"hf:{standin}", "--load_in_4bit", "no", "--dtype", "float32"]
        sim = ["--roleplayer", f"hf:{standin}", "--n_conversations", "2", "--max_turns", "1",
               "--question_max_tokens", "6", "--answer_max_tokens", "6"]
        step("02_simulate.py", *shared, *sim, "--iteration", "0", env=env)
        step("03_select.py", *shared, "--iteration", "0", "--n_conversations", "2", "--answer_max_tokens", "6", env=env)
        step("04_train.py", "--run_dir", run, "--cache_dir", cache, "--iteration", "0", "--questioner", f"hf:{standin}",
             "--load_in_4bit", "no", "--dtype", "float32", "--epochs", "1", "--batch_size", "1", "--grad_accum", "1",
             "--lora_r", "4", "--no_gradient_checkpointing", env=env)
        step("02_simulate.py", *shared, *sim, "--iteration", "1", env=env)
    chats = [body for path, body in server.requests if path == "/v1/chat/completions"]
    assert chats and not any(m["role"] == "system" for body in chats for m in body["messages"])
    scored = [body for path, body in server.requests if path == "/v1/completions"]
    assert len(scored) == 2 and all(isinstance(body["prompt"], list) for body in scored)
    assert [p for p, _ in server.requests].count("/v1/load_lora_adapter") == 1
    assert any(body["model"].startswith("m1-") for body in chats)  # iteration 1 asked as Q_1
    scores = read_jsonl(run / "iter0" / "scores.jsonl", "score")
    assert len(scores) == 2 and all(s["logprob"] < 0 and s["n_tokens"] > 0 for s in scores)
    assert len(read_jsonl(run / "iter1" / "conversations.jsonl", "conversation")) == 2
    assert json.loads((run / "iter0" / "train_log.json").read_text())


PAIRS = ([questioner_view("Ada", "Plan a dinner.", DIALOGUE), answer_view("Ben", "Name a fruit.", [])],
         ["Pasta with chili oil, at home, for two.", "An apple."])


def scorer_on(server, standin, cache):
    return ModelPool(cache, tokenizer=f"hf:{standin}").scorer(f"openai:standin@{server.base_url}")


def test_server_scores_equal_local_scores_though_prompt_logprobs_0_returns_none(standin, local, tmp_path):
    """Early vLLM V1 versions answered prompt_logprobs 0 with no prompt log-probs: the scorer asks for 1."""
    with StrictServer(local, "standin", faults={"prompt_logprobs_zero": True}) as server:
        scores = scorer_on(server, standin, tmp_path).score(*PAIRS)
    assert [body["prompt_logprobs"] for _, body in server.requests] == [1, 1]
    for (logprob, n, cut), (expected, n_local, _) in zip(scores, local.score(*PAIRS)):
        assert n == n_local and not cut and abs(logprob - expected) < 1e-3 * n



def test_a_pair_that_fills_the_context_is_cut_to_leave_room_for_the_generated_token(standin, local, tmp_path,
                                                                                    monkeypatch):
    """The server generates one token after the prompt, so a pair exactly as long as the context is cut by one
    token (vLLM refuses a prompt plus max_tokens longer than the context with a 400)."""
    prompt, response = PAIRS[0][0], PAIRS[1][0]
    prompt_ids, response_ids = encode_chat(local.tokenizer, prompt, response, local.system_ok)
    context = len(prompt_ids) + len(response_ids)
    monkeypatch.setenv("STARGATE_CONTEXT_LENGTH", str(context))  # the scorer's context, from --tokenizer's config
    with StrictServer(local, "standin", context_length=context) as server:
        [(logprob, n_tokens, cut)] = scorer_on(server, standin, tmp_path).score([prompt], [response])
    [body] = [body for _, body in server.requests]
    assert len(body["prompt"]) + body["max_tokens"] == context
    assert cut and logprob < 0 and n_tokens == len(response_ids)


def test_a_server_that_caches_prompt_prefixes_is_refused_for_scoring(standin, local, tmp_path):
    """With prefix caching on, vLLM's prompt log-probs can depend on the order of requests (vLLM issue 42019)."""
    with StrictServer(local, "standin", prefix_caching=True) as server:
        with pytest.raises(StepError, match="caches prompt prefixes.*--no-enable-prefix-caching"):
            scorer_on(server, standin, tmp_path).score(*PAIRS)
    assert not [path for path, _ in server.requests if path == "/v1/completions"]


@pytest.fixture(scope="module")
def adapter(standin, tmp_path_factory):
    """A LoRA adapter of the stand-in, untrained (B = 0), as 04 saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(standin), LoraConfig(r=4, target_modules="all-linear"))
    model.save_pretrained(folder)
    return folder


def test_an_adapter_the_server_fails_to_load_is_one_clear_error_at_once(local, adapter, model_cache):
    """Newer vLLM answers 500 to a failed load: one request, and the server's reason, not a minute of retries."""
    with StrictServer(local, "standin", faults={"load_adapter": 500}) as server:
        with pytest.raises(StepError, match=r"refused to load the adapter .*\(500: .*max_lora_rank 16\)"):
            ModelPool(model_cache).chat(f"openai:standin@{server.base_url}", adapter=("m1", adapter), questioner=True)
    assert [path for path, _ in server.requests].count("/v1/load_lora_adapter") == 1
