"""The `laptop` preset as a user runs it, in miniature on the CPU: `bash run_all.sh laptop` end to end, with the
preset's 4-bit loading (its MODEL_FLAGS: --load_in_4bit yes) and QLoRA training path (prepare_model_for_kbit_training,
gradient checkpointing, LoRA on the NF4 base), on the random-weight Mistral-7B-Instruct stand-in
(tests/mistral_standin.py: Mistral's architecture and strict chat template) as QUESTIONER, which the preset's
Roleplayer shares (one 4-bit copy). With OPENAI_API_KEY set, as here, the preset's Oracle and Judge are
`openai:gpt-4o`: they go to a real llama.cpp server on 127.0.0.1 (OPENAI_BASE_URL; it serves the embedded
model under whatever model name is asked for) with a dummy key. Without a key the preset puts them on the
Questioner's copy too (tests/test_settings.py checks that wiring). Sizes and token caps are the smoke
preset's, through run_all.sh's environment overrides. Random weights write garbage: this checks the plumbing,
not quality."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from llama_server import llama_server, require_llama_server
from mistral_standin import build_standin

import local_models
from utils import load_pairs, read_jsonl

bnb = pytest.importorskip("bitsandbytes")
GGUF = require_llama_server()

REPO = Path(__file__).resolve().parents[1]


def smoke_preset(names) -> dict:
    """run_all.sh's smoke preset's values of these variables (the smallest sizes and caps exercising every step)."""
    block = re.search(r"^\s*smoke\)(.*?);;", (REPO / "run_all.sh").read_text(), re.S | re.M).group(1)
    values = dict(re.findall(r'"\$\{([A-Z_]+)=([^}]*)\}"', block))  # each preset value is a default: "${NAME=value}"
    return {name: values[name] for name in names}


# Sizes and caps are the smoke preset's; MODEL_FLAGS stay the laptop preset's. TRAIN_FLAGS keep its QLoRA path
# (LoRA r 16, dropout 0.05, gradient checkpointing) but not its batch 4 x 4 and warmup 0.1: on 2 records that
# is one update, taken at the warmup's learning rate of 0, and the adapter would stay at its zero initialisation.
MINIATURE = {**smoke_preset(("ITERATIONS", "N_TASKS", "N_PERSONAS", "N", "TOP_K", "TEST_PAIRS", "SIM_FLAGS",
                             "GEN_FLAGS", "SELECT_FLAGS", "EVAL_FLAGS")),
             "TRAIN_FLAGS": "--learning_rate 1e-3 --epochs 2 --warmup_ratio 0 --batch_size 2 --grad_accum 1"}
ITERATIONS, N, TEST_PAIRS = int(MINIATURE["ITERATIONS"]), int(MINIATURE["N"]), int(MINIATURE["TEST_PAIRS"])

# What the run must not take from the caller's environment: the preset's own values and defaults are tested.
UNSET = ("OPENAI_BASE_URL", "ROLEPLAYER", "ORACLE", "JUDGE", "EVAL_N", "MODEL_FLAGS", "SEED", "DTYPE")
DUMMY_KEY = "sk-dummy-laptop-miniature-not-a-real-key"


@pytest.fixture(scope="module")
def laptop(tmp_path_factory, model_cache):
    """(run folder, stand-in folder, run_all.sh's stdout) of one miniature laptop run."""
    root = tmp_path_factory.mktemp("laptop")
    standin = build_standin(root / "standin", local_models.embedded_model_dir(model_cache))
    # A cache of the run's own: the stand-in's Oracle and Judge calls stay out of the shared model cache.
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(MINIATURE, QUESTIONER=f"hf:{standin}", RUN_DIR=str(root / "run"), CACHE_DIR=str(root / "cache"),
               OPENAI_API_KEY=DUMMY_KEY)
    with llama_server(GGUF, root / "server.log") as base_url:
        done = subprocess.run(["bash", "run_all.sh", "laptop"], cwd=REPO, env={**env, "OPENAI_BASE_URL": base_url},
                              capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return root / "run", standin, done.stdout


def test_every_step_left_its_outputs(laptop):
    run, _, stdout = laptop
    expected = [f"data/{name}.jsonl" for name in ("tasks", "personas", "gold")]
    for t in range(ITERATIONS):
        expected += [f"iter{t}/{name}" for name in ("conversations.jsonl", "scores.jsonl", "sft.jsonl",
                                                    "train_log.json", "adapter/adapter_config.json",
                                                    "adapter/adapter_model.safetensors")]
    expected += ["eval/metrics.json", "eval/report.md", "eval/controls.jsonl"]
    expected += [f"eval/m{t}/{name}.jsonl" for t in range(ITERATIONS + 1) for name in ("conversations", "scores")]
    assert [path for path in expected if not (run / path).is_file()] == []
    assert not any(run.rglob("*.partial.jsonl")) and not any(run.rglob("checkpoints"))
    assert "Win rate against m0" in (run / "eval" / "report.md").read_text()
    assert f"Report: {run}/eval/report.md" in stdout


def test_every_step_loaded_the_standin_in_4bit_as_the_preset_does(laptop):
    run, standin, _ = laptop
    spec = f"hf:{standin}"
    args = {path.relative_to(run).as_posix(): json.loads(path.read_text()) for path in run.rglob("args_*.json")}
    assert sorted(args) == ["data/args_01_generate.json", "eval/args_05_eval.json"] + sorted(
        f"iter{t}/args_0{s}.json" for t in range(ITERATIONS) for s in ("2_simulate", "3_select", "4_train"))
    for name, recorded in args.items():
        assert recorded["load_in_4bit"] == "yes" and recorded["batch_tokens"] == 16384, name  # laptop's MODEL_FLAGS
        # Questioner and Roleplayer name the stand-in (one loaded copy, models.ModelPool); with a key, the Oracle
        # and the Judge are the preset's API model, here the llama.cpp server.
        local = {recorded[r] for r in ("questioner", "roleplayer") if r in recorded}
        assert local == ({spec} if name.startswith("iter") or "eval" in name else set()), name
        assert {recorded[r] for r in ("oracle", "judge") if r in recorded} <= {"openai:gpt-4o"}, name
    assert args["data/args_01_generate.json"]["oracle"] == args["eval/args_05_eval.json"]["judge"] == "openai:gpt-4o"
    for t in range(ITERATIONS):  # QLoRA as the laptop preset trains: its LoRA settings, gradient checkpointing
        train = args[f"iter{t}/args_04_train.json"]
        assert train["gradient_checkpointing"] and train["lora_r"] == 16 and train["lora_dropout"] == 0.05
        losses = [h["loss"] for h in json.loads((run / f"iter{t}" / "train_log.json").read_text())["log_history"]
                  if "loss" in h]
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))  # smoke: 2 records, batch 2, 2 epochs


