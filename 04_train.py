"""Step 4: fine-tune the next Questioner FROM the base model (Sec. 3, step 5).

Reads   <run_dir>/iter{t}/sft.jsonl (03_select.py): kept conversations + final answers.
Writes  <run_dir>/iter{t}/adapter/  the LoRA adapter of Q_{t+1} (a standard PEFT folder, safetensors)
        <run_dir>/iter{t}/train_log.json  the trainer's loss log

Every iteration trains from Q_BASE, not from Q_t (expert iteration as in STaR): Q_t only chose the data.
The loss covers the Questioner's turns (its questions and the final answer); system and user tokens are
masked. The paper fine-tuned all weights (lr 2e-5, cosine, warmup 0.1, 1 epoch, batch 64, length 1024);
here QLoRA (4-bit NF4 base + LoRA on every linear projection) keeps a 7B model on one consumer GPU,
with a learning rate suited to LoRA. Runs under `accelerate launch 04_train.py ...` on several GPUs as is,
and resumes from its last checkpoint after a crash.

    python 04_train.py --run_dir runs/tiny --iteration 0
    accelerate launch 04_train.py --run_dir runs/paper --iteration 0 --questioner hf:mistralai/Mistral-7B-Instruct-v0.2
"""

import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainingArguments

from chat_format import encode_for_training, template_accepts_system
from local_models import load_local, mixed_precision, resolve_dtype
from models import ModelSettings
from specs import check_specs
from training import LabelledLossTrainer, PadCollator, last_checkpoint
from utils import (StepError, check_rerun, parse_args, read_jsonl, record_args, run_main, seed_everything,
                   write_json_atomic)

# peft and Trainer still call transformers 5's old names for activation checkpointing: a warning per call that
# says nothing to a user.
warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)


@dataclass
class Args:
    run_dir: str = field(default="runs/tiny", metadata={"help": "folder of this run"})
    iteration: int = field(default=0, metadata={"help": "t: train Q_{t+1} on the records of iteration t"})
    questioner: str = field(default="embedded", metadata={"help": "Q_BASE model spec (training starts from it)"})
    learning_rate: float = field(default=2e-4, metadata={"help": "LoRA learning rate (paper, full fine-tune: 2e-5)"})
    lr_scheduler: str = field(default="cosine", metadata={"help": "learning-rate schedule (paper: cosine)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of steps warming up (paper: 0.1)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the records (paper: 1)"})
    batch_size: int = field(default=4, metadata={"help": "sequences per device per step"})
    grad_accum: int = field(default=16, metadata={
        "help": "steps per update: batch_size x grad_accum x GPUs = 64 (paper)"})
    max_length: int = field(default=1024, metadata={
        "help": "longest sequence in tokens (paper: 1024); longer ones are cut"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scale numerator"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    gradient_checkpointing: bool = field(default=True, metadata={
        "help": "recompute activations in the backward pass, to save memory (--no_gradient_checkpointing: faster, "
                "for small models)"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every this many updates (for resuming)"})
    seed: int = field(default=0, metadata={"help": "seeds LoRA initialisation and data order"})
    overwrite: bool = field(default=False, metadata={
        "help": "train the adapter again even if it exists (a rerun with other settings stops otherwise)"})


def main():
    args, model_args = parse_args(Args, ModelSettings)
    seed_everything(args.seed)
    out = Path(args.run_dir) / f"iter{args.iteration}"
    adapter_dir = out / "adapter"
    check_specs(questioner=args.questioner)
    # Here batch_size is the training batch (with grad_accum, the updates): it changes the adapter.
    check_rerun(out / "args_04_train.json", [adapter_dir, out / "checkpoints", out / "train_log.json"], args.overwrite,
                args, model_args, counted=("batch_size",))
    if (adapter_dir / "adapter_config.json").exists():
        print(f"04_train: {adapter_dir} exists; nothing to do")
        return
    records = read_jsonl(out / "sft.jsonl", "sft")

    # Q_BASE, in 4-bit NF4 for QLoRA when asked (auto: a big model on a GPU), with fresh LoRA adapters on all
    # linear layers.
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model, tokenizer = load_local(args.questioner, model_args.cache_dir, model_args.load_in_4bit,
                                  model_args.trust_remote_code, model_args.dtype)
    quantized = getattr(model, "is_loaded_in_4bit", False)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))

    # The training sequences: labels only on the messages marked "train" (the Questioner's turns).
    system_ok = template_accepts_system(tokenizer)
    dataset, cut = [], 0
    for record in records:
        ids, labels = encode_for_training(tokenizer, record["messages"], system_ok)
        cut += len(ids) > args.max_length
        dataset.append({"input_ids": ids[:args.max_length], "labels": labels[:args.max_length]})
    if not any(l != -100 for row in dataset for l in row["labels"]):
        raise StepError(f"{out / 'sft.jsonl'}: no message is marked for training")

    checkpoints = out / "checkpoints"
    training_args = TrainingArguments(
        output_dir=str(checkpoints), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler, warmup_steps=args.warmup_ratio, num_train_epochs=args.epochs,
        activation_checkpointing=args.gradient_checkpointing, activation_checkpointing_kwargs={"use_reentrant": False},
        # On a machine without CUDA, use_cpu makes a multi-process launch (torchrun, accelerate launch --multi_gpu)
        # one data-parallel run over gloo; without it each process trained alone on all the data.
        use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="steps", save_steps=args.save_steps,
        **mixed_precision(resolve_dtype(model_args.dtype, quantized)),  # bf16, or fp16 with loss scaling
        save_total_limit=1, report_to="none", seed=args.seed, remove_unused_columns=False,
        # Under DDP: every LoRA weight gets a gradient at every step (LoRA on all linear layers), so DDP need not
        # search the graph for unused ones; Trainer's guess for a PeftModel would be to search.
        ddp_find_unused_parameters=False)
    trainer = LabelledLossTrainer(model=model, args=training_args, train_dataset=dataset,
                                  data_collator=PadCollator(tokenizer.pad_token_id))
    # After a crash: continue from the last complete checkpoint. It holds the LoRA weights, AdamW's moments,
    # the learning-rate schedule's position, the RNG states (dropout) and the step, from which Trainer skips
    # the batches already seen in the same order, so the adapter equals that of an uninterrupted run.
    record_args(out / "args_04_train.json", args, model_args)
    resume = last_checkpoint(checkpoints)
    if resume is not None and trainer.is_world_process_zero():
        print(f"04_train: resuming from {resume}")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    # Save the adapter of Q_{t+1} atomically (write beside, then rename): its presence means "done".
    if trainer.is_world_process_zero():
        tmp = out / f"adapter.tmp{os.getpid()}"
        model.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, adapter_dir)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        write_json_atomic(out / "train_log.json", {"log_history": trainer.state.log_history, "truncated": cut})
        shutil.rmtree(checkpoints, ignore_errors=True)
        tokens = sum(sum(l != -100 for l in row["labels"]) for row in dataset)
        print(f"04_train: {len(dataset)} records ({tokens} trained tokens, {cut} cut at {args.max_length}), "
              f"{trainer.state.global_step} updates, loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
              f"adapter of m{args.iteration + 1} in {adapter_dir}")


if __name__ == "__main__":
    run_main(main)
