"""bench/memory_plan.py and bench/gpu.py: the plan's model sizes and preset settings are the real ones, the
README shows what the plan prints, and the GPU benchmark runs end to end at a tiny shape on the CPU (its
Mistral-shaped model built directly in 4-bit has the structure a 4-bit load gives)."""

import dataclasses
import json
import math
import re
import shlex
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest
import torch
from mistral_standin import build_standin

import local_models
import models
from utils import StepError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import memory_plan  # noqa: E402

bnb = pytest.importorskip("bitsandbytes")


def test_model_sizes_are_the_real_ones():
    mistral = memory_plan.Shape.of(memory_plan.model_config(memory_plan.MISTRAL), quantized=True)
    assert mistral.quantized_params + mistral.other_params == 7_241_732_096  # Mistral-7B's parameter count
    assert mistral.other_params == 2 * 32000 * 4096 + 65 * 4096  # embeddings, head and norms stay bf16
    assert mistral.kv_per_token == 128 * 1024  # 32 layers x K and V x 8 heads x 128 x bf16
    assert 3.8 < mistral.weights() / 2 ** 30 < 3.9  # ~4.1 GB, as Mistral-7B loads in bnb NF4
    smol = memory_plan.Shape.of(memory_plan.model_config(memory_plan.SMOL), quantized=False)
    assert smol.quantized_params + smol.other_params == 134_515_008  # tied embeddings counted once
    # transformers 5 fuses Mixtral's experts into 3-D parameters, which bitsandbytes does not quantize: in
    # "4-bit" the paper preset's Roleplayer keeps ~45B parameters in bf16 (README, "Memory plan").
    mixtral = memory_plan.Shape.of(memory_plan.model_config(memory_plan.MIXTRAL), quantized=True)
    assert mixtral.other_params > 45e9 and mixtral.weights() / 2 ** 30 > 85


def preset_flags(name: str) -> dict:
    """The --flag value pairs of a run_all.sh preset, per *_FLAGS variable, and its model assignments."""
    block = re.search(rf"^\s*{name}\)(.*?);;", (REPO / "run_all.sh").read_text(), re.S | re.M).group(1)
    values, flags = dict(re.findall(r'"\$\{([A-Z_]+)=([^}]*)\}"', block)), {}  # each a default: "${NAME=value}"
    for variable, value in ((k, v) for k, v in values.items() if k.endswith("_FLAGS")):
        words, parsed = shlex.split(value), {}
        for i, word in enumerate(words):
            if word.startswith("--no_"):
                parsed[word[5:]] = False
            elif word.startswith("--") and i + 1 < len(words) and not words[i + 1].startswith("--"):
                parsed[word[2:]] = words[i + 1]
        flags[variable] = parsed
    flags["models"] = {role: values[role] for role in ("QUESTIONER", "ROLEPLAYER")}
    return flags


# Preset field -> (run_all.sh variables, step, the step's argument). run_all.sh passes 05 SIM_FLAGS, then
# EVAL_FLAGS: where both set an argument, the later one holds.
SETTINGS = {
    "persona_max_tokens": ("GEN_FLAGS", "01_generate", "persona_max_tokens"),
    "gold_max_tokens": ("GEN_FLAGS", "01_generate", "gold_max_tokens"),
    "oracle_batch_size": ("GEN_FLAGS", "01_generate", "batch_size"),
    "question_max_tokens": ("SIM_FLAGS", "02_simulate", "question_max_tokens"),
    "answer_max_tokens": ("SIM_FLAGS", "02_simulate", "answer_max_tokens"),
    "max_turns": ("SIM_FLAGS", "02_simulate", "max_turns"),
    "simulate_batch_size": ("SIM_FLAGS", "02_simulate", "batch_size"),
    "select_answer_max_tokens": ("SELECT_FLAGS", "03_select", "answer_max_tokens"),
    "select_batch_size": ("SELECT_FLAGS", "03_select", "batch_size"),
    "train_batch_size": ("TRAIN_FLAGS", "04_train", "batch_size"),
    "max_length": ("TRAIN_FLAGS", "04_train", "max_length"),
    "lora_r": ("TRAIN_FLAGS", "04_train", "lora_r"),
    "lora_dropout": ("TRAIN_FLAGS", "04_train", "lora_dropout"),
    "gradient_checkpointing": ("TRAIN_FLAGS", "04_train", "gradient_checkpointing"),
    "eval_question_max_tokens": ("SIM_FLAGS EVAL_FLAGS", "05_eval", "question_max_tokens"),
    "eval_answer_max_tokens": ("SIM_FLAGS EVAL_FLAGS", "05_eval", "answer_max_tokens"),
    "final_max_tokens": ("EVAL_FLAGS", "05_eval", "final_max_tokens"),
    "judge_max_tokens": ("EVAL_FLAGS", "05_eval", "judge_max_tokens"),
    "eval_batch_size": ("EVAL_FLAGS", "05_eval", "batch_size"),
    "batch_tokens": ("MODEL_FLAGS", "01_generate", "batch_tokens"),
}


