"""`01_generate.py --from_original`: the paper's own test split, read from the original release's four JSON files
(a folder, or a URL prefix fetched once), as the run's test pairs; every malformed file gets one error naming the
file and the entry, and nothing is written.

tests/original/ is a stand-in in the release's layout (3 tasks, 2 personas, our own wording)."""

import functools
import http.server
import importlib
import json
import shutil
import sys
import threading
from pathlib import Path
from unittest import mock

import pytest

from original import FILES, parse_original, read_original
from test_bad_inputs import fails
from utils import StepError, load_pairs, read_jsonl

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "original"


def generate(run, source, cache) -> Path:
    """01_generate.py --from_original, run in this process (the step's main() with its command line); its data
    folder. The command itself, as a subprocess, is test_the_step_stops_with_one_error_and_writes_nothing's."""
    argv = ["01_generate.py", "--run_dir", str(run), "--from_original", str(source), "--cache_dir", str(cache)]
    with mock.patch.object(sys, "argv", argv):
        importlib.import_module("01_generate").main()
    return Path(run) / "data"


def test_the_release_becomes_the_runs_test_pairs(tmp_path, capsys):
    data = generate(tmp_path / "run", FIXTURE, tmp_path / "cache")
    assert "3 tasks x 2 personas = 6 test pairs" in capsys.readouterr().out
    tasks = read_jsonl(data / "tasks.jsonl", "task")
    personas = read_jsonl(data / "personas.jsonl", "persona")
    original = {name: json.loads((FIXTURE / relative).read_text()) for name, relative in FILES.items()}
    # Ids keep the release's indices; every record is a test record and says where it came from.
    assert [(t["task_id"], t["text"], t["source"]) for t in tasks] == [
        (f"t{i:04d}", text, f"prompts/star-gate/test.json[{i}]") for i, text in enumerate(original["tasks"])]
    assert [(p["persona_id"], p["name"], p["bio"]) for p in personas] == [
        ("p0000", "Tove", original["personas"][0]), ("p0001", "Idris", original["personas"][1])]
    pairs = load_pairs(tmp_path / "run", "test", usable_only=True)  # what 05 evaluates: every task x persona
    assert len(pairs) == 6 and all(p["split"] == "test" for p in tasks + personas + pairs)
    assert {(p["task_id"], p["persona_id"]): p["gold"] for p in pairs}[("t0002", "p0001")] == \
        original["gold"]["prompt-2 persona-1"][0]
    recorded = json.loads((data / "original.json").read_text())
    assert recorded["from_original"] == str(FIXTURE) and set(recorded["sha256"]) == set(FILES.values())
    assert json.loads((data / "args_01_generate.json").read_text())["from_original"] == str(FIXTURE)
    assert not (tmp_path / "cache" / "oracle_calls.jsonl").exists()  # no Oracle call


def test_a_run_holding_other_data_is_never_reused(tmp_path, capsys):
    generate(tmp_path / "run", FIXTURE, tmp_path / "cache")
    generate(tmp_path / "run", FIXTURE, tmp_path / "cache")  # the same data: nothing to do
    assert "is complete; nothing to do" in capsys.readouterr().out
    with pytest.raises(StepError, match="made with other settings \\(--from_original '.*tests/original' -> "):
        generate(tmp_path / "run", tmp_path / "elsewhere", tmp_path / "cache")
    argv = ["01_generate.py", "--run_dir", str(tmp_path / "run")]  # generating into it instead
    refused = pytest.raises(StepError, match=r"--from_original '.*tests/original' -> ''")
    with mock.patch.object(sys, "argv", argv), refused:
        importlib.import_module("01_generate").main()


def broken(tmp_path, name, change) -> Path:
    """A copy of the fixture whose file `name` is replaced by change(its parsed JSON) (a string: written as it is;
    None: the file removed)."""
    folder = tmp_path / "release"
    shutil.copytree(FIXTURE, folder)
    path = folder / FILES[name]
    value = change(json.loads(path.read_text()))
    if value is None:
        path.unlink()
    else:
        path.write_text(value if isinstance(value, str) else json.dumps(value))
    return folder


def drop(key):
    return lambda gold: {k: v for k, v in gold.items() if k != key}


