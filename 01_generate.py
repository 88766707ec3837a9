"""Step 1: the data STaR-GATE learns from (Sec. 4.1 of the paper).

Reads   a task file (JSONL with "text" per line, or plain text with one task per line, or hf:<dataset id>),
        persona sketches (few-shot examples for the Oracle) and a list of first names.
Writes  <run_dir>/data/tasks.jsonl     every task with its split: A, B (training, alternating) or test
        <run_dir>/data/personas.jsonl  first-person bios written by the Oracle, a unique first name each
        <run_dir>/data/gold.jsonl      the Oracle's persona-aware "gold" response for every (task, persona)
                                       pair of the same split
Oracle calls are cached in <cache_dir>/oracle_calls.jsonl as they finish: rerunning after a crash (or
with a new run_dir) pays for no call twice.
With --from_original, the paper's own test split is read instead (the original release's files: original.py),
every pair a test pair with the paper's gold response; no Oracle call. Also writes <run_dir>/data/original.json
(where the files came from, their sha256).

    python 01_generate.py --run_dir runs/tiny --n_tasks 4 4 3 --n_personas 3 3 3
    python 01_generate.py --run_dir runs/paper --oracle openai:gpt-4 --tasks hf:Dahoas/instruct-human-assistant-prompt
    python 01_generate.py --run_dir runs/released --from_original /path/to/release  # or a URL prefix
"""

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from models import ModelSettings, truncated
from original import parse_original, read_original
from roles import ORACLE_GOLD_PROMPT, ORACLE_SYSTEM, PERSONA_PROMPT, gold_problem
from specs import check_specs
from utils import (StepError, check_rerun, parse_args, read_jsonl, record_args, run_main, seed_everything,
                   write_json_atomic, write_jsonl_atomic)

SPLITS = ("A", "B", "test")

PROMPTED = ("oracle",)  # roles.py's prompts this step's outputs depend on


@dataclass
class Args:
    run_dir: str = field(default="runs/tiny", metadata={"help": "folder of this run; outputs go to <run_dir>/data"})
    tasks: str = field(default="data/tasks.jsonl", metadata={
        "help": "task file: JSONL with a 'text' field, or .txt with one task per line, or hf:<dataset id>"})
    persona_examples: str = field(default="data/personas.jsonl", metadata={
        "help": "hand-written persona sketches, shown to the Oracle as examples"})
    names: str = field(default="data/names.txt", metadata={"help": "first names, one per line"})
    n_tasks: list[int] = field(default_factory=lambda: [250, 250, 50], metadata={
        "help": "tasks in splits A, B and test (paper: 250 250 50)"})
    stratify_by: str = field(default="", metadata={
        "help": "a field of the JSONL task file's records that names each task's family (toy: attributes): "
                "each family's tasks are dealt over A, B and test in proportion to the splits' sizes, so a test "
                "task's family is trained on too (default: one shuffle, cut into the splits)"})
    n_personas: list[int] = field(default_factory=lambda: [50, 50, 10], metadata={
        "help": "personas in splits A, B and test (paper: 50 50 10)"})
    oracle: str = field(default="embedded", metadata={"help": "Oracle model spec (paper: GPT-4)"})
    persona_temperature: float = field(default=1.0, metadata={"help": "high, for diverse personas (Sec. 4.1)"})
    persona_max_tokens: int = field(default=250, metadata={"help": "token cap of a persona bio"})
    n_examples: int = field(default=3, metadata={"help": "persona sketches shown per persona request"})
    gold_max_tokens: int = field(default=300, metadata={"help": "token cap of a gold response (paper: 300)"})
    gold_retries: int = field(default=2, metadata={
        "help": "times a refused, empty or looping gold response is asked for again (then the pair is left out)"})
    retry_temperature: float = field(default=0.7, metadata={"help": "sampling temperature of those retries"})
    seed: int = field(default=0, metadata={"help": "seeds the splits, names, examples and sampling"})
    batch_size: int = field(default=16, metadata={"help": "prompts per batch for a local Oracle"})
    from_original: str = field(default="", metadata={
        "help": "read the original release's test split instead of generating: the folder that holds its "
                "prompts/, personas/ and gold-responses/ (star-gate-hgx/... of scandukuri/assistant-gate), or a URL "
                "prefix from which exactly those four files are fetched once (cached in <cache_dir>/original/); "
                "the task, persona and Oracle settings are then not used"})
    overwrite: bool = field(default=False, metadata={
        "help": "redo the data even if it exists (a rerun with other settings stops otherwise)"})


