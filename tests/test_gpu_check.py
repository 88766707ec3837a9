"""bench/gpu_check.py, the one GPU check, run on the CPU at tiny sizes so that it cannot rot before a GPU runs it:
every stage but run_all (tests/test_laptop_miniature.py runs `run_all.sh laptop` on the stand-in already)."""

import json
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

bnb = pytest.importorskip("bitsandbytes")


def test_the_gpu_check_runs_at_tiny_sizes_on_the_cpu(tmp_path, model_cache):
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--tiny", "--out", str(out), "--cache_dir",
                           str(model_cache), "--stages", "environment", "embedded", "mistral"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = json.loads(out.read_text())["stages"]
    assert all(s["ok"] for s in stages.values()), {name: s.get("traceback") for name, s in stages.items()}
    environment, embedded, mistral = stages["environment"], stages["embedded"], stages["mistral"]
    assert environment["mistral_7b"] == {"params": 7_241_732_096, "4bit_auto": False}  # no CUDA: nothing quantized
    assert environment["versions"]["torch"] and environment["dtype_auto_4bit"] == "torch.bfloat16"
    assert embedded["greedy_equal_or_near_tie"] and embedded["two_runs_bitwise_equal"]
    # The adapter switched off gives the base's scores: exactly in fp32; in bf16 within its rounding (measured on
    # an AMD EPYC with AVX512-BF16: 0.004 nats on a ~100-nat sum, bf16's relative step being 0.004).
    off_is_base = embedded["adapter_off_is_the_base_exactly"] or (
        environment["dtype_auto"] != "torch.float32" and embedded["adapter_off_vs_base_max_abs"] < 0.05)
    assert off_is_base and embedded["adapter_on_differs"]
    # bf16 arithmetic (4-bit on a CPU) in another order: the batch prefills the shared prefix once. 0.0018 nats
    # measured on the toy view's prompts; a response scored one token off would differ by nats.
    assert embedded["score_vs_plain_forward_max_abs"] < 1e-2
    assert [c["what"] for c in mistral["calls"]] == ["02 questions, turn 3", "05 gold log-probs"]
    assert all(c["tokens_per_s"] > 0 and c["planned_gib"] > 0 for c in mistral["calls"])
    assert mistral["generate_tokens_per_s"]["hf_generate"] > 0
    assert mistral["trainer"]["updates"] == 3 and len(mistral["trainer"]["losses"]) == 3


def test_a_failed_stage_is_recorded_and_the_json_written_after_every_stage(tmp_path, model_cache, monkeypatch):
    """A timeout or a crash in one stage leaves the results of the stages before it, and the next still runs."""
    gpu_check = import_module("gpu_check")
    out, written, write = tmp_path / "check.json", [], gpu_check.write_json_atomic

    def fail(args):
        raise RuntimeError("CUDA out of memory (a stand-in)")

    monkeypatch.setattr(gpu_check, "mistral", fail)
    monkeypatch.setattr(gpu_check, "write_json_atomic",
                        lambda path, value: written.append(list(value["stages"])) or write(path, value))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--tiny", "--out", str(out), "--cache_dir", str(model_cache),
                                      "--stages", "mistral", "environment"])
    gpu_check.main()
    assert written == [["mistral"], ["mistral", "environment"]]
    stages = json.loads(out.read_text())["stages"]
    assert not stages["mistral"]["ok"] and "out of memory" in stages["mistral"]["error"]
    assert stages["environment"]["ok"]
