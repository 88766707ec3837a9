"""04_train.py data-parallel: two processes (accelerate launch --multi_gpu, torch.distributed over gloo on the
CPU) train one adapter, the one a single process trains with twice the gradient accumulation.

Each process takes every other micro-batch of the same shuffled order (accelerate shards the data loader), so
process 0 and 1 compute exactly the micro-batches that one process accumulates; DDP sums the two gradients and
halves them, which 04's loss scaling (x number of processes) undoes. In fp32 that is the same arithmetic up to
rounding: on one machine with one thread per process the adapters came out bitwise equal, but the rounding of a
matmul depends on how many threads split it (torchrun gives each process one; CI, with two test workers beside
it, measured relative differences of ~1e-6 between the runs' losses). So both runs use one thread, and losses,
gradient norms and weights must agree to a relative 1e-4. A run that does not synchronise, shards wrongly or
orders the data otherwise differs by whole updates (relative differences of 1e-2 and more).

On a CPU, `accelerate launch --cpu --num_processes 2` starts ONE process: accelerate's multi-CPU launch needs
MPI (a hostfile), so it runs its simple launcher and ignores --num_processes. --multi_gpu starts two through
torch.distributed; 04 passes use_cpu to Trainer where there is no CUDA, so they join one run over gloo (before,
each process trained alone on all the data and both wrote the adapter).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_records
from safetensors.torch import load_file

from utils import write_jsonl_atomic

REPO = Path(__file__).resolve().parents[1]
# fp32 and no LoRA dropout (its random masks depend on the process); 8 records, 2 updates per epoch.
ARGS = ["--iteration", "0", "--load_in_4bit", "no", "--dtype", "float32", "--learning_rate", "2e-3", "--epochs", "2",
        "--warmup_ratio", "0", "--batch_size", "2", "--lora_r", "8", "--lora_dropout", "0"]


def free_port() -> int:
    """A port nobody listens on now (other test runs may share this machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train(run: Path, cache, launcher: list, grad_accum: int):
    write_jsonl_atomic(run / "iter0" / "sft.jsonl", train_records())
    done = subprocess.run([*launcher, "04_train.py", "--run_dir", str(run), "--cache_dir", str(cache), *ARGS,
                           "--grad_accum", str(grad_accum)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # as torchrun sets for each process
    assert done.returncode == 0, done.stderr[-3000:]
    log = json.loads((run / "iter0" / "train_log.json").read_text())["log_history"]
    return load_file(run / "iter0" / "adapter" / "adapter_model.safetensors"), log, done.stdout


def test_two_processes_train_the_adapter_of_one_with_twice_the_accumulation(tmp_path, model_cache):
    if shutil.which("accelerate") is None:
        raise AssertionError("accelerate's command line is missing (pip install -r requirements.txt)")
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    two, two_log, stdout = train(tmp_path / "two", model_cache, launch, grad_accum=1)
    one, one_log, _ = train(tmp_path / "one", model_cache, [sys.executable], grad_accum=2)
    assert stdout.count("adapter of m1") == 1  # one process saved it
    steps = [h for h in two_log if "loss" in h]
    assert len(steps) == 4 == len([h for h in one_log if "loss" in h])  # 8 records / (2 x 2) x 2 epochs
    for a, b in zip(steps, [h for h in one_log if "loss" in h]):
        assert (a["loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["grad_norm"]), rel=1e-4)
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-6), name
    assert any(one[name].abs().max() > 0 for name in one if "lora_B" in name)  # B starts at zero: it trained
