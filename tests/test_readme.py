"""README.md is kept true where it documents the code: its record table lists exactly the fields each record
type is checked for on read (utils.SCHEMAS), and its commands run as written."""

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from utils import SCHEMAS

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def table_rows(heading: str) -> list[list[str]]:
    """The cells of the rows of the first table under a README heading."""
    section = README.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_the_record_table_lists_what_each_record_is_checked_for():
    documented = {}
    for _, kind, checked, _ in table_rows("## Record types"):
        # The fields named outside parentheses (not what parentheses say).
        documented[kind.strip("`")] = re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", checked))
    assert set(documented) == set(SCHEMAS)
    for kind, fields in SCHEMAS.items():
        assert documented[kind] == list(fields), kind


# --- The README's commands run as written ----------------------------------------------------------------
# Each command of its bash blocks (and of the steps' docstrings) is checked as far as it can be without running
# models: every flag parses (utils.parse_args: no unknown or abbreviated flag, no count below 1), a step after 01
# names a run folder an earlier command made, 01's sizes fit its task file, and run_all.sh, run with a stand-in
# `python` that records its calls, accepts its arguments and passes each step flags that parse.

STEP_SCRIPTS = {"01_generate", "02_simulate", "03_select", "04_train", "05_eval", "toy_base"}


def shell_commands(text: str) -> list[tuple[dict, list[str]]]:
    """(environment assignments, argv) of each simple command in `text`: continuation lines joined, comments
    dropped, `;` / `&&` lists and one-line for loops split (a loop's variable taken as 1)."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line.replace("$s", "1").replace("$PWD", str(REPO)), comments=True)
        command = []
        for token in tokens + [";"]:
            if token.rstrip(";") and not (token == "do" and not command):
                command.append(token.rstrip(";"))
            if token.endswith(";") or token == "&&":
                if command and command[-1] == "&&":
                    command.pop()
                env = {}
                while command and re.fullmatch(r"[A-Z_]+=.*", command[0]):
                    name, _, value = command.pop(0).partition("=")
                    env[name] = value
                if command and command[0] not in ("for", "done"):
                    commands.append((env, command))
                command = []
    return commands


def readme_commands() -> list[tuple[dict, list[str]]]:
    return [c for block in re.findall(r"```bash\n(.*?)```", README, re.S) for c in shell_commands(block)]


def parse_step(script: str, argv: list[str]):
    """The step's parsed settings (its Args first), as its main() parses them; a StepError if they do not parse."""
    from models import ModelSettings
    from utils import parse_args

    step = importlib.import_module(script)
    shared = {"02_simulate": (step.__dict__.get("SimulationSettings"), ModelSettings),
              "05_eval": (step.__dict__.get("SimulationSettings"), ModelSettings), "toy_base": ()}
    old, sys.argv = sys.argv, [f"{script}.py", *argv]
    try:
        return parse_args(step.Args, *shared.get(script, (ModelSettings,)))
    finally:
        sys.argv = old


def check_step(script: str, argv: list[str]):
    args = parse_step(script, argv)[0]
    if script == "01_generate" and not args.tasks.startswith("hf:") and not args.from_original:
        available = len([t for t in (REPO / args.tasks).read_text().splitlines() if t.strip()])
        assert sum(args.n_tasks) <= available, f"{argv}: --n_tasks asks for more than {args.tasks}'s {available}"
    return args


def run_all_calls(tmp_path, env: dict, argv: list[str]) -> list[list[str]]:
    """The step commands `bash run_all.sh <argv>` runs (with `env`), recorded by a stand-in python. Its run folder
    is moved under tmp_path (the script works in the repository), with the files --ablations copies from it."""
    bin_dir, log, run = tmp_path / "bin", tmp_path / "calls.jsonl", tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    bin_dir.mkdir(exist_ok=True)
    log.unlink(missing_ok=True)
    for name in ("conversations.jsonl", "args_02_simulate.json", "scores.jsonl"):
        (run / "iter0").mkdir(parents=True, exist_ok=True)
        (run / "iter0" / name).write_text("")
    env = dict(env, RUN_DIR=str(run))
    (bin_dir / "python").write_text(f"#!{sys.executable}\nimport json, sys\nwith open({str(log)!r}, 'a') as f:\n"
                                    "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    (bin_dir / "python").chmod(0o755)
    environment = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", CACHE_DIR=str(tmp_path / "c"))
    done = subprocess.run(["bash", *argv], cwd=REPO, env=dict(environment, **env), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, (argv, done.stderr)
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_the_readme_commands_run_as_written(tmp_path):
    made, checked = set(), 0
    for env, argv in readme_commands():
        if argv[:2] == ["bash", "run_all.sh"]:
            preset = argv[2] if len(argv) > 2 else "toy"
            made.add(env.get("RUN_DIR", f"runs/{preset}"))
            for script, *step_argv in run_all_calls(tmp_path, env, argv[1:]):
                check_step(script.removesuffix(".py"), step_argv)
            checked += 1
        elif argv[0] == "python" and argv[1].removesuffix(".py") in STEP_SCRIPTS:
            script = argv[1].removesuffix(".py")
            args = check_step(script, argv[2:])
            if script == "01_generate":
                made.add(args.run_dir)
            elif script != "toy_base":
                assert args.run_dir in made, f"{' '.join(argv)}: no earlier command makes {args.run_dir}"
            checked += 1
    assert checked >= 7  # the quickstart, results and server examples


@pytest.mark.parametrize("module", sorted(STEP_SCRIPTS) + ["human"])
def test_the_commands_in_docstrings_parse(module):
    doc = importlib.import_module(module).__doc__.replace("\\\n", " ")
    lines = "\n".join(line for line in doc.splitlines() if line.strip().startswith(("python ", "mkdir ")))
    commands = [argv for _, argv in shell_commands(lines) if argv[0] == "python" and argv[1].endswith(".py")]
    assert commands, module
    for argv in commands:
        check_step(argv[1].removesuffix(".py"), argv[2:])
