"""Shared fixtures: the repo on sys.path, one model cache for every test run, one loaded embedded model.

The embedded model is dequantized once (~40 s) into the cache folder and reused by later runs and by
the subprocess smoke tests; point STARGATE_TEST_CACHE elsewhere to keep it out of the repository.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import models  # noqa: E402  (needs the repo root on sys.path first)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# One CPU thread: for a 135M model the per-op overhead dominates, and on a 2-core machine that is busy
# with anything else, two spinning OpenMP threads made generation 10-20x slower (measured: 8 tokens for
# 2 prompts took 11-28 s with 2 threads, 1.3-1.7 s with 1).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """The folder that holds the dequantized embedded model (made on first use, then reused)."""
    return Path(os.environ.get("STARGATE_TEST_CACHE") or REPO / "cache")


@pytest.fixture(scope="session")
def lm(model_cache):
    """The embedded model, loaded once for the whole session. Tests must not attach adapters to it."""
    return models.LocalLM("embedded", cache_dir=model_cache)
