"""The Questioner Q_t and the Q_BASE scorer on an OpenAI-compatible server, against real llama.cpp servers.

The server is llama-cpp-python's, on the embedded SmolLM2-135M GGUF (Q4_1), on 127.0.0.1; local scoring is the
same GGUF dequantized to float32. vLLM cannot run here: its requests (LoRA registration, prompt_logprobs, token-id
prompts) are in server.py, and docs/CLUSTER.md lists what was tested only through llama.cpp.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TRAIN_QUESTION, train_prompt
from fault_proxy import FaultProxy
from llama_server import llama_server, require_llama_server
from mistral_standin import MISTRAL_V02_TEMPLATE

from local_models import LocalLM, embedded_model_dir, load_tokenizer
from models import ModelPool
from roles import answer_view, questioner_view
from scripted import World
from server import OpenAIChat, ServerScorer, adapter_served_name, check_adapter_servable
from utils import StepError, read_jsonl, write_jsonl_atomic

GGUF = require_llama_server()
ROOT = Path(__file__).resolve().parents[1]
VENDORED_CONVERTER = ROOT / "tests" / "vendor" / "llama.cpp" / "convert_lora_to_gguf.py"
DUMMY_KEY = "sk-dummy-7d2e-not-a-real-key"
# |server - local| summed log-prob of a response, per scored token. Measured: at most 0.029 nats per token on
# the pairs below, 0.020 on the Questioner's full answer_view contexts (~300 prompt tokens; 0.41 nats over 21
# tokens), from llama.cpp's Q4_1 x Q8_1 dot products against float32 matmuls of the same dequantized weights, on
# an Intel CPU with AVX-512; 0.052 on the pairs below with llama.cpp built for an AMD CPU with AVX2 only (its
# dot-product kernels round differently). A wrong prompt or token alignment costs nats per token, not hundredths.
TOLERANCE_PER_TOKEN = 0.07


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    with llama_server(GGUF, log, extra_args=["--no_prefix_reuse"]) as base_url:
        yield base_url


@pytest.fixture(autouse=True)
def dummy_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", DUMMY_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture
def cache(tmp_path, model_cache):
    """A cache folder of this test's own (the scorer's call cache) sharing the dequantized embedded model."""
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "SmolLM2-135M-Instruct").symlink_to(embedded_model_dir(model_cache).resolve())
    return folder


def toy_pairs():
    """Two toy-world pairs (scripted.World: a persona's bio, its gold answer), each with three dialogues: none,
    one that reveals the persona, one off the point. Short contexts: llama-cpp-python computes echoed log-probs
    in Python, ~50 ms per prompt token on one core."""
    world, rng = World(ROOT / "data" / "toy"), random.Random(0)
    contexts, golds = [], []
    for name, task in zip(["Ada", "Ben"], sorted(world.task_attributes)[:2]):
        bio = world.bio(name, rng)
        for dialogue in ([], [("Could you tell me about yourself?", bio)], [("Do you like music?", "Yes, jazz.")]):
            messages = [{"role": "system", "content": "You help people."},
                        {"role": "user", "content": f"Hi, I'm {name}. {task}"}]
            for question, answer in dialogue:
                messages += [{"role": "assistant", "content": question}, {"role": "user", "content": answer}]
            messages[-1] = dict(messages[-1], content=messages[-1]["content"] + f"\n\nNow answer: {task}")
            contexts.append(messages)
            golds.append(world.gold(bio, task))
    return contexts, golds


def test_server_scores_equal_local_scores_and_rank_a_pairs_conversations_alike(server, lm, cache):
    contexts, golds = toy_pairs()
    scorer = ModelPool(cache, tokenizer="embedded").scorer("openai:smollm@" + server)
    assert isinstance(scorer, ServerScorer)
    remote, local = scorer.score(contexts, golds), lm.score(contexts, golds)
    assert [r[1:] for r in remote] == [l[1:] for l in local]  # the same tokens scored, nothing cut
    worst = max(abs(r[0] - l[0]) / r[1] for r, l in zip(remote, local))
    assert worst <= TOLERANCE_PER_TOKEN, [(r[0], l[0]) for r, l in zip(remote, local)]
    # A pair's conversations rank alike: every two whose local scores differ by more than both errors can
    # (2 x the tolerance) are in the same order on the server. Closer ones (the two uninformative dialogues of a
    # pair are often within a nat) may swap: the quantisation error is of that size.
    for i in range(0, len(contexts), 3):
        for a in range(i, i + 3):
            for b in range(a + 1, i + 3):
                margin = local[a][0] - local[b][0]
                if abs(margin) > 2 * TOLERANCE_PER_TOKEN * local[a][1]:
                    assert (remote[a][0] - remote[b][0]) * margin > 0, (a, b, remote, local)
        best = max(range(i, i + 3), key=lambda j: local[j][0])
        assert best == max(range(i, i + 3), key=lambda j: remote[j][0]) == i + 1  # 03 keeps the revealing one

    # Every call is cached: a fresh scorer (a rerun) answers the same from disk, adding nothing.
    calls = (cache / "scorer_calls.jsonl").read_text().splitlines()
    assert len(calls) == len(contexts) and DUMMY_KEY not in "".join(calls)
    rerun = ServerScorer("openai:smollm@" + server, *load_tokenizer("embedded", cache), cache)
    assert rerun.score(contexts, golds) == remote
    assert len((cache / "scorer_calls.jsonl").read_text().splitlines()) == len(contexts)


def test_scoring_calls_are_retried_through_faults_and_paid_for_once(server, lm, cache):
    """Behind a proxy that fails most requests before they reach the server (429, 500, 503, dropped
    connections; tests/fault_proxy.py), the scorer's calls are retried as the other openai: calls are."""
    contexts, golds = toy_pairs()
    with FaultProxy(server, fault_rate=0.6, kinds=("429", "500", "503", "drop"), seed=3) as faulty:
        scorer = ServerScorer("openai:smollm@" + faulty.base_url, *load_tokenizer("embedded", cache), cache)
        scored = scorer.score(contexts[:1], golds[:1])
        stats = faulty.stats()
    assert stats["faulted"] >= 2 and list(stats["completed_by_body"].values()) == [1], stats  # paid for once
    for (logprob, n, _), (expected, m, _) in zip(scored, lm.score(contexts[:1], golds[:1])):
        assert n == m and abs(logprob - expected) <= TOLERANCE_PER_TOKEN * n


def test_a_tokenizer_that_is_not_the_servers_is_one_clear_error(server, cache, tmp_path):
    """Our tokenizer dressed as Mistral's (its template and <s> / </s>): the server reads "<s>" as three tokens."""
    from transformers import AutoTokenizer

    folder = tmp_path / "other"
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(cache))
    tokenizer.chat_template = MISTRAL_V02_TEMPLATE
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    tokenizer.save_pretrained(folder)
    shutil.copy(embedded_model_dir(cache) / "config.json", folder)
    scorer = ServerScorer("openai:smollm@" + server, *load_tokenizer(f"hf:{folder}", cache), cache)
    contexts, golds = toy_pairs()
    with pytest.raises(StepError, match="does not tokenize as ours .*--tokenizer"):
        scorer.score(contexts[:1], golds[:1])
    with pytest.raises(StepError, match="needs our tokenizer: pass --tokenizer"):
        ModelPool(cache).scorer("openai:smollm@" + server)