MALFORMED = {  # variant: (file, change, what the error names)
    "missing file": ("names", lambda _: None, "personas/star-gate/test_NAMES.json: file not found"),
    "not JSON": ("gold", lambda _: '{"prompt-0 persona-0": ["Hi"],', "gold-responses/star-gate/test.json: not JSON"),
    "key naming no task": ("gold", lambda g: g | {"prompt-3 persona-0": ["An answer."]},
                           "test.json: key 'prompt-3 persona-0' names task 3, but prompts/star-gate/test.json has 3"),
    "key naming no persona": ("gold", lambda g: g | {"prompt-0 persona-2": ["An answer."]},
                              "test.json: key 'prompt-0 persona-2' names persona 2"),
    "key in another form": ("gold", lambda g: g | {"prompt 0, persona 1": ["An answer."]},
                            "test.json: key 'prompt 0, persona 1': expected 'prompt-<i> persona-<j>'"),
    "names list of the wrong length": ("names", lambda names: names[:1],
                                       "test_NAMES.json: 1 names for 2 personas in personas/star-gate/test.json"),
    "persona with no name": ("names", lambda names: [names[0], "  "],
                             "test_NAMES.json: entry 1: persona 1 has no name"),
    "persona with no description": ("personas", lambda bios: [bios[0], ""], "personas/star-gate/test.json: entry 1"),
    "empty gold": ("gold", lambda g: g | {"prompt-1 persona-0": [" "]},
                   "test.json: key 'prompt-1 persona-0': the gold response is empty"),
    "two gold responses": ("gold", lambda g: g | {"prompt-1 persona-0": ["One.", "Two."]},
                           "test.json: key 'prompt-1 persona-0': expected a list holding one gold response"),
    "a pair without gold": ("gold", drop("prompt-2 persona-1"),
                            "test.json: no gold response for 1 of the 6 pairs (first: 'prompt-2 persona-1')"),
    "a task that is no string": ("tasks", lambda tasks: tasks[:2] + [{"text": "x"}],
                                 "prompts/star-gate/test.json: entry 2: expected a non-empty task string"),
}


@pytest.mark.parametrize("variant", sorted(MALFORMED))
def test_each_malformed_file_is_named_with_its_entry(tmp_path, variant):
    name, change, expected = MALFORMED[variant]
    folder = broken(tmp_path, name, change)
    with pytest.raises(StepError) as error:
        texts, _ = read_original(str(folder), tmp_path / "cache")
        parse_original(texts, str(folder))
    assert str(error.value).startswith(str(folder)) and expected in str(error.value), str(error.value)


def test_the_step_stops_with_one_error_and_writes_nothing(tmp_path):
    name, change, expected = MALFORMED["persona with no name"]
    folder = broken(tmp_path, name, change)
    fails("01_generate.py", "--run_dir", tmp_path / "run", "--from_original", folder, "--cache_dir", tmp_path / "cache",
          folder=tmp_path, expected=expected)


# --- A URL prefix: the four files fetched once, checked, cached ----------------------------------------------------

@pytest.fixture
def server(tmp_path, monkeypatch):
    """An HTTP server on 127.0.0.1 for a folder holding the fixture (good/) and a copy with a bad gold file (bad/):
    (its URL, the paths asked for)."""
    root = tmp_path / "served"
    shutil.copytree(FIXTURE, root / "good")
    shutil.copytree(broken(tmp_path, "gold", lambda g: g | {"prompt-0 persona-0": []}), root / "bad")
    asked = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    for name in NO_PROXY:  # a proxy configured for the registries must not stand between us and 127.0.0.1
        monkeypatch.setenv(name, "127.0.0.1")
    yield f"http://127.0.0.1:{httpd.server_address[1]}", asked
    httpd.shutdown()
    httpd.server_close()


NO_PROXY = ("no_proxy", "NO_PROXY")


def test_a_url_prefix_is_fetched_once_and_nothing_else(tmp_path, server):
    url, asked = server
    generate(tmp_path / "run1", f"{url}/good/", tmp_path / "cache")
    assert sorted(asked) == sorted(f"/good/{relative}" for relative in FILES.values())
    generate(tmp_path / "run2", f"{url}/good/", tmp_path / "cache")  # another run, the same cache
    assert len(asked) == 4  # nothing fetched again
    for name in ("tasks.jsonl", "personas.jsonl", "gold.jsonl"):
        assert (tmp_path / "run1" / "data" / name).read_text() == (tmp_path / "run2" / "data" / name).read_text()
    assert read_jsonl(tmp_path / "run1" / "data" / "gold.jsonl", "gold") == \
        read_jsonl(generate(tmp_path / "run3", FIXTURE, tmp_path / "cache") / "gold.jsonl", "gold")  # as from a folder


def test_a_bad_download_is_named_by_its_url_and_never_cached(tmp_path, server):
    url, _ = server
    with pytest.raises(StepError, match=f"{url}/nope/prompts/star-gate/test.json: the server answered 404"):
        read_original(f"{url}/nope", tmp_path / "cache")
    with pytest.raises(StepError, match=f"{url}/bad/gold-responses/star-gate/test.json: key 'prompt-0 persona-0': "
                                        "expected a list holding one gold response"):
        read_original(f"{url}/bad", tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