def load_task_texts(source: str) -> list[str]:
    """Task texts from a JSONL/text file, or the first human turn of each row of a hub dataset."""
    if source.startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise StepError("--tasks hf:<id> needs the 'datasets' package (pip install datasets)") from None
        rows = datasets.load_dataset(source[3:], split="train")
        column = "prompt" if "prompt" in rows.column_names else rows.column_names[0]
        # The paper's source formats rows as "Human: ... Assistant: ..."; keep the first human turn.
        texts = [r[column].split("Human:", 1)[-1].split("Assistant:", 1)[0].strip() for r in rows]
    elif source.endswith(".jsonl"):
        texts = []
        for number, record in enumerate(read_jsonl(source), start=1):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise StepError(f"{source}:{number}: a task record needs a string field 'text'")
            texts.append(record["text"].strip())
    else:
        if not Path(source).is_file():
            raise StepError(f"{source}: file not found")
        texts = [line.strip() for line in Path(source).read_text(encoding="utf-8").splitlines()]
    texts = list(dict.fromkeys(t for t in texts if t))  # drop blanks and exact repeats, keep order
    if not texts:
        raise StepError(f"{source}: no tasks found")
    return texts


def from_original(args, model_args, out: Path):
    """The paper's own test split as this run's data: the original release's tasks, personas (with their first
    names) and GPT-4 gold responses, every pair a test pair (original.py checks each entry). Nothing is generated;
    every gold response is kept, as in the paper (none is flagged or left out)."""
    texts, digests = read_original(args.from_original, model_args.cache_dir)
    tasks, personas, gold = parse_original(texts, args.from_original)
    write_jsonl_atomic(out / "tasks.jsonl", tasks)
    write_jsonl_atomic(out / "personas.jsonl", personas)
    write_json_atomic(out / "original.json", {"from_original": args.from_original, "sha256": digests})
    write_jsonl_atomic(out / "gold.jsonl", gold)  # last: its presence means the step is complete
    record_args(out / "args_01_generate.json", args, model_args, prompts=PROMPTED)
    print(f"01_generate: wrote {out} from the original release ({args.from_original}): {len(tasks)} tasks x "
          f"{len(personas)} personas = {len(gold)} test pairs")


def task_families(source: str, field_name: str) -> dict[str, str]:
    """Task text -> its family: the value of field_name in its record of a JSONL task file (equal values, one
    family)."""
    if not source.endswith(".jsonl"):
        raise StepError(f"--stratify_by {field_name}: needs a JSONL task file whose records carry that field, "
                        f"not {source}")
    families = {}
    for number, record in enumerate(read_jsonl(source), start=1):
        if field_name not in record:
            raise StepError(f"{source}:{number}: no field '{field_name}' to stratify the splits by")
        families[record["text"].strip()] = json.dumps(record[field_name], sort_keys=True)
    return families


def stratified(texts: list[str], family: dict[str, str], n_tasks: list[int], rng: random.Random) -> list[str]:
    """The texts reordered so that cutting them into n_tasks (A, B, test) spreads every family over the splits
    in proportion: the families one after another (in a seeded order), each family's tasks in their given
    order, are dealt a sequence of split labels in which each split's labels (and those of the tasks left
    unused) are spread evenly (A, B, test, A, B, test, ... for equal splits)."""
    groups = {}
    for text in texts:
        groups.setdefault(family[text], []).append(text)
    order = sorted(groups)
    rng.shuffle(order)
    grouped = [text for f in order for text in groups[f]]
    sizes = [*n_tasks, len(texts) - sum(n_tasks)]  # the three splits, then the unused tasks
    labels = sorted(((k + 0.5) / n, split) for split, n in enumerate(sizes) for k in range(n))
    dealt = sorted(zip((split for _, split in labels), range(len(grouped))))  # by split, then position
    return [grouped[i] for _, i in dealt]