def step_default(step: str, argument: str):
    """The default of a step's command-line argument, from whichever of its settings classes holds it."""
    module = import_module(step)
    for settings in (module.Args, getattr(module, "SimulationSettings", None), models.ModelSettings):
        if settings is not None and argument in {f.name for f in dataclasses.fields(settings)}:
            return getattr(settings(), argument)
    raise AssertionError(f"{step} has no argument {argument}")


@pytest.mark.parametrize("name", list(memory_plan.PRESETS))
def test_the_plan_uses_the_presets_settings(name):
    """Each memory-relevant setting of the plan's preset equals run_all.sh's flag, or the step's default."""
    flags, preset = preset_flags(name), memory_plan.PRESETS[name]
    for field, (variables, step, argument) in SETTINGS.items():
        value = default = step_default(step, argument)
        for variable in variables.split():
            value = flags.get(variable, {}).get(argument, value)
        assert getattr(preset, field) == type(default)(value), f"{name}: {field}"
    specs = {"embedded": memory_plan.SMOL, "hf:$CACHE_DIR/toy-base": memory_plan.SMOL,  # warmed up, same shape
             "hf:mistralai/Mistral-7B-Instruct-v0.2": memory_plan.MISTRAL,
             "hf:mistralai/Mixtral-8x7B-Instruct-v0.1": memory_plan.MIXTRAL}
    assert specs[flags["models"]["QUESTIONER"]] == preset.questioner
    roleplayer = flags["models"]["ROLEPLAYER"]
    served = roleplayer.startswith("openai:") and preset.roleplayer is None and not preset.local_roleplayer
    assert specs.get(roleplayer) == preset.roleplayer or roleplayer in ("$QUESTIONER", "embedded") or served


def test_the_readme_shows_what_the_plan_prints(model_cache):
    done = subprocess.run([sys.executable, "bench/memory_plan.py", "--cache_dir", str(model_cache)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    readme = (REPO / "README.md").read_text()
    assert done.stdout.strip() in readme, "README's memory plan is out of date: rerun bench/memory_plan.py"


def test_the_4bit_model_built_directly_is_what_a_4bit_load_gives(tmp_path, model_cache):
    import gpu
    from transformers import AutoConfig

    folder = build_standin(tmp_path / "standin", local_models.embedded_model_dir(model_cache))
    loaded, _ = local_models.load_local(f"hf:{folder}", model_cache, load_in_4bit="yes")
    built = gpu.random_4bit_model(AutoConfig.from_pretrained(folder), torch.device("cpu"))
    assert {n: type(m) for n, m in built.named_modules()} == {n: type(m) for n, m in loaded.named_modules()}
    for (name, a), (_, b) in zip(built.named_parameters(), loaded.named_parameters(), strict=True):
        assert (type(a), a.dtype, a.shape) == (type(b), b.dtype, b.shape), name
        if isinstance(a, bnb.nn.Params4bit):
            assert (a.quant_state.quant_type, a.quant_state.blocksize, a.quant_state.nested, a.quant_state.dtype) == (
                b.quant_state.quant_type, b.quant_state.blocksize, b.quant_state.nested, b.quant_state.dtype), name
    assert built.is_loaded_in_4bit and built.config.quantization_config.bnb_4bit_quant_type == "nf4"


def test_the_gpu_benchmark_runs_at_a_tiny_shape_on_the_cpu(tmp_path, model_cache):
    done = subprocess.run([sys.executable, "bench/gpu.py", "--shape", "tiny", "--out", str(tmp_path / "r.json"),
                           "--cache_dir", str(model_cache)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    rows = result["rows"]
    assert [r["what"] for r in rows] == 2 * [
        "02 questions, turn 3", "02 answers, turn 3", "05 final answers", "05 judge", "05 gold log-probs",
        "04 training step"]
    assert rows[0]["model"].startswith("Mistral-7B-Instruct-v0.2-shaped") and rows[6]["model"].startswith("SmolLM2")
    for r in rows:
        assert "error" not in r and r["tokens_per_s"] > 0 and r["planned_gib"] > 0, r
        assert r["peak_allocated_gib"] is None  # no GPU: nothing measured, nothing made up
        if r["kind"] == "generate":
            assert r["rows"] == 2 and r["counted_tokens"] > 0, r
            assert r["tokens"] > 150  # the prompts keep their real length (instructions, example, dialogue)
        if r["kind"] == "train":
            assert r["rows"] == 1 and r["tokens"] <= 512 and r["new"] > 0 and math.isfinite(r["loss"])
    assert "| model | call |" in done.stdout


def test_the_gpu_benchmark_says_what_it_needs(monkeypatch, tmp_path):
    import gpu

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--out", str(tmp_path / "r.json")])
    with pytest.raises(StepError, match="--shape 7b needs a CUDA GPU"):  # printed as one error: line, exit 2
        gpu.main()
    assert not (tmp_path / "r.json").exists()
