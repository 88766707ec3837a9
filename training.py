"""Plumbing for 04_train.py's fine-tuning: batches padded, the loss computed only where a token is trained, and the
checkpoint to resume from. Which tokens are trained is decided before (the "train" marks 03_select.py writes,
turned into labels by chat_format.encode_for_training); bench/ measures this same code.
"""

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer


class PadCollator:
    """Right-pads a batch; padded positions carry no loss and no attention."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, rows):
        width = max(len(r["input_ids"]) for r in rows)
        pad = [width - len(r["input_ids"]) for r in rows]
        return {"input_ids": torch.tensor([r["input_ids"] + [self.pad_id] * n for r, n in zip(rows, pad)]),
                "labels": torch.tensor([r["labels"] + [-100] * n for r, n in zip(rows, pad)]),
                "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * n for r, n in zip(rows, pad)])}


def labelled_loss(model, inputs):
    """(summed cross-entropy of the labelled tokens, the model's outputs), with vocabulary logits made only
    at the positions that predict a labelled token.

    The default causal-LM loss makes fp32 logits (batch x length x vocabulary) at every position, though
    most positions are system prompt and Roleplayer replies, which carry no loss. Same loss, less memory.
    No KV cache: the model config's use_cache would build one at every step when gradient checkpointing is off.
    """
    targets = inputs["labels"][:, 1:]  # position p predicts token p + 1
    keep = (targets != -100).any(0).nonzero()[:, 0]  # positions labelled in at least one row
    outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=keep,
                    use_cache=False)
    loss = F.cross_entropy(outputs.logits.float().flatten(0, 1), targets[:, keep].flatten(),
                           ignore_index=-100, reduction="sum")
    return loss, outputs


class LabelledLossTrainer(Trainer):
    """Trainer whose loss is labelled_loss: logits only where a labelled token is predicted."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = labelled_loss(model, inputs)
        # Trainer's convention: a mean over the labelled tokens of the whole accumulated batch (all devices),
        # with DDP's averaging of gradients over devices undone; a per-batch mean when it gives no count.
        if num_items_in_batch is None:
            loss = loss / (inputs["labels"][:, 1:] != -100).sum()
        else:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that Trainer finished writing, or None.

    Trainer writes a checkpoint's files one by one, trainer_state.json last, and not atomically: a crash
    while saving leaves a checkpoint folder without it, or with half of it. Trainer's own choice
    (resume_from_checkpoint=True) is the highest-numbered folder, complete or not, so choose here.
    """
    complete = {}
    for path in folder.glob("checkpoint-*"):
        number = re.fullmatch(r"checkpoint-(\d+)", path.name)
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):  # missing, or cut off mid-write
            continue
        if number is not None:
            complete[int(number.group(1))] = path
    return complete[max(complete)] if complete else None
