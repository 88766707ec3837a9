"""04_train.py on the embedded model: the loss falls, the outputs change, the adapter reloads with PEFT.

The training run is conftest.py's `trained` (shared with the crash-resume test of 04 and 05)."""

import json
import subprocess
from pathlib import Path

import torch
from conftest import TRAIN_NAMES, train_command, train_prompt

from chat_format import encode_chat, encode_for_training
from local_models import load_local
from training import LabelledLossTrainer, PadCollator, labelled_loss

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
    done = subprocess.run(train_command(trained[0].parent, model_cache), cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # the same settings (other ones would be refused: tests/test_rerun.py)
    assert done.returncode == 0 and "nothing to do" in done.stdout


def test_the_loss_at_labelled_positions_only_equals_the_default_loss(tmp_path, model_cache):
    """04's loss makes logits only where a token is labelled; it must equal the model's own full loss."""
    from transformers import TrainingArguments

    model, tokenizer = load_local("embedded", model_cache)
    chats = [[{"role": "user", "content": "Plan my trip."},
              {"role": "assistant", "content": "Where to?", "train": True},
              {"role": "user", "content": "Rome, cheaply."},
              {"role": "assistant", "content": "Take the train.", "train": True}],
             [{"role": "user", "content": "Cook me dinner, please, something quick and warm."},
              {"role": "assistant", "content": "Any allergies?", "train": True}]]
    rows = [dict(zip(("input_ids", "labels"), encode_for_training(tokenizer, c))) for c in chats]
    batch = PadCollator(tokenizer.pad_token_id)(rows)
    assert (batch["labels"] == -100).float().mean() > 0.5  # most positions carry no loss
    trainer = LabelledLossTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    with torch.no_grad():
        expected = model(**batch).loss
        ours = trainer.compute_loss(model, batch)
        labelled = (batch["labels"][:, 1:] != -100).sum()
        summed = trainer.compute_loss(model, batch, num_items_in_batch=2 * labelled)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(summed, expected / 2)  # a sum over the accumulated batch's labelled tokens


def test_the_training_forward_builds_no_kv_cache(model_cache):
    """Without gradient checkpointing the model's config (use_cache) would build a KV cache at every training step."""
    model, tokenizer = load_local("embedded", model_cache, dtype="float32")
    model.train()
    ids, labels = encode_for_training(tokenizer, [{"role": "user", "content": "Plan my trip."},
                                                 {"role": "assistant", "content": "Where to?", "train": True}])
    batch = PadCollator(tokenizer.pad_token_id)([{"input_ids": ids, "labels": labels}])
    assert model.config.use_cache and not model.is_gradient_checkpointing
    loss, outputs = labelled_loss(model, batch)
    assert loss > 0 and outputs.cache is None