def test_the_records_are_well_formed(laptop):
    run = laptop[0]
    read_jsonl(run / "data" / "tasks.jsonl", "task")
    read_jsonl(run / "data" / "personas.jsonl", "persona")
    read_jsonl(run / "data" / "gold.jsonl", "gold")
    for t, split in enumerate(("A", "B")):
        pairs = {(p["task_id"], p["persona_id"]) for p in load_pairs(run, split, usable_only=True)}
        convs = read_jsonl(run / f"iter{t}" / "conversations.jsonl", "conversation")
        assert sorted((c["task_id"], c["persona_id"], c["conv_id"]) for c in convs) == sorted(
            (*p, n) for p in pairs for n in range(N))
        # Mistral's template takes only alternating user/assistant turns: the conversations still alternate.
        assert all([m["role"] for m in c["messages"]] == ["assistant", "user"] * c["n_turns"] for c in convs)
        scores = read_jsonl(run / f"iter{t}" / "scores.jsonl", "score")
        assert len(scores) == len(convs) and all(s["logprob"] < 0 for s in scores)
        sft = read_jsonl(run / f"iter{t}" / "sft.jsonl", "sft")
        assert {(r["task_id"], r["persona_id"]) for r in sft} == pairs  # top-1 per pair
        assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["train"] for r in sft)
    test_pairs = min(len(load_pairs(run, "test", usable_only=True)), TEST_PAIRS)  # TEST_PAIRS caps the test pairs
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["test_pairs"] == test_pairs > 0
    for t in range(ITERATIONS + 1):
        assert len(read_jsonl(run / "eval" / f"m{t}" / "conversations.jsonl", "conversation")) == test_pairs * N
        assert len(read_jsonl(run / "eval" / f"m{t}" / "scores.jsonl", "score")) == test_pairs * N
    for t in range(1, ITERATIONS + 1):
        assert len(read_jsonl(run / "eval" / f"m{t}" / "judgments.jsonl", "judgment")) == 2 * test_pairs
        w = metrics["models"][f"m{t}"]["win_rate"]
        assert w["n"] + w["unparseable"] == test_pairs
    assert {c["control"] for c in read_jsonl(run / "eval" / "controls.jsonl", "control")} == {
        "no_conversation", "persona_in_context", "other_persona"}


def test_the_adapters_of_m1_and_m2_load_onto_the_4bit_base(laptop, model_cache):
    from peft import PeftModel

    run, standin, _ = laptop
    base, tokenizer = local_models.load_local(f"hf:{standin}", model_cache, load_in_4bit="yes")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Plan my weekend in Rome."}], tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, run / "iter0" / "adapter", adapter_name="m1")
    model.load_adapter(run / "iter1" / "adapter", adapter_name="m2")
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and set(q_proj.lora_A) == {"m1", "m2"}
    for name in ("m1", "m2"):
        model.set_adapter(name)
        assert q_proj.lora_B[name].weight.abs().max() > 0  # trained: LoRA's B starts at zero
        with torch.no_grad():
            assert not torch.allclose(model(input_ids=ids).logits, plain)


def test_the_api_roles_answered_and_the_key_stayed_out_of_the_files(laptop):
    run = laptop[0]
    gold = read_jsonl(run / "data" / "gold.jsonl", "gold")
    assert gold and all(g["gold"].strip() for g in gold)  # the Oracle's answers came from the server
    judgments = [j for t in range(1, ITERATIONS + 1) for j in read_jsonl(run / "eval" / f"m{t}" / "judgments.jsonl",
                                                                          "judgment")]
    assert judgments and all(j["judge"] == "openai:gpt-4o" for j in judgments)
    cache = run.parent / "cache"
    assert list(cache.glob("*calls*.jsonl")), sorted(p.name for p in cache.iterdir())  # API calls are cached
    for path in [*run.rglob("*"), *cache.rglob("*")]:
        if path.is_file():
            assert DUMMY_KEY.encode() not in path.read_bytes(), path
