"""Plumbing for 01_generate.py --from_original: the original release's test split, read as this project's records.

The original STaR-GATE release (github.com/scandukuri/assistant-gate, MIT licence, data under star-gate-hgx/)
publishes the paper's test split as four JSON files, relative to one folder:

    prompts/star-gate/test.json            a list of task strings
    personas/star-gate/test.json           a list of persona descriptions (third person: "Meet REECE. ...")
    personas/star-gate/test_NAMES.json     a list of first names, one per persona, in the same order
    gold-responses/star-gate/test.json     {"prompt-<i> persona-<j>": [the gold response]} for every pair

The folder may also be a URL prefix the user gives (e.g. the repository's raw files): exactly these four files are
fetched, once, checked, and kept in <cache_dir>/original/; nothing else is ever fetched. Every entry is checked
before anything is written: a problem is one StepError naming the file and the entry.
"""

import hashlib
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

from utils import StepError, write_text_atomic

FILES = {"tasks": "prompts/star-gate/test.json", "personas": "personas/star-gate/test.json",
         "names": "personas/star-gate/test_NAMES.json", "gold": "gold-responses/star-gate/test.json"}
GOLD_KEY = re.compile(r"prompt-(\d+) persona-(\d+)")


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def where(source: str, name: str) -> str:
    """How an error names one of the four files: its path in the folder, or its URL."""
    return f"{source.rstrip('/')}/{FILES[name]}"


def cache_folder(source: str, cache_dir) -> Path:
    """Where the files fetched from a URL prefix are kept: one folder per prefix."""
    return Path(cache_dir) / "original" / hashlib.sha256(source.rstrip("/").encode()).hexdigest()[:16]


def read_original(source: str, cache_dir) -> tuple[dict, dict]:
    """The four files' texts {name: text}, and their sha256 {relative path: digest} (what a run records).

    A folder is read as it is. A URL prefix is served from the cache when all four files are there; otherwise
    the four are fetched, checked (parse_original) and only then cached, so a bad download is never kept."""
    if not is_url(source):
        texts = {}
        for name, relative in FILES.items():
            path = Path(source) / relative
            if not path.is_file():
                raise StepError(f"{path}: file not found (--from_original expects the original release's layout: "
                                + ", ".join(FILES.values()) + ")")
            texts[name] = path.read_text(encoding="utf-8")
    else:
        cached = cache_folder(source, cache_dir)
        if all((cached / relative).is_file() for relative in FILES.values()):
            texts = {name: (cached / relative).read_text(encoding="utf-8") for name, relative in FILES.items()}
        else:
            texts = {name: fetch(where(source, name)) for name in FILES}
            parse_original(texts, source)
            for name, relative in FILES.items():
                write_text_atomic(cached / relative, texts[name])
            write_text_atomic(cached / "source.txt", source + "\n")
    digests = {FILES[name]: hashlib.sha256(text.encode()).hexdigest() for name, text in texts.items()}
    return texts, digests


def fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=60) as reply:
            return reply.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        raise StepError(f"{url}: the server answered {error.code} ({error.reason}); is the URL prefix right?") from None
    except (urllib.error.URLError, TimeoutError) as error:
        raise StepError(f"{url}: cannot fetch it ({getattr(error, 'reason', error)})") from None
    except UnicodeDecodeError:
        raise StepError(f"{url}: not UTF-8 text") from None


def load_json(text: str, place: str):
    """JSON with no key given twice (the gold file's keys name pairs: a repeated one would hide an answer)."""
    def no_repeats(items):
        keys = [k for k, _ in items]
        repeated = next((k for k in keys if keys.count(k) > 1), None)
        if repeated is not None:
            raise StepError(f"{place}: key {repeated!r} appears twice")
        return dict(items)
    try:
        return json.loads(text, object_pairs_hook=no_repeats)
    except json.JSONDecodeError as error:
        raise StepError(f"{place}: not JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None


def string_list(text: str, place: str, what: str) -> list[str]:
    """A non-empty JSON list of non-empty strings, stripped; an entry that is not one is named by its index."""
    values = load_json(text, place)
    if not isinstance(values, list) or not values:
        raise StepError(f"{place}: expected a non-empty list of {what}s")
    for index, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise StepError(f"{place}: entry {index}: expected a non-empty {what} string (got {value!r:.60})")
    return [value.strip() for value in values]


def parse_original(texts: dict, source: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(tasks, personas, gold) records of the test split, as 01_generate.py writes them (utils.SCHEMAS).

    Ids keep the original's indices (task i is t000i, persona j p000j), so they are the same in every run; each
    record says where in the release it comes from. Every (task, persona) pair needs exactly one gold response."""
    tasks = string_list(texts["tasks"], where(source, "tasks"), "task")
    bios = string_list(texts["personas"], where(source, "personas"), "persona description")
    names_at = where(source, "names")
    names = load_json(texts["names"], names_at)
    if not isinstance(names, list) or len(names) != len(bios):
        count = f"{len(names)} names" if isinstance(names, list) else "not a list"
        raise StepError(f"{names_at}: {count} for {len(bios)} personas in {FILES['personas']} "
                        "(one first name per persona, in the same order)")
    for j, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise StepError(f"{names_at}: entry {j}: persona {j} has no name (got {name!r:.60})")

    gold_at = where(source, "gold")
    answers = load_json(texts["gold"], gold_at)
    if not isinstance(answers, dict):
        raise StepError(f"{gold_at}: expected an object {{\"prompt-<i> persona-<j>\": [gold response]}}")
    pairs = {}
    for key, value in answers.items():
        match = GOLD_KEY.fullmatch(key)
        if match is None:
            raise StepError(f"{gold_at}: key {key!r}: expected 'prompt-<i> persona-<j>'")
        i, j = int(match[1]), int(match[2])
        if i >= len(tasks):
            raise StepError(f"{gold_at}: key {key!r} names task {i}, but {FILES['tasks']} has {len(tasks)} tasks")
        if j >= len(bios):
            raise StepError(f"{gold_at}: key {key!r} names persona {j}, but {FILES['personas']} has {len(bios)}")
        if not isinstance(value, list) or len(value) != 1:
            raise StepError(f"{gold_at}: key {key!r}: expected a list holding one gold response "
                            f"(got {value!r:.60})")
        if not isinstance(value[0], str) or not value[0].strip():
            raise StepError(f"{gold_at}: key {key!r}: the gold response is empty")
        pairs[(i, j)] = (key, value[0].strip())
    missing = [(i, j) for i in range(len(tasks)) for j in range(len(bios)) if (i, j) not in pairs]
    if missing:
        raise StepError(f"{gold_at}: no gold response for {len(missing)} of the {len(tasks) * len(bios)} pairs "
                        f"(first: 'prompt-{missing[0][0]} persona-{missing[0][1]}')")

    task_records = [{"task_id": f"t{i:04d}", "split": "test", "text": text, "source": f"{FILES['tasks']}[{i}]"}
                    for i, text in enumerate(tasks)]
    persona_records = [{"persona_id": f"p{j:04d}", "split": "test", "name": name.strip(), "bio": bio,
                        "source": f"{FILES['personas']}[{j}]"} for j, (name, bio) in enumerate(zip(names, bios))]
    gold = [{"task_id": f"t{i:04d}", "persona_id": f"p{j:04d}", "split": "test", "gold": pairs[(i, j)][1],
             "source": f'{FILES["gold"]}["{pairs[(i, j)][0]}"]'} for i, j in sorted(pairs)]
    return task_records, persona_records, gold
