"""API faults: the Oracle and Judge steps behind a proxy that fails >= 30% of requests (tests/fault_proxy.py).

A real llama.cpp server runs the embedded model; the proxy in front of it answers 429 (Retry-After 0 or
1), 500 and 503, drops connections, cuts bodies in half after the upstream did the work, and answers
late. The steps must finish with exactly the outputs of a fault-free run, pay for every call once
(except those a fault threw away after the upstream completed them), and pay for nothing on a rerun
that shares the call cache. A rejected key must fail at once with one clear line, keeping the cache.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from fault_proxy import KINDS, FaultProxy, body_hash
from llama_server import llama_server, require_llama_server

from local_models import embedded_model_dir
from models import CachedChat
from server import OpenAIChat

GGUF = require_llama_server()
ROOT = Path(__file__).resolve().parents[1]

DUMMY_KEY = "sk-dummy-0b7e33d1-fault-tests"
SERVER_KEY = "sk-secret-5d2a90c4-server-key"   # what the --api_key server accepts
WRONG_KEY = "wrong-key-9f3e61b8"               # what the client sends instead ("wrong", but unmistakable)
MIN_FAULT_SHARE = 0.3
GENERATE_ARGS = ["--n_tasks", "2", "1", "1", "--n_personas", "1", "1", "1", "--persona_max_tokens", "24",
                 "--gold_max_tokens", "16", "--n_examples", "1"]
EVAL_ARGS = ["--iterations", "1", "--n_conversations", "1", "--test_pairs", "1", "--question_max_tokens", "8",
             "--answer_max_tokens", "8", "--final_max_tokens", "12", "--judge_max_tokens", "12"]
JUDGMENT_FILES = ("judgments.jsonl", "judgments_asks_only.jsonl")
ADAPTER_STD = 0.5  # m1's LoRA B, on every linear layer: m1 writes its own (garbled) answers, unlike m0's


def step_env(key=DUMMY_KEY):
    env = {**os.environ, "OPENAI_API_KEY": key, "STARGATE_MAX_RETRIES": "10",
           "OMP_NUM_THREADS": "1"}  # one torch thread: a busy 2-core machine stalls with two
    env.pop("OPENAI_BASE_URL", None)
    return env


def run_step(script, *args, key=DUMMY_KEY, timeout=240):
    start = time.monotonic()
    done = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=step_env(key),
                          capture_output=True, text=True, timeout=timeout)
    done.seconds = time.monotonic() - start
    return done


def generate(run_dir, cache_dir, url, *extra, key=DUMMY_KEY):
    return run_step("01_generate.py", "--run_dir", run_dir, "--cache_dir", cache_dir, *GENERATE_ARGS, *extra,
                    "--oracle", f"openai:smollm@{url}", key=key)


def evaluate(run_dir, cache_dir, url):
    return run_step("05_eval.py", "--run_dir", run_dir, "--cache_dir", cache_dir, *EVAL_ARGS,
                    "--judge", f"openai:smollm@{url}")


def ok(done):
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def files_under(*folders):
    return [p for folder in folders for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink()]


def assert_no_key_written(*folders, keys=(DUMMY_KEY,)):
    files = files_under(*folders)
    assert files
    leaks = [(str(p), k) for p in files for k in keys if k.encode() in p.read_bytes()]
    assert not leaks, leaks


def assert_faulted_and_paid_once(stats, n_calls, kinds=KINDS):
    """Enough faults of every kind; every call answered once; upstream work repeated only where a fault
    lost it (a body cut off, an answer stalled past the client's timeout)."""
    assert set(stats["faults"]) == set(kinds), stats
    assert stats["fault_share"] >= MIN_FAULT_SHARE, stats
    assert stats["failed_share"] >= MIN_FAULT_SHARE, stats  # not counting "slow", which answers in full
    assert not stats["abandoned_by_body"], (  # a client timeout on an unfaulted answer: the machine, not a fault
        f"the client gave up on unfaulted answers (upstream took up to {stats['upstream_seconds_max']:.1f} s)", stats)
    assert len(stats["delivered_by_body"]) == n_calls and set(stats["delivered_by_body"].values()) == {1}, stats
    for digest, completed in stats["completed_by_body"].items():
        assert completed == stats["delivered_by_body"][digest] + stats["lost_by_body"].get(digest, 0), stats


def report(request, name, **values):
    """Timings and fault shares: printed (pytest -s or -rP shows them) and kept as user properties."""
    request.node.user_properties.append((name, values))
    print(f"{name}: {values}")


@pytest.fixture(autouse=True)
def dummy_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", DUMMY_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Every prompt evaluated from scratch, so an answer depends on its request only, not on what the server
    did before (a retry straight after the lost answer would otherwise reuse that prompt's KV cache and can
    answer differently): the outputs of a faulted and a fault-free run are then comparable exactly."""
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    with llama_server(GGUF, log, extra_args=["--no_prefix_reuse"]) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def proxy(server):
    """One proxy for the module: a rerun must reach the Oracle/Judge at the same URL (it is in the cache key).

    The schedule is deterministic: the n-th request always gets the same treatment, and a step with a fixed
    number of calls always receives the same number of requests. With this seed the 7 calls of 01 meet 17
    requests (11 faulted) and the 4 of 05 meet 9 (6 faulted), each step every kind at least once."""
    with FaultProxy(server, fault_rate=0.5, seed=7, slow_delay=2.0) as faulty:
        yield faulty


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """01_generate.py run fault-free, straight against the server: the outputs every faulted run must match."""
    root = tmp_path_factory.mktemp("reference")
    done = ok(generate(root / "run", root / "cache", server))
    return root / "run", root / "cache", done.seconds


# --- The proxy itself, and the client's timeout path ------------------------------------------------------

def test_client_retries_every_fault_kind_including_its_own_timeout(server, tmp_path):
    """In process, so the client's timeout can be short: a "stall" (no answer within the timeout) is
    retried like the rest, and the cache then answers everything without a request. One request at a
    time, so that no request waits behind others long enough to time out for a reason of its own. An
    answer takes ~0.3 s here; the timeout leaves room for a busy CI machine (a 2.5 s timeout once expired
    on an unfaulted request there), and the stall outlasts it."""
    prompts = [[{"role": "user", "content": f"Name {n} colours."}] for n in range(2, 8)]
    expected = OpenAIChat("smollm", server).generate(prompts, max_new_tokens=8, temperature=1.0, seed=5)
    kinds = ("429", "500", "503", "drop", "truncate", "slow", "stall")
    with FaultProxy(server, fault_rate=0.6, kinds=kinds, seed=3, slow_delay=0.5, stall_delay=9.0) as faulty:
        cache = tmp_path / "calls.jsonl"
        client = OpenAIChat("smollm", faulty.base_url, timeout=6.0, max_retries=10, concurrency=1)
        chat = CachedChat(client, cache)
        assert chat.generate(prompts, max_new_tokens=8, temperature=1.0, seed=5) == expected
        assert_faulted_and_paid_once(faulty.stats(), len(prompts), kinds)
        assert len(cache.read_text().splitlines()) == len(prompts)

        faulty.reset()
        rerun = CachedChat(OpenAIChat("smollm", faulty.base_url, timeout=2.5, max_retries=0), cache)
        assert rerun.generate(prompts, max_new_tokens=8, temperature=1.0, seed=5) == expected
        assert faulty.stats()["received"] == 0
    assert DUMMY_KEY not in cache.read_text()


def test_the_server_answers_a_repeated_request_identically(server):
    """What makes a faulted run comparable with a fault-free one: the same request, sent again straight
    after itself (as a retry after a lost answer is), gets the same log-probs, not just the same text."""
    body = json.dumps({"model": "smollm", "max_tokens": 4, "temperature": 0.0, "logprobs": True,
                       "top_logprobs": 2, "messages": [{"role": "user", "content": "Name a river."}]}).encode()
    answers = []
    for _ in range(2):
        request = urllib.request.Request(f"{server}/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            answers.append(json.loads(reply.read())["choices"][0]["logprobs"])
    assert answers[0] == answers[1]


def test_the_fault_schedule_is_deterministic():
    digest = body_hash(json.dumps({"model": "m", "messages": []}).encode())
    schedules = []
    for _ in range(2):
        faulty = FaultProxy("http://127.0.0.1:9/v1", fault_rate=0.5, seed=7)  # never started: no upstream needed
        schedules.append([faulty._decide(digest)[0] for _ in range(40)])
    assert schedules[0] == schedules[1]
    faulted = [k for k in schedules[0] if k]
    assert len(faulted) >= 0.3 * 40 and set(faulted) == {"429", "500", "503", "drop", "truncate", "slow"}
    assert all(schedules[0][i:i + 4].count(None) for i in range(37))  # at most 3 faults in a row


# --- Oracle: 01_generate.py -------------------------------------------------------------------------------

def test_generate_step_survives_faults_and_a_rerun_pays_for_nothing(reference, proxy, tmp_path, request):
    ref_run, ref_cache, ref_seconds = reference
    run, cache = tmp_path / "run", tmp_path / "cache"
    proxy.reset()
    done = ok(generate(run, cache, proxy.base_url))
    stats = proxy.stats()
    n_calls = 3 + 4  # 3 personas, then a gold response for each of 2 + 1 + 1 pairs
    assert_faulted_and_paid_once(stats, n_calls)
    report(request, "01_generate", reference_s=round(ref_seconds, 1), faulted_s=round(done.seconds, 1),
           received=stats["received"], faults=stats["faults"], fault_share=round(stats["fault_share"], 2),
           failed_share=round(stats["failed_share"], 2), upstream_completions=stats["completed"])

    # Greedy gold is deterministic; personas are sampled, each request with its own seed, which the
    # server honours: both match the fault-free run exactly.
    for name in ("tasks.jsonl", "gold.jsonl", "personas.jsonl"):
        assert lines(run / "data" / name) == lines(ref_run / "data" / name), name
    assert len(lines(cache / "oracle_calls.jsonl")) == n_calls  # each call cached once, none twice

    # A rerun into a fresh run folder with the same call cache: nothing reaches the server.
    proxy.reset()
    ok(generate(tmp_path / "rerun", cache, proxy.base_url))
    stats = proxy.stats()
    assert stats["completed"] == 0 and stats["received"] == 0, stats
    for name in ("gold.jsonl", "personas.jsonl"):
        assert lines(tmp_path / "rerun" / "data" / name) == lines(ref_run / "data" / name), name
    assert len(lines(cache / "oracle_calls.jsonl")) == n_calls
    assert_no_key_written(run, tmp_path / "rerun", cache)


# --- Judge: 05_eval.py ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_inputs(reference, tmp_path_factory, model_cache):
    """What 05_eval.py needs without training: the reference run's data and a LoRA adapter for m1 with
    random (seeded) A and B, so that m1 differs from m0 (peft starts B at zero: no change at all)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("eval_inputs")
    model_dir = embedded_model_dir(model_cache).resolve()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.random.fork_rng():  # A is initialised from torch's global generator: seed it, locally
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, ADAPTER_STD)
    model.save_pretrained(root / "adapter")
    assert (root / "adapter" / "adapter_config.json").exists()
    shutil.copytree(reference[0] / "data", root / "data")
    return root, model_dir


