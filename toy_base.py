"""The toy preset's Q_BASE: the embedded model, warmed up once on answering with what the user told it.

NOT a STaR-GATE step and NOT the paper's setting. The paper's base model (Mistral-7B-Instruct) answers with
what a user said; the embedded 135M model does not: told two of a toy task's values outright, it names about
1% of them and 90% of its final answers are another question or a refusal (bench/answer_use.py). Then better
questions cannot make better answers, and a learner watching the toy world would see nothing. This script
gives the embedded model that one ability, before any STaR-GATE iteration; the toy preset uses the result as
its Q_BASE (the Questioner m0, the scorer, the base of every adapter).

Reads   <world>/world.json and <world>/warmup_tasks.jsonl: tasks written for the warm-up, none of them in
        <world>/tasks.jsonl (so none in any split of a run), each with a plain suggestion for it.
Writes  <out>/            the warmed-up model, merged (safetensors + tokenizer): the spec `hf:<out>`
        <out>/warmup.json how it was made (settings, data counts)
        <out>.build/      its training records (iter0/sft.jsonl) and 04_train.py's log

The data: for each warm-up task, three dialogues of 1 to 3 turns with the scripted Roleplayer. Questions taken
from the world's examples make the user reveal two, one or none of the task's relevant values; one question per
dialogue is the embedded model's own, sampled as in 02. Then the answer to learn: it names the values the user
told, every one and no other, then gives the task's suggestion; with nothing told it stays general. Its
wording is its own, not the Oracle's gold answer's. Trained by 04_train.py itself (LoRA), then merged.

The loss covers the final answer AND the model's own question, exactly as it asked it; never the world's
example questions. Trained on the answers alone, the model answered everywhere: it asked in 0% of its turns
instead of 85% (measured). Its own questions, unselected, anchor its asking where it was, as STaR-GATE's
response regularisation anchors its answers: no question is chosen for being good, so the warm-up teaches
nothing about what to ask (the question rates before and after are in docs/EXPERIMENTS.md).

    python toy_base.py --out cache/toy-base
"""

import os
import random
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from local_models import load_local
from models import ModelPool
from roles import answer_view, questioner_view, roleplayer_view
from scripted import mentions
from stargate import cut_at_question  # one question per turn, as in 02
from utils import (StepError, check_rerun, parse_args, read_jsonl, record_args, run_main, seed_everything,
                   write_json_atomic, write_jsonl_atomic)

# The final answers of the warm-up: a short list of what the user told, then the task's suggestion.
TOLD_ANSWERS = ["Keeping in mind what you told me ({values}), I suggest {suggestion}.",
                "Based on what you said ({values}), my advice is {suggestion}.",
                "Since you mentioned {values}, I would recommend {suggestion}."]
GENERAL_ANSWERS = ["I suggest {suggestion}.", "My advice is {suggestion}.", "I would recommend {suggestion}."]
ROOT = Path(__file__).resolve().parent
PROMPTED = ("questioner",)  # roles.py's prompts this step's outputs depend on


