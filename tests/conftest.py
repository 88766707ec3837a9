"""Shared fixtures: the repo on sys.path, one model cache for every test run, one loaded embedded model,
one short training run.

The embedded model is dequantized once (~40 s) into the cache folder and reused by later runs and by
the subprocess smoke tests; point STARGATE_TEST_CACHE elsewhere to keep it out of the repository.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import local_models  # noqa: E402  (needs the repo root on sys.path first)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# One CPU thread: for a 135M model the per-op overhead dominates, and on a 2-core machine that is busy
# with anything else, two spinning OpenMP threads made generation 10-20x slower (measured: 8 tokens for
# 2 prompts took 11-28 s with 2 threads, 1.3-1.7 s with 1).
torch.set_num_threads(1)
# The steps and servers the tests start as subprocesses too: pytest runs two workers (pytest.ini), and two
# workers whose subprocesses each spun two threads on two cores took 34 minutes in CI, one worker 20.
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """The folder that holds the dequantized embedded model (made on first use, then reused)."""
    return Path(os.environ.get("STARGATE_TEST_CACHE") or REPO / "cache")


@pytest.fixture(scope="session")
def lm(model_cache):
    """The embedded model, loaded once for the whole session. Tests must not attach adapters to it.

    In float32, whatever the CPU: tests that compare batched with single-prompt results (or with HF's
    own generate) check the algorithm, and bf16 rounding would blur that (bf16 is tested on its own)."""
    return local_models.LocalLM("embedded", cache_dir=model_cache, dtype="float32")


# One short run of 04_train.py, shared by three tests: test_train.py checks what it learned,
# test_resume.py kills a copy of it after a checkpoint and compares the resumed adapter with this one, and
# evaluates this adapter as m1. The records differ only in the user's name, so the data order matters
# (a resume that replayed the batches in another order would train another adapter), but they share the
# question to learn. 8 records, batch 4, 3 epochs: 6 updates, a checkpoint every 3 (one in mid-epoch).
TRAIN_QUESTION = "Do you have any dietary restrictions?"
TRAIN_NAMES = ["Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana"]
TRAIN_ARGS = ["--iteration", "0", "--learning_rate", "2e-3", "--epochs", "3", "--batch_size", "4", "--grad_accum", "1",
              "--lora_r", "8", "--load_in_4bit", "no", "--save_steps", "3"]


def train_prompt(name: str) -> list[dict]:
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"Hi, I'm {name}. Can you suggest a recipe for dinner tonight?"}]


def train_records() -> list[dict]:
    """sft.jsonl records as 03_select.py writes them: the loss on the assistant's question only."""
    return [{"task_id": "t0", "persona_id": f"p{i}", "conv_id": 0, "iteration": 0,
             "messages": [dict(m, train=False) for m in train_prompt(name)]
             + [{"role": "assistant", "content": TRAIN_QUESTION, "train": True}]}
            for i, name in enumerate(TRAIN_NAMES)]


def cpu_env() -> dict:
    """The environment for a subprocess whose outputs a test compares bitwise with another run's: the GPU hidden,
    so it computes on the CPU also on a machine with one. On CUDA, scoring's index_add_ uses atomics and SDPA's
    backward is nondeterministic, so two runs of the same step need not agree to the last bit there."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def train_command(run, cache) -> list[str]:
    return [sys.executable, "04_train.py", "--run_dir", str(run), "--cache_dir", str(cache), *TRAIN_ARGS]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, model_cache):
    """(iter0 folder with sft.jsonl, adapter/ and train_log.json; 04's stdout) of the shared training run."""
    from utils import write_jsonl_atomic

    run = tmp_path_factory.mktemp("train")
    write_jsonl_atomic(run / "iter0" / "sft.jsonl", train_records())
    done = subprocess.run(train_command(run, model_cache), cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=cpu_env())  # test_resume.py compares a resumed run with this one bitwise
    assert done.returncode == 0, done.stderr[-3000:]
    return run / "iter0", done.stdout