def eval_run(eval_inputs, folder: Path):
    """A fresh run folder (data + iter0/adapter) and a fresh cache that shares the dequantized model."""
    source, model_dir = eval_inputs
    run, cache = folder / "run", folder / "cache"
    shutil.copytree(source / "data", run / "data")
    shutil.copytree(source / "adapter", run / "iter0" / "adapter")
    cache.mkdir(parents=True)
    (cache / "SmolLM2-135M-Instruct").symlink_to(model_dir)
    return run, cache


def judgments(run):
    """m1's judgment records (ids, order, judge, output, verdict), both files."""
    return {name: lines(run / "eval" / "m1" / name) for name in JUDGMENT_FILES}


def test_eval_step_survives_judge_faults_and_a_rerun_pays_for_nothing(eval_inputs, server, proxy, tmp_path,
                                                                      request):
    ref_run, ref_cache = eval_run(eval_inputs, tmp_path / "reference")
    reference_done = ok(evaluate(ref_run, ref_cache, server))
    expected = judgments(ref_run)
    # 1 pair x 2 orders, for m1's answers and for m0's answers after m1's conversations; four different
    # Judge prompts as long as m1 answers differently from m0 (a file of identical prompts would share calls).
    n_calls = len(lines(ref_cache / "judge_calls.jsonl"))
    assert sum(map(len, expected.values())) == n_calls == 4, (lines(ref_run / "eval" / "m1" / "answers.jsonl"),
                                                              lines(ref_run / "eval" / "m1" / "answers_m0.jsonl"))

    run, cache = eval_run(eval_inputs, tmp_path / "faulted")
    proxy.reset()
    done = ok(evaluate(run, cache, proxy.base_url))
    stats = proxy.stats()
    assert_faulted_and_paid_once(stats, n_calls)
    report(request, "05_eval", reference_s=round(reference_done.seconds, 1), faulted_s=round(done.seconds, 1),
           received=stats["received"], faults=stats["faults"], fault_share=round(stats["fault_share"], 2),
           failed_share=round(stats["failed_share"], 2), upstream_completions=stats["completed"])
    assert judgments(run) == expected
    assert len(lines(cache / "judge_calls.jsonl")) == n_calls

    # A rerun into a fresh run folder with the same cache: the same conversations and answers (seeded),
    # so the same Judge prompts, all answered from the cache.
    rerun, _ = eval_run(eval_inputs, tmp_path / "rerun")
    proxy.reset()
    ok(evaluate(rerun, cache, proxy.base_url))
    stats = proxy.stats()
    assert stats["completed"] == 0 and stats["received"] == 0, stats
    assert judgments(rerun) == expected
    assert len(lines(cache / "judge_calls.jsonl")) == n_calls
    assert_no_key_written(run, rerun, cache)