@dataclass
class Args:
    out: str = field(default="cache/toy-base", metadata={"help": "folder of the warmed-up model (spec hf:<out>)"})
    world: str = field(default="data/toy", metadata={"help": "the toy world folder (world.json, warmup_tasks.jsonl)"})
    dialogues_per_task: int = field(default=3, metadata={"help": "simulated dialogues per warm-up task"})
    question_max_tokens: int = field(default=24, metadata={"help": "token cap of a question (the toy preset's)"})
    epochs: float = field(default=2.0, metadata={"help": "passes over the warm-up records"})
    learning_rate: float = field(default=1e-3, metadata={"help": "LoRA learning rate"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    seed: int = field(default=0, metadata={"help": "seeds the dialogues and the training"})
    cache_dir: str = field(default="cache", metadata={"help": "where the embedded model is cached"})
    dtype: str = field(default="auto", metadata={
        "help": "training computes in: auto (bfloat16 on a CPU with native bf16 matmuls or a GPU, else float32), "
                "bfloat16, float32 (the merged model is saved in float32)", "choices": ["auto", "bfloat16", "float32"]})
    overwrite: bool = field(default=False, metadata={
        "help": "make the model again even if it exists (a rerun with other settings stops otherwise)"})


def warmup_answer(values: list[str], suggestion: str, rng: random.Random) -> str:
    """The answer the warm-up teaches: every value the user told (their keywords), then the suggestion."""
    if values:
        listed = values[0] if len(values) == 1 else f"{', '.join(values[:-1])} and {values[-1]}"
        return rng.choice(TOLD_ANSWERS).format(values=listed, suggestion=suggestion)
    return rng.choice(GENERAL_ANSWERS).format(suggestion=suggestion)


def warmup_records(questioner, world_chat, tasks: list[dict], per_task: int, question_max_tokens: int, seed: int):
    """04_train.py's records (sft.jsonl) of the warm-up and how many dialogues revealed 0, 1 and 2 of their
    task's relevant values.

    Each dialogue (1 to 3 turns, in random order): questions from the world's examples about 2, 1, 0, 2, ... of
    the task's relevant attributes (so that the answer has values to use), and one question the model asks
    itself, sampled as in 02_simulate.py; the scripted Roleplayer answers each. Then the answer that names
    what the user told. Trained on: the final answer and the model's own question; never the world's
    example questions, the instructions or a user turn.
    """
    rng = random.Random(seed)
    names = [n.strip() for n in (ROOT / "data" / "names.txt").read_text().splitlines() if n.strip()]
    world = world_chat.world
    items = []
    for task in tasks:
        for k in range(per_task):
            name = rng.choice(names)
            turns = [rng.choice(world.attributes[a]["questions"]) for a in rng.sample(task["attributes"], 2 - k % 3)]
            turns.insert(rng.randint(0, len(turns)), None)  # None: the model asks this one itself
            items.append({"name": name, "bio": world.bio(name, rng), "task": task["text"], "turns": turns,
                          "suggestion": task["suggestion"], "messages": []})
    settings = dict(max_new_tokens=question_max_tokens, temperature=0.9, top_p=0.9, batch_size=32)  # as in 02
    for turn in range(3):
        active = [i for i in items if turn < len(i["turns"])]
        own = [i for i in active if i["turns"][turn] is None]
        asked = questioner.generate([questioner_view(i["name"], i["task"], i["messages"]) for i in own],
                                    seed=seed + 1000 * turn, **settings)
        for i, question in zip(own, asked):
            i["messages"].append({"role": "assistant", "content": cut_at_question(question), "own": True})
        for i in active:
            if i["turns"][turn] is not None:
                i["messages"].append({"role": "assistant", "content": i["turns"][turn], "own": False})
        replies = world_chat.generate([roleplayer_view(i["bio"], i["task"], i["messages"]) for i in active])
        for i, reply in zip(active, replies):
            i["messages"].append({"role": "user", "content": reply})
    records, revealed = [], [0, 0, 0]
    for n, item in enumerate(items):
        dialogue = [{"role": m["role"], "content": m["content"]} for m in item["messages"]]
        told = world.told(dialogue)
        revealed[sum(a in told for a in world.relevant(item["task"]))] += 1
        said = [m["content"] for m in dialogue if m["role"] == "user"]
        values = sorted(told.values(), key=lambda k: next(j for j, text in enumerate(said) if mentions(text, k)))
        # The answer view of the dialogue; only the model's own question is marked for training.
        view = answer_view(item["name"], item["task"], item["messages"])
        messages = [{"role": m["role"], "content": m["content"], "train": m.get("own", False)} for m in view]
        messages.append({"role": "assistant", "content": warmup_answer(values, item["suggestion"], rng), "train": True})
        records.append({"task_id": f"w{n:04d}", "persona_id": "toy", "conv_id": 0, "iteration": 0,
                        "messages": messages})
    return records, revealed


def main():
    args, = parse_args(Args)
    seed_everything(args.seed)
    out, build = Path(args.out), Path(f"{args.out}.build")
    check_rerun(build / "args_toy_base.json", [out, build / "iter0"], args.overwrite, args, prompts=PROMPTED)
    if (out / "config.json").exists():
        print(f"toy_base: {out} exists; nothing to do")
        return
    tasks = read_jsonl(Path(args.world) / "warmup_tasks.jsonl")
    toy_tasks = {t["text"] for t in read_jsonl(Path(args.world) / "tasks.jsonl")}
    if any(t["text"] in toy_tasks for t in tasks):
        raise StepError(f"{args.world}/warmup_tasks.jsonl shares a task with tasks.jsonl; the warm-up must not "
                        "see a task that a run can test on")

    # The warm-up records: the embedded model's own dialogues, then the answer that uses what they revealed.
    pool = ModelPool(args.cache_dir, "no", dtype=args.dtype)
    records, revealed = warmup_records(pool.chat("embedded"), pool.chat(f"scripted:{args.world}"), tasks,
                                       args.dialogues_per_task, args.question_max_tokens, args.seed)
    record_args(build / "args_toy_base.json", args, prompts=PROMPTED)
    write_jsonl_atomic(build / "iter0" / "sft.jsonl", records)

    # Train a LoRA adapter on them with 04_train.py (the same code as every STaR-GATE iteration).
    command = [sys.executable, str(ROOT / "04_train.py"), "--run_dir", str(build), "--iteration", "0",
               "--questioner", "embedded", "--cache_dir", args.cache_dir, "--dtype", args.dtype,
               "--learning_rate", str(args.learning_rate), "--epochs", str(args.epochs), "--batch_size", "1",
               "--grad_accum", "4", "--lora_r", str(args.lora_r), "--lora_dropout", "0", "--no_gradient_checkpointing",
               "--load_in_4bit", "no", "--seed", str(args.seed)]
    if subprocess.run(command).returncode != 0:
        raise StepError("toy_base: 04_train.py failed on the warm-up records (its error is above)")

    # Merge the adapter into float32 weights and save the model where the preset's spec points.
    from peft import PeftModel

    model, tokenizer = load_local("embedded", args.cache_dir, "no", False, "float32")
    merged = PeftModel.from_pretrained(model, str(build / "iter0" / "adapter")).merge_and_unload()
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json_atomic(tmp / "warmup.json", {"args": asdict(args), "records": len(records), "tasks": len(tasks),
                                            "revealed_0_1_2": revealed, "from": "embedded",
                                            "trained_on": "final answers and its own questions"})
    os.replace(tmp, out)  # atomic: its presence means the model is complete
    print(f"toy_base: {len(records)} warm-up records over {len(tasks)} tasks (revealing 0 / 1 / 2 relevant values: "
          f"{' / '.join(map(str, revealed))}); "
          f"the warmed-up model is {out} (spec hf:{out}); {build} keeps its warm-up records and 04_train.py's log "
          "(the 'adapter of m1' 04 named above is the warm-up's, merged into this model)")


if __name__ == "__main__":
    run_main(main)
