"""The OpenAI-compatible path (`openai:<model>@<url>`) against a real llama.cpp server on 127.0.0.1.

The server runs the embedded SmolLM2-135M GGUF, so these tests need no network and no API key: the key
is a dummy value, and the tests check it is never written to disk.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llama_server import free_port, llama_server, require_llama_server

from models import CachedChat, ModelPool
from server import OpenAIChat
from utils import StepError

GGUF = require_llama_server()
ROOT = Path(__file__).resolve().parents[1]

DUMMY_KEY = "sk-dummy-4f1c9e7a-not-a-real-key"
PROMPTS = [
    [{"role": "user", "content": "Name one fruit."}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "What colour is the sky?"}],
    [{"role": "user", "content": "Say hello to Ada."}],
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Base URL of a llama.cpp server shared by the module's tests."""
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    with llama_server(GGUF, log, extra_args=["--no_prefix_reuse"]) as base_url:
        yield base_url


@pytest.fixture(autouse=True)
def dummy_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", DUMMY_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def test_openai_chat_generates_concurrently_and_greedy_is_repeatable(server):
    chat = ModelPool().chat("openai:smollm@" + server)
    assert isinstance(chat, OpenAIChat) and chat.name == "openai:smollm" and chat.base_url == server
    first = chat.generate(PROMPTS, max_new_tokens=24, temperature=0.0)
    assert len(first) == len(PROMPTS)
    assert all(isinstance(text, str) and text.strip() for text in first), first
    assert chat.generate(PROMPTS, max_new_tokens=24, temperature=0.0) == first


def test_cached_chat_answers_from_disk_when_the_server_is_gone(tmp_path):
    """Its own server, stopped after the first call: later answers can only come from the cache."""
    cache = tmp_path / "calls.jsonl"
    with llama_server(GGUF, tmp_path / "server.log") as base_url:
        cached = CachedChat(OpenAIChat("smollm", base_url, timeout=60, max_retries=1), cache)
        first = cached.generate(PROMPTS, max_new_tokens=16)
    assert all(text.strip() for text in first), first
    assert len(cache.read_text().splitlines()) == len(PROMPTS)

    # The same object (memory) and a fresh one reading the file (a rerun) both answer without a server.
    assert cached.generate(PROMPTS, max_new_tokens=16) == first
    rerun = CachedChat(OpenAIChat("smollm", base_url, timeout=5, max_retries=1), cache)
    assert rerun.generate(PROMPTS, max_new_tokens=16) == first
    assert len(cache.read_text().splitlines()) == len(PROMPTS)

    # A prompt not in the cache needs the server, which is gone: one clear error naming the URL.
    with pytest.raises(StepError, match="cannot reach .*" + base_url.replace(".", r"\.")):
        rerun.generate([[{"role": "user", "content": "A question never asked before?"}]], max_new_tokens=16)
    assert len(cache.read_text().splitlines()) == len(PROMPTS)
    assert DUMMY_KEY not in cache.read_text()


def test_missing_key_is_a_clear_error(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(StepError, match="OPENAI_API_KEY"):
        ModelPool().chat("openai:x@" + server)


def test_unreachable_server_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}/v1"
    chat = ModelPool().chat("openai:x@" + url)
    assert chat.base_url == url
    chat.client = chat.client.with_options(max_retries=1, timeout=5)  # the default 8 retries take ~40 s
    start = time.monotonic()
    with pytest.raises(StepError, match="cannot reach .*" + url.replace(".", r"\.")):
        chat.generate(PROMPTS[:1], max_new_tokens=8)
    assert time.monotonic() - start < 20


def test_a_slow_server_is_reported_as_a_timeout_not_as_unreachable(server):
    chat = OpenAIChat("smollm", server, timeout=0.2, max_retries=0)
    with pytest.raises(StepError) as error:
        chat.generate([[{"role": "user", "content": "Tell me a long story."}]], max_new_tokens=48)
    assert "cannot reach" not in str(error.value) and "time" in str(error.value).lower(), str(error.value)


def test_answers_that_arrive_before_a_failure_are_cached(server, tmp_path):
    cache = tmp_path / "calls.jsonl"
    too_long = [{"role": "user", "content": "word " * 3000}]  # over n_ctx: the server answers 400
    fine = [[{"role": "user", "content": f"Count to {n}."}] for n in range(3, 7)]
    cached = CachedChat(OpenAIChat("smollm", server, max_retries=0), cache)
    # Nothing is cut on a server: its refusal is one clear error naming the settings to change.
    with pytest.raises(StepError) as error:
        cached.generate([too_long] + fine, max_new_tokens=24)
    message = str(error.value)
    assert message.startswith(f"{server}: a prompt plus max_tokens=24 does not fit the context of openai:smollm")
    assert "maximum context length is 2048 tokens" in message  # the server's own words (n_ctx 2048)
    assert "*_max_tokens" in message and "--n_ctx" in message
    # Every request that succeeded was paid for, so every one must be on disk.
    assert cache.exists() and len(cache.read_text().splitlines()) == len(fine)


def test_generate_step_with_an_openai_oracle(server, tmp_path):
    """01_generate.py end to end with the Oracle behind the server: no local model is loaded."""
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    env = {**os.environ, "OPENAI_API_KEY": DUMMY_KEY}
    env.pop("OPENAI_BASE_URL", None)
    result = subprocess.run(
        [sys.executable, "01_generate.py", "--run_dir", str(run_dir), "--cache_dir", str(cache_dir),
         "--n_tasks", "2", "1", "1", "--n_personas", "1", "1", "1", "--persona_max_tokens", "40",
         "--gold_max_tokens", "40", "--oracle", "openai:smollm@" + server],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert DUMMY_KEY not in result.stdout + result.stderr

    data = run_dir / "data"
    personas = [json.loads(line) for line in (data / "personas.jsonl").read_text().splitlines()]
    gold = [json.loads(line) for line in (data / "gold.jsonl").read_text().splitlines()]
    assert len(personas) == 3 and len(gold) == 2 + 1 + 1
    assert {r["oracle"] for r in personas + gold} == {"openai:smollm"}
    assert len((cache_dir / "oracle_calls.jsonl").read_text().splitlines()) == 3 + 4
    # The Oracle was remote: the local model cache was never filled.
    assert not (cache_dir / "SmolLM2-135M-Instruct").exists()

    files = [p for folder in (run_dir, cache_dir) for p in folder.rglob("*") if p.is_file()]
    assert files and not [p for p in files if DUMMY_KEY.encode() in p.read_bytes()]