# --- Permanent errors -------------------------------------------------------------------------------------

def test_a_rejected_key_fails_at_once_and_keeps_the_cache(tmp_path, request):
    """A server that checks its key: the right key fills part of the cache; the wrong key then fails on
    the first call that needs the server, without retries, in one line, and the cache is untouched."""
    with llama_server(GGUF, tmp_path / "server.log", extra_args=["--api_key", SERVER_KEY]) as locked, \
            FaultProxy(locked, fault_rate=0.0) as counter:  # no faults: it only counts requests
        cache = tmp_path / "cache"
        small = ["--n_tasks", "1", "0", "0", "--n_personas", "1", "0", "0"]
        ok(generate(tmp_path / "first", cache, counter.base_url, *small, key=SERVER_KEY))
        assert counter.stats()["completed"] == 2  # one persona, one gold response
        cached = (cache / "oracle_calls.jsonl").read_bytes()

        # Same persona and first gold prompt (cached), plus a second task whose gold is not.
        counter.reset()
        bigger = ["--n_tasks", "2", "0", "0", "--n_personas", "1", "0", "0"]
        done = generate(tmp_path / "second", cache, counter.base_url, *bigger, key=WRONG_KEY)
        stats = counter.stats()

    report(request, "rejected key", seconds=round(done.seconds, 1), requests=stats["received"])
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {counter.base_url} rejected the API key in OPENAI_API_KEY (401)"], done.stderr[-3000:]
    assert done.stderr.rstrip().endswith(errors[0])
    assert stats["received"] == 1 and stats["upstream_statuses"] == {401: 1}, stats  # no retry of a 401
    assert done.seconds < 30, done.seconds  # the 10 retries step_env allows would back off for ~50 s
    assert (cache / "oracle_calls.jsonl").read_bytes() == cached
    assert not (tmp_path / "second" / "data" / "gold.jsonl").exists()
    assert WRONG_KEY not in done.stdout + done.stderr and SERVER_KEY not in done.stdout + done.stderr
    assert_no_key_written(tmp_path / "first", tmp_path / "second", cache, keys=(WRONG_KEY, SERVER_KEY))