def write_run(run: Path):
    """A run's data (as 01_generate.py writes it): one pair in split A, one in the test split."""
    world, rng = World(ROOT / "data" / "toy"), random.Random(1)
    tasks = [{"task_id": f"t{i}", "split": split, "text": text}
             for i, (split, text) in enumerate(zip(["A", "test"], sorted(world.task_attributes)))]
    personas = [{"persona_id": f"p{i}", "split": split, "name": name, "bio": world.bio(name, rng)}
                for i, (split, name) in enumerate(zip(["A", "test"], ["Ada", "Ben"]))]
    gold = [{"task_id": t["task_id"], "persona_id": p["persona_id"], "split": t["split"],
             "gold": world.gold(p["bio"], t["text"])} for t in tasks for p in personas if t["split"] == p["split"]]
    for name, records in (("tasks", tasks), ("personas", personas), ("gold", gold)):
        write_jsonl_atomic(run / "data" / f"{name}.jsonl", records)


def step(script, *args, env):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_simulate_select_evaluate_with_every_role_on_the_server(server, lm, cache, tmp_path, monkeypatch):
    """02 -> 03 -> 05 at iteration 0: Questioner, Roleplayer, scorer (and Judge) are the server's model.

    With a context of 160 tokens (STARGATE_CONTEXT_LENGTH) every scored prompt (~330 tokens) loses its middle as
    local scoring cuts it: the server scores the cut tokens, and in half the time (llama-cpp-python computes
    echoed log-probs in Python, ~50 ms per prompt token). Generation on the server is not cut (n_ctx 2048)."""
    run, spec = tmp_path / "run", "openai:smollm@" + server
    write_run(run)
    env = {**os.environ, "OPENAI_API_KEY": DUMMY_KEY, "STARGATE_CONTEXT_LENGTH": "160"}
    env.pop("OPENAI_BASE_URL", None)
    shared = ["--run_dir", run, "--cache_dir", cache, "--questioner", spec]
    sim = ["--max_turns", "1", "--question_max_tokens", "12", "--answer_max_tokens", "16"]
    done = step("02_simulate.py", *shared, "--roleplayer", spec, "--n_conversations", "2", *sim, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    # Scoring on a server without naming our tokenizer: one clear error naming the setting, exit 2.
    done = step("03_select.py", *shared, "--n_conversations", "2", "--answer_max_tokens", "16", env=env)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: ") \
        and "--tokenizer" in done.stderr, done.stderr[-2000:]
    done = step("03_select.py", *shared, "--tokenizer", "embedded", "--n_conversations", "2",
                "--answer_max_tokens", "16", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    done = step("05_eval.py", *shared, "--tokenizer", "embedded", "--roleplayer", spec, "--judge", spec,
                "--iterations", "0", "--n_conversations", "1", "--test_pairs", "1", "--final_max_tokens", "16", *sim,
                env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    convs = read_jsonl(run / "iter0" / "conversations.jsonl", "conversation")
    assert len(convs) == 2 and {c["questioner"] for c in convs} == {c["roleplayer"] for c in convs} == {"openai:smollm"}
    scores = read_jsonl(run / "iter0" / "scores.jsonl", "score")
    assert {s["scorer"] for s in scores} == {spec} and all(s["n_tokens"] > 0 and s["truncated"] for s in scores)
    # The server's scores are Q_BASE's: local scoring of the same conversations, cut to the same context, agrees
    # within the tolerance. The server path leaves room for the one token the server generates: 159 tokens.
    persona = read_jsonl(run / "data" / "personas.jsonl", "persona")[0]
    task = read_jsonl(run / "data" / "tasks.jsonl", "task")[0]["text"]
    gold = read_jsonl(run / "data" / "gold.jsonl", "gold")[0]["gold"]
    monkeypatch.setattr(lm, "context_length", 159)
    local = lm.score([answer_view(persona["name"], task, c["messages"]) for c in convs], [gold] * len(convs))
    for s, (logprob, n, _) in zip(scores, local):
        assert s["n_tokens"] == n and abs(s["logprob"] - logprob) <= TOLERANCE_PER_TOKEN * n
    sft = read_jsonl(run / "iter0" / "sft.jsonl", "sft")
    assert len(sft) == 1 and sft[0]["answerer"] == "openai:smollm" and sft[0]["messages"][-1]["content"]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["models"]["m0"]["logprob_mean"] < 0
    assert len(read_jsonl(run / "eval" / "controls.jsonl", "control")) == 3
    # The key is nowhere on disk: not in the records, the arguments recorded, nor the call caches.
    files = [p for folder in (run, cache) for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    assert not [p for p in files if DUMMY_KEY.encode() in p.read_bytes()]


def test_a_server_without_runtime_lora_loading_is_one_clear_error(server, tmp_path, trained):
    """llama-cpp-python has no POST /v1/load_lora_adapter (404): the adapter must be listed, or vLLM used."""
    adapter = trained[0] / "adapter"
    with pytest.raises(StepError, match="cannot load LoRA adapters at run time .*--enable-lora .*"
                                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
        ModelPool().chat("openai:smollm@" + server, adapter=("m1", adapter))
    # vLLM refuses an adapter with modules_to_save: 04's has none; one that has them fails before any request.
    check_adapter_servable(adapter)
    shutil.copytree(adapter, tmp_path / "full")
    config = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    (tmp_path / "full" / "adapter_config.json").write_text(json.dumps(config | {"modules_to_save": ["lm_head"]}))
    with pytest.raises(StepError, match="modules_to_save, which vLLM cannot serve"):
        ModelPool().chat("openai:smollm@" + server, adapter=("m1", tmp_path / "full"))


def test_q1_on_a_server_writes_what_the_local_q1_writes(trained, model_cache, tmp_path):
    """04's adapter, converted to GGUF by llama.cpp's own convert_lora_to_gguf.py (vendored), served beside the
    base by a llama.cpp server that lists it under its served name: Q_1 asks through the server as locally."""
    adapter = trained[0] / "adapter"
    lora_gguf = tmp_path / "m1.gguf"
    done = subprocess.run([sys.executable, VENDORED_CONVERTER, "--base", embedded_model_dir(model_cache),
                           "--outtype", "f32", "--outfile", lora_gguf, adapter], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and lora_gguf.exists(), done.stderr[-3000:]

    name = adapter_served_name("m1", adapter)
    served = [{"model": str(GGUF), "model_alias": "smollm"},
              {"model": str(GGUF), "model_alias": name, "lora_path": str(lora_gguf)}]
    prompts = [train_prompt(n) for n in ["Zoe", "Yusuf", "Xena"]]
    local = LocalLM("embedded", cache_dir=model_cache, dtype="float32")  # not the shared `lm`: adapters stick
    local.add_adapter("m1", adapter)
    expected = local.generate(prompts, adapter="m1", max_new_tokens=16)
    with llama_server(GGUF, tmp_path / "server.log", extra_args=["--no_prefix_reuse"], models=served) as url:
        q1 = ModelPool().chat("openai:smollm@" + url, adapter=("m1", adapter))
        assert isinstance(q1, OpenAIChat) and q1.model == name  # listed in /v1/models: no registration needed
        asked = q1.generate(prompts, max_new_tokens=16)
        base = ModelPool().chat("openai:smollm@" + url).generate(prompts, max_new_tokens=16)
    # Greedy text equal word for word: the trained question is far above any tie (the adapter learned it). The
    # base model's greedy text is not compared: it chats on, and after ~10 tokens meets a near-tie that the Q4_1
    # server and the float32 local model break differently (measured); it only shows the adapter was applied.
    assert asked == expected and all(TRAIN_QUESTION in text for text in asked), (asked, expected)
    assert not any(TRAIN_QUESTION in text for text in base), base


def test_the_questioner_on_a_server_with_mistrals_strict_template(tmp_path, cache):
    """llama.cpp given Mistral-Instruct-v0.2's released template, which raises on a system message and on two user
    turns in a row (a 500 on this server, a 400 on vLLM): the served Questioner's turns reach it shaped as its local
    model's template has them (--tokenizer: the embedded tokenizer with that template), so it asks and answers;
    the views as they are fail."""
    from transformers import AutoTokenizer

    template, folder = tmp_path / "mistral.jinja", tmp_path / "tokenizer"
    template.write_text(MISTRAL_V02_TEMPLATE)
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(cache))
    tokenizer.chat_template = MISTRAL_V02_TEMPLATE
    tokenizer.save_pretrained(folder)
    shutil.copy(embedded_model_dir(cache) / "config.json", folder)
    dialogue = [{"role": "assistant", "content": "What food do you like?"}, {"role": "user", "content": "Noodles."}]
    views = [questioner_view("Ada", "Plan a dinner.", dialogue), answer_view("Ada", "Plan a dinner.", dialogue)]
    with llama_server(GGUF, tmp_path / "server.log", extra_args=["--chat_template_file", template]) as url:
        served = ModelPool(cache, tokenizer=f"hf:{folder}").chat("openai:smollm@" + url, questioner=True)
        assert all(text.strip() for text in served.generate(views, max_new_tokens=8))
        with pytest.raises(StepError, match="answered 500"):
            OpenAIChat("smollm", url, max_retries=0).generate(views[:1], max_new_tokens=8)
    assert "Conversation roles must alternate" in (tmp_path / "server.log").read_text()