def main():
    args, model_args = parse_args(Args, ModelSettings)
    seed_everything(args.seed)
    out = Path(args.run_dir) / "data"
    check_specs(oracle=args.oracle)
    check_rerun(out / "args_01_generate.json", [out / f"{name}.jsonl" for name in ("tasks", "personas", "gold")],
                args.overwrite, args, model_args, prompts=PROMPTED)
    if (out / "gold.jsonl").exists():
        recorded = out / "args_01_generate.json"
        source = json.loads(recorded.read_text()).get("from_original", "") if recorded.exists() else ""
        if source != args.from_original:  # never evaluate on other data than the command names
            raise StepError(f"{out} holds {'the data of ' + source if source else 'generated data'}, not the data "
                            f"--from_original names ({args.from_original or 'none'}); use another --run_dir")
        print(f"01_generate: {out} is complete; nothing to do")
        return
    if args.from_original:
        from_original(args, model_args, out)
        return
    rng = random.Random(args.seed)
    if len(args.n_tasks) != 3 or len(args.n_personas) != 3:
        raise StepError("--n_tasks and --n_personas each take three numbers: A B test")

    # Tasks: shuffle once with the seed and cut into the three splits (Sec. 4.1); with --stratify_by, every
    # family of tasks is spread over the splits first (not the paper's protocol: it then measures how the
    # Questioner generalises to new tasks of families it trained on).
    texts = load_task_texts(args.tasks)
    if sum(args.n_tasks) > len(texts):
        raise StepError(f"{args.tasks}: {len(texts)} tasks, but --n_tasks asks for {sum(args.n_tasks)}")
    family = task_families(args.tasks, args.stratify_by) if args.stratify_by else None
    rng.shuffle(texts)
    if family is not None:
        texts = stratified(texts, family, args.n_tasks, rng)
    split_of = [s for s, n in zip(SPLITS, args.n_tasks) for _ in range(n)]
    tasks = [{"task_id": f"t{i:04d}", "split": s, "text": t} for i, (s, t) in enumerate(zip(split_of, texts))]

    # Personas: the Oracle writes a first-person bio for each of a set of unique first names, shown a
    # few hand-written sketches as examples, sampled at high temperature for diversity.
    sketches = read_jsonl(args.persona_examples)
    for number, sketch in enumerate(sketches, start=1):
        if not isinstance(sketch, dict) or not isinstance(sketch.get("bio"), str) or not sketch["bio"].strip():
            raise StepError(f"{args.persona_examples}:{number}: a persona sketch needs a non-empty 'bio'")
    names = list(dict.fromkeys(n.strip() for n in Path(args.names).read_text().splitlines() if n.strip())) \
        if Path(args.names).is_file() else []
    if len(names) < sum(args.n_personas):
        raise StepError(f"{args.names}: {len(names)} unique names, but --n_personas asks for {sum(args.n_personas)}")
    rng.shuffle(names)
    persona_split = [s for s, n in zip(SPLITS, args.n_personas) for _ in range(n)]
    persona_prompts = []
    for name in names[:len(persona_split)]:
        examples = "\n\n".join(s["bio"].strip() for s in rng.sample(sketches, min(args.n_examples, len(sketches))))
        persona_prompts.append([{"role": "system", "content": ORACLE_SYSTEM},
                                {"role": "user", "content": PERSONA_PROMPT.format(examples=examples, name=name)}])

    oracle = model_args.pool().chat(args.oracle, call_cache=Path(model_args.cache_dir) / "oracle_calls.jsonl")
    persona_settings = dict(max_new_tokens=args.persona_max_tokens, temperature=args.persona_temperature,
                            top_p=1.0)
    bios = oracle.generate(persona_prompts, seed=args.seed, batch_size=args.batch_size,
                           desc="personas", **persona_settings)
    personas = []
    persona_cut = truncated(oracle, persona_prompts, args.persona_max_tokens)  # prompts that did not fit
    for i, (split, name, bio) in enumerate(zip(persona_split, names, bios)):
        if not bio.strip():
            raise StepError(f"the Oracle wrote an empty bio for {name}; try another --seed or Oracle")
        personas.append({"persona_id": f"p{i:04d}", "split": split, "name": name, "bio": bio.strip(),
                         "oracle": oracle.name, "sampling": persona_settings, "truncated": persona_cut[i]})

    # Gold responses: for every (task, persona) pair of a split, the Oracle answers the task knowing the
    # persona (greedy, <= 300 tokens, Sec. 4.1). These are what the Questioner's questions are scored on.
    pairs = [(t, p) for split in SPLITS for t in tasks if t["split"] == split
             for p in personas if p["split"] == split]
    gold_prompts = [[{"role": "system", "content": ORACLE_SYSTEM},
                     {"role": "user", "content": ORACLE_GOLD_PROMPT.format(bio=p["bio"], task=t["text"])}]
                    for t, p in pairs]
    gold_settings = dict(max_new_tokens=args.gold_max_tokens, temperature=0.0, top_p=1.0)
    answers = oracle.generate(gold_prompts, seed=args.seed, batch_size=args.batch_size, desc="gold responses",
                              **gold_settings)
    gold_cut = truncated(oracle, gold_prompts, args.gold_max_tokens)
    gold = [{"task_id": t["task_id"], "persona_id": p["persona_id"], "split": t["split"], "gold": a.strip(),
             "oracle": oracle.name, "sampling": gold_settings, "truncated": c, "attempts": 1,
             "flag": gold_problem(a)} for (t, p), a, c in zip(pairs, answers, gold_cut)]

    # A gold answer that is a refusal, empty or a loop teaches nothing: ask again, sampling this time
    # (greedy would repeat itself), up to --gold_retries times. What is still flagged stays in the file,
    # marked, and every later step leaves the pair out (utils.load_pairs); the counts are printed.
    first_flagged = sum(g["flag"] is not None for g in gold)
    retry_settings = dict(max_new_tokens=args.gold_max_tokens, temperature=args.retry_temperature, top_p=0.95)
    for attempt in range(1, args.gold_retries + 1):
        redo = [i for i, g in enumerate(gold) if g["flag"] is not None]
        if not redo:
            break
        answers = oracle.generate([gold_prompts[i] for i in redo], seed=args.seed + 1000 * attempt,
                                  batch_size=args.batch_size, desc=f"gold retry {attempt}", **retry_settings)
        for i, a in zip(redo, answers):
            gold[i].update(gold=a.strip(), sampling=retry_settings, attempts=attempt + 1, flag=gold_problem(a))
    flagged = Counter(g["flag"] for g in gold if g["flag"] is not None)
    cut = sum(r["truncated"] for r in personas + gold)

    # Final files are written atomically, gold last: its presence means the step is complete.
    write_jsonl_atomic(out / "tasks.jsonl", tasks)
    write_jsonl_atomic(out / "personas.jsonl", personas)
    write_jsonl_atomic(out / "gold.jsonl", gold)
    record_args(out / "args_01_generate.json", args, model_args, prompts=PROMPTED)
    counts = {s: (sum(t["split"] == s for t in tasks), sum(p["split"] == s for p in personas),
                  sum(g["split"] == s for g in gold)) for s in SPLITS}
    print(f"01_generate: wrote {out}: (tasks, personas, pairs) per split {json.dumps(counts)}; "
          f"{first_flagged} of {len(gold)} gold responses flagged at first, {sum(flagged.values())} still after "
          f"{args.gold_retries} retries {json.dumps(flagged)} (left out of training and evaluation); "
          f"{cut} Oracle prompts cut to fit its context")


if __name__ == "__main__":
    run_main(main)
