"""Plumbing shared by the numbered steps: errors, arguments, seeding, JSONL records.

Nothing here is a STaR-GATE decision; those live in the steps (and the role prompts in `roles.py`).
Model loading, generation and scoring are in `local_models.py`, `server.py` and `models.py`.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

from roles import PROMPTS


class StepError(Exception):
    """A problem the user can fix (bad input, bad setting). Printed as one line, exit code 2."""


class Stopped(Exception):
    """A person playing a role ended their input (Ctrl-D): the step stops, keeping what it has saved."""


def run_main(main):
    """Run a step's main(); turn a StepError into one clear line on stderr and a non-zero exit.
    A finished step prints its wall time and peak resident memory (what docs/EXPERIMENTS.md's numbers come from)."""
    start = time.perf_counter()
    try:
        main()
        print(f"{Path(sys.argv[0]).stem}: {time.perf_counter() - start:.0f} s, peak memory {peak_memory_gb():.1f} GB")
    except StepError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished records are kept; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except Stopped as stop:
        print(f"stopped at the {stop}: finished records are kept; run the same command again to go on",
              file=sys.stderr)
        sys.exit(1)


def peak_memory_gb() -> float:
    """This process's peak resident memory in GB (0 where the OS does not say: Windows)."""
    try:
        import resource
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 1024 ** (3 if sys.platform == "darwin" else 2)


# Whole-number settings that may be 0 (not negative); every other one is a count or a size and must be at least 1
# (0 conversations, a batch of 0 or a cap of 0 tokens would fail deep inside a step). A split may have no tasks or
# personas: an evaluation-only run has test pairs alone.
MAY_BE_ZERO = {"seed", "iteration", "iterations", "gold_retries", "batch_tokens", "n_tasks", "n_personas"}


def parse_args(*classes):
    """Build the step's --help from its dataclasses (each field's `help` metadata) and parse argv into one of
    each: the step's own Args, then the settings it shares with other steps (as TRL parses ModelConfig).
    A flag must be spelled out in full (no prefixes: `--n_task` is not taken for `--n_tasks`); an unknown flag or
    a count below 1 is a StepError naming it."""
    parser = HfArgumentParser(classes, allow_abbrev=False)
    for action in parser._actions:  # a boolean flag's --no_<name> twin: its own help, not the flag's
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            action.help, action.default = f"turn --{action.dest} off", argparse.SUPPRESS
    *parsed, unknown = parser.parse_args_into_dataclasses(return_remaining_strings=True)
    if unknown:
        raise StepError(f"unknown argument {unknown[0]!r} ({Path(sys.argv[0]).name} --help lists the flags)")
    for part in parsed:
        for name, value in dataclasses.asdict(part).items():
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                continue
            lowest = 0 if name in MAY_BE_ZERO else 1
            if any(v < lowest for v in values):
                raise StepError(f"--{name} must be at least {lowest} (got {' '.join(map(str, values))})")
    return parsed


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stable_hash(*parts) -> int:
    """A seed derived from its parts that is the same in every process (Python's hash() is not)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return int(digest[:8], 16)


def provenance() -> dict:
    """Where a result comes from: the code's commit (and whether the tree had uncommitted changes), the
    machine and the library versions; 05_eval.py writes it into metrics.json, and results tables cite it."""
    import platform
    import subprocess

    root = Path(__file__).resolve().parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"commit": git("rev-parse", "--short=10", "HEAD") or "unknown",
            "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
            "machine": f"{cpu}, {os.cpu_count()} cores" + (f", {gpu}" if gpu else ""),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


# Settings that change how fast a step runs, how much memory it takes, or where its files go, but not what it
# computes: a rerun may change them freely. Every other setting is compared with the one recorded (check_rerun).
NOT_RESULT_SETTINGS = {
    "run_dir", "out", "cache_dir",   # where outputs and caches go (the record lies beside the outputs)
    "batch_size", "batch_tokens",    # rows computed together (bf16 rounding aside); 04's batch_size counts: it
    "chunk_size",                    #   is its training batch. chunk_size: 03's records saved together
    "save_steps",                    # how often 04 saves a checkpoint to resume from
    "baseline_dir", "ablation_dirs", # 05: whose m0 to copy, which ablation runs to report beside this one
    "overwrite",
}


def check_rerun(record: Path, outputs: list, overwrite: bool, *parts, counted=(), prompts=()):
    """Before a step works: compare its settings (its parsed dataclasses) with those it recorded in `record`
    (args_<step>.json) when its outputs were made. Outputs made with other settings must not be mixed with new
    ones or silently reused: if any output (or its partial file) exists and a setting that can change a result
    differs, stop with a StepError naming each (old -> new), changing nothing. With --overwrite, the outputs are
    removed instead, to be made again. counted: names in NOT_RESULT_SETTINGS that do change this step's result.
    prompts: the roles whose prompts the step uses (roles.PROMPTS), compared too; a record without them was made
    before prompts were recorded, under prompts that cannot be known, and counts as changed. Other settings
    missing from an older record are not compared."""
    record = Path(record)
    existing = [Path(p) for p in outputs if Path(p).exists() and Path(p) != record]
    if overwrite:
        for path in existing:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        return
    if not existing or not record.is_file():
        return
    before = json.loads(record.read_text(encoding="utf-8"))
    now = json.loads(json.dumps({k: v for part in parts for k, v in dataclasses.asdict(part).items()}))
    ignored = NOT_RESULT_SETTINGS - set(counted)
    changed = [f"--{k} {before[k]!r} -> {now[k]!r}" for k in now
               if k in before and k not in ignored and before[k] != now[k]]
    recorded = before.get("prompts", {})
    changed += [f"roles.py's {role} prompts {recorded.get(role, 'unrecorded')} -> {PROMPTS[role]}" for role in prompts
                if recorded.get(role) != PROMPTS[role]]
    if changed:
        raise StepError(f"{record.parent}: made with other settings ({', '.join(changed)}; recorded in "
                        f"{record.name}); pass --overwrite to redo this step, or use another --run_dir")


def recorded_setting(record: Path, name: str):
    """A setting an earlier step recorded in its args_<step>.json, for a later step that needs the same value
    (03 selects from the N conversations 02 simulated): one source of truth, not a flag to keep in step."""
    if not Path(record).is_file():
        raise StepError(f"{record}: not found (the step that writes it has not run here); pass --{name} to say it")
    recorded = json.loads(Path(record).read_text(encoding="utf-8"))
    if name not in recorded:
        raise StepError(f"{record}: no '{name}' recorded; pass --{name} to say it")
    return recorded[name]


def record_args(path: Path, *parts, prompts=()):
    """Write the arguments a step ran with beside its outputs (args_<step>.json): every flag of its
    dataclasses (parse_args) in one object, as a user would pass them; then the hashes of the prompts of the
    roles it uses (`prompts`, roles.PROMPTS)."""
    record = {k: v for part in parts for k, v in dataclasses.asdict(part).items()}
    if prompts:
        record["prompts"] = {role: PROMPTS[role] for role in prompts}
    write_json_atomic(path, record)


# --- Record types -------------------------------------------------------------------------------------
# Every hand-off between steps is a JSONL file of one record type; README.md documents each field.
# Reading checks that each required field is present with the right type, and reports file:line.
SCHEMAS = {
    "task": {"task_id": str, "split": str, "text": str},
    "persona": {"persona_id": str, "split": str, "name": str, "bio": str},
    "gold": {"task_id": str, "persona_id": str, "split": str, "gold": str},
    "conversation": {"task_id": str, "persona_id": str, "conv_id": int, "iteration": int,
                     "n_turns": int, "messages": list},
    "score": {"task_id": str, "persona_id": str, "conv_id": int, "iteration": int, "logprob": float},
    "sft": {"task_id": str, "persona_id": str, "conv_id": int, "iteration": int, "messages": list},
    "answer": {"task_id": str, "persona_id": str, "conv_id": int, "answer": str},
    "control": {"task_id": str, "persona_id": str, "control": str, "logprob": float},
    "judgment": {"task_id": str, "persona_id": str, "conv_id": int, "order": str, "judge": str, "output": str},
}
KEYS = {
    "task": ("task_id",),
    "persona": ("persona_id",),
    "gold": ("task_id", "persona_id"),
    "conversation": ("task_id", "persona_id", "conv_id"),
    "score": ("task_id", "persona_id", "conv_id"),
    "sft": ("task_id", "persona_id", "conv_id"),
    "answer": ("task_id", "persona_id", "conv_id"),
    "control": ("task_id", "persona_id", "control"),
    "judgment": ("task_id", "persona_id", "conv_id", "order"),
}


def record_key(kind: str, record: dict) -> tuple:
    return tuple(record[k] for k in KEYS[kind])


def check_messages(messages, where: str):
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                               and isinstance(m.get("content"), str) for m in messages):
        raise StepError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")


def check_record(kind: str, record, where: str):
    if not isinstance(record, dict):
        raise StepError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field, expected in SCHEMAS[kind].items():
        value = record.get(field)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if expected is float \
            else isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if not ok:
            raise StepError(f"{where}: {kind} record needs field '{field}' of type {expected.__name__}"
                            f" (got {value!r:.60})")
    if "messages" in SCHEMAS[kind]:
        check_messages(record["messages"], where)


def read_jsonl(path, kind: str | None = None, unique: bool = True, allow_torn_tail: bool = False,
               line_numbers: bool = False) -> list:
    """Read a JSONL file; check each record against its schema and (optionally) that keys are unique.

    allow_torn_tail: a crash while appending can leave the last line half-written (no newline);
    for files that are being appended to (`*.partial.jsonl`) that line is dropped and rewritten later.
    line_numbers: return (line number, record) pairs, for later checks that must name the line.
    """
    path = Path(path)
    if not path.is_file():
        raise StepError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    torn = lines.pop()  # text after the last newline: '' for a complete file
    records, seen = [], {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise StepError(f"{path}:{number}: malformed JSON ({error.msg})") from None
        if kind is not None:
            check_record(kind, record, f"{path}:{number}")
            if unique:
                key = record_key(kind, record)
                if key in seen:
                    raise StepError(f"{path}:{number}: duplicate id {key} (first seen on line {seen[key]})")
                seen[key] = number
        records.append((number, record) if line_numbers else record)
    if torn.strip() and not allow_torn_tail:
        raise StepError(f"{path}:{len(lines) + 1}: last line is incomplete (no newline); the file was cut off")
    return records


def read_partial(path, kind: str) -> list[dict]:
    """Records already appended to a partial output file (empty if none); a torn last line is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    records = read_jsonl(path, kind, allow_torn_tail=True)
    # Rewrite without the torn tail so that later appends start on a fresh line.
    if not path.read_text(encoding="utf-8").endswith("\n") and path.stat().st_size:
        write_jsonl_atomic(path, records)
    return records


def append_jsonl(path, records):
    """Append records and flush them to disk at once, so a crash loses at most the call in flight."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path, text: str):
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path, text: str):
    _write_atomic(path, text)


def write_jsonl_atomic(path, records):
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_json_atomic(path, value):
    _write_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def finish_partial(partial: Path, final: Path, kind: str, order: list[tuple]):
    """Turn a finished partial file into the final output: check completeness, sort, write atomically."""
    records = {record_key(kind, r): r for r in read_jsonl(partial, kind)}
    missing = [key for key in order if key not in records]
    if missing:
        raise StepError(f"{partial}: {len(missing)} records missing (first {missing[0]}); run the step again")
    write_jsonl_atomic(final, [records[key] for key in order])
    partial.unlink()


def load_pairs(run_dir, split: str | None = None, *, usable_only: bool) -> list[dict]:
    """The (task, persona) pairs of a split, joined with their texts and gold response, checked.

    Each pair: task_id, persona_id, split, task (text), name, bio, gold. Sorted by ids. usable_only: leave out
    the pairs whose gold answer 01_generate.py flagged (refusal, empty, loop), which have no target to score.
    """
    data = Path(run_dir) / "data"
    if not (data / "gold.jsonl").exists():
        raise StepError(f"{data / 'gold.jsonl'}: file not found; run 01_generate.py --run_dir {run_dir} first")
    tasks = {t["task_id"]: t for t in read_jsonl(data / "tasks.jsonl", "task")}
    personas = {p["persona_id"]: p for p in read_jsonl(data / "personas.jsonl", "persona")}
    pairs = []
    for number, g in read_jsonl(data / "gold.jsonl", "gold", line_numbers=True):
        for kind, key, table in (("task", "task_id", tasks), ("persona", "persona_id", personas)):
            if g[key] not in table:
                raise StepError(f"{data / 'gold.jsonl'}:{number}: names {kind} {g[key]!r}, "
                                f"which is not in {kind}s.jsonl")
        if usable_only and g.get("flag"):  # a refused, empty or looping gold answer 01 could not replace
            continue
        if split is None or g["split"] == split:
            task, persona = tasks[g["task_id"]], personas[g["persona_id"]]
            pairs.append({"task_id": g["task_id"], "persona_id": g["persona_id"], "split": g["split"],
                          "task": task["text"], "name": persona["name"], "bio": persona["bio"],
                          "gold": g["gold"]})
    if not pairs:
        raise StepError(f"{data / 'gold.jsonl'}: no usable pairs in split {split!r} (pairs whose gold answer "
                        "01_generate.py flagged as refusal, empty or a loop are left out)")
    return sorted(pairs, key=lambda p: (p["task_id"], p["persona_id"]))


def pending_chunks(items: list, keys: list, done: set, size: int, desc: str):
    """Cut items into fixed chunks (the same cut on every run) and yield (index, items, keys) for each
    chunk with a key not yet in `done`, with a progress bar over all chunks."""
    from tqdm.auto import tqdm

    for index in tqdm(range(0, len(items), size), desc=desc):
        chunk_keys = keys[index:index + size]
        if not all(k in done for k in chunk_keys):
            yield index // size, items[index:index + size], chunk_keys


def resumable(final: Path, kind: str, items: list, keys: list, size: int, desc: str, make_records):
    """Compute the records of `final` chunk by chunk, appending each chunk to <final>.partial.jsonl as
    it finishes; on a rerun, chunks already saved are skipped. make_records(index, chunk, chunk_keys)
    returns the chunk's records. When all are there, the final file is written atomically (sorted like
    `keys`) and the partial file removed. If `final` exists, it is read and nothing is computed.
    """
    final = Path(final)
    if final.suffix != ".jsonl":
        raise ValueError(f"{final}: resumable outputs are .jsonl files")
    if not final.exists():
        partial = final.with_name(final.name.replace(".jsonl", ".partial.jsonl"))
        done = {record_key(kind, r) for r in read_partial(partial, kind)}
        for index, chunk, chunk_keys in pending_chunks(items, keys, done, size, desc):
            records = [r for r in make_records(index, chunk, chunk_keys) if record_key(kind, r) not in done]
            append_jsonl(partial, records)
        finish_partial(partial, final, kind, keys)
    return read_jsonl(final, kind)
