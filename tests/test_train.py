"""04_train.py on the embedded model: the loss falls, the outputs change, the adapter reloads with PEFT.

The training run is conftest.py's `trained` (shared with the crash-resume test of 04 and 05)."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import TRAIN_NAMES, train_prompt

from models import encode_chat, load_local

REPO = Path(__file__).resolve().parents[1]
PROMPT = train_prompt(TRAIN_NAMES[0])


def greedy(model, tokenizer, n=8):
    ids, _ = encode_chat(tokenizer, PROMPT)
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def test_training_lowers_the_loss(trained):
    log = json.loads((trained[0] / "train_log.json").read_text())["log_history"]
    losses = [h["loss"] for h in log if "loss" in h]
    assert len(losses) == 6  # 8 records / batch 4 x 3 epochs
    assert losses[-1] < 0.5 * losses[0]
    assert "adapter of m1" in trained[1]


def test_the_adapter_reloads_changes_the_output_and_reproduces_it(trained, model_cache):
    from peft import PeftModel

    base, tokenizer = load_local("embedded", model_cache)
    before = greedy(base, tokenizer)
    tuned = PeftModel.from_pretrained(base, str(trained[0] / "adapter"))
    after = greedy(tuned, tokenizer)
    assert after != before
    # The trained question is now the greedy answer's start.
    assert tokenizer.decode(after).startswith("Do you have")
    again, _ = load_local("embedded", model_cache)
    assert greedy(PeftModel.from_pretrained(again, str(trained[0] / "adapter")), tokenizer) == after


def test_a_finished_iteration_is_not_trained_again(trained, model_cache):
    done = subprocess.run([sys.executable, "04_train.py", "--run_dir", str(trained[0].parent), "--iteration", "0",
                           "--cache_dir", str(model_cache)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "nothing to do" in done.stdout
