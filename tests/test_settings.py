"""Settings shared between steps are defined once and cannot drift; imports run one way.

A user relies on this: evaluation (05) must simulate conversations exactly as training (02) did, every step
must load models the same way, and reading roles.py (the prompts) must not need the model code."""

import ast
import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from models import ModelSettings
from stargate import SimulationSettings

REPO = Path(__file__).resolve().parents[1]

# What each step's main() parses: its own Args, then the settings it shares with other steps.
SHARED = {"01_generate": (ModelSettings,), "02_simulate": (SimulationSettings, ModelSettings),
          "03_select": (ModelSettings,), "04_train": (ModelSettings,),
          "05_eval": (SimulationSettings, ModelSettings)}


def parser(step) -> HfArgumentParser:
    return HfArgumentParser((importlib.import_module(step).Args, *SHARED[step]))


@pytest.mark.parametrize("step", sorted(SHARED))
def test_every_step_can_print_its_help(step):
    """--help comes from the step's dataclasses through argparse, which %-formats every help text: a bare
    '%' in one (05's "95% intervals" was) turns --help into a traceback."""
    text = parser(step).format_help()
    assert "--run_dir" in text and "--seed" in text and "model settings (the same in every step)" in text


def dry_run(tmp_path, preset, **overrides) -> list[list[str]]:
    """The step commands `bash run_all.sh <preset>` runs, recorded by a stand-in `python` that runs nothing;
    overrides: environment variables that replace the preset's values."""
    bin_dir, log = tmp_path / "bin", tmp_path / f"{preset}.jsonl"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "python"
    shim.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"with open({str(log)!r}, 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RUN_DIR=str(tmp_path / preset),
               CACHE_DIR=str(tmp_path / "cache"), **overrides)
    done = subprocess.run(["bash", "run_all.sh", preset], cwd=REPO, env=env, check=True, capture_output=True,
                          text=True, timeout=60)
    (tmp_path / f"{preset}.out").write_text(done.stdout)
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("preset", ["tiny", "smoke", "toy", "laptop", "paper"])
def test_each_preset_simulates_and_loads_models_alike_in_every_step(tmp_path, preset):
    calls = dry_run(tmp_path, preset)
    if preset == "toy":  # the preset's Q_BASE is built first, and every step then loads it as the Questioner
        (script, *argv), *calls = calls
        base, = HfArgumentParser(importlib.import_module("toy_base").Args).parse_args_into_dataclasses(args=argv)
        assert script == "toy_base.py"
        assert all(c[c.index("--questioner") + 1] == f"hf:{base.out}" for c in calls if "--questioner" in c)
    assert [c[0] for c in calls][:4] == ["01_generate.py", "02_simulate.py", "03_select.py", "04_train.py"]
    assert calls[-1][0] == "05_eval.py"
    simulation, loading = [], []
    for script, *argv in calls:
        step = script.removesuffix(".py")
        args, *shared = parser(step).parse_args_into_dataclasses(args=argv)  # every flag known to the step
        settings = {type(s): s for s in shared}
        loading.append(settings[ModelSettings])
        if SimulationSettings in settings:
            simulation.append((step, settings[SimulationSettings]))
        # A person at the terminal is never a preset's role: a preset must run unattended.
        assert "human" not in [getattr(args, role, None) for role in ("oracle", "questioner", "roleplayer", "judge")]
        # The preset's tasks are there (paper: the hub's).
        if step == "01_generate" and not args.tasks.startswith("hf:"):
            assert sum(args.n_tasks) <= len((REPO / args.tasks).read_text().splitlines()), (preset, args.tasks)
    assert {step for step, _ in simulation} == {"02_simulate", "05_eval"}
    assert all(s == simulation[0][1] for _, s in simulation), simulation  # evaluation simulates as training did
    assert all(m == loading[0] for m in loading), loading


def flag(call, name):
    return call[call.index(name) + 1]


def test_overwrite_reaches_every_step_of_the_run(tmp_path):
    """OVERWRITE=1 redoes the run's steps (not the toy preset's shared base model, not the report-only last 05)."""
    (tmp_path / "plain").mkdir(), (tmp_path / "redo").mkdir()
    plain = dry_run(tmp_path / "plain", "toy")
    redo = dry_run(tmp_path / "redo", "toy", OVERWRITE="1")
    assert not any("--overwrite" in call for call in plain)
    assert [call[0] for call in redo if "--overwrite" in call] == [call[0] for call in redo][1:]  # all but toy_base


def test_the_environment_overrides_a_presets_values(tmp_path):
    """`QUESTIONER=hf:<path> bash run_all.sh laptop`: another 7B model in every role the preset gives the
    Questioner's model (without an API key, all four); the values set replace the preset's, even empty ones."""
    calls = dry_run(tmp_path, "laptop", QUESTIONER="hf:/models/other-7b", N_TASKS="3 3 2", N="2", TRAIN_FLAGS="",
                    OPENAI_API_KEY="")
    roles = [flag(c, f"--{r}") for c in calls for r in ("questioner", "roleplayer", "oracle", "judge") if f"--{r}" in c]
    assert len(roles) == 1 + 4 * 2 + 3 and set(roles) == {"hf:/models/other-7b"}  # 01; 02-04 twice; 05
    assert calls[0][calls[0].index("--n_tasks") + 1:][:3] == ["3", "3", "2"]
    assert all(flag(c, "--n_conversations") == "2" for c in calls if "--n_conversations" in c)  # EVAL_N follows N
    train = next(c for c in calls if c[0] == "04_train.py")
    assert "--batch_size" not in train and flag(train, "--load_in_4bit") == "yes"  # MODEL_FLAGS: the preset's
    said = [line for line in (tmp_path / "laptop.out").read_text().splitlines() if "from the environment" in line]
    assert said == ["from the environment: QUESTIONER=hf:/models/other-7b", "from the environment: N_TASKS=3 3 2",
                    "from the environment: N=2", "from the environment: TRAIN_FLAGS="]  # none changes a run unsaid
    # A role set apart stays apart; the toy preset's base model is built only for its own Questioner.
    calls = dry_run(tmp_path, "toy", QUESTIONER="hf:/models/small", JUDGE="openai:gpt-4o", EVAL_N="1")
    assert calls[0][0] == "01_generate.py" and flag(calls[0], "--oracle") == "scripted:data/toy"
    evaluation = calls[-1]
    assert flag(evaluation, "--questioner") == "hf:/models/small" and flag(evaluation, "--judge") == "openai:gpt-4o"
    assert flag(evaluation, "--roleplayer") == "scripted:data/toy" and flag(evaluation, "--n_conversations") == "1"
    # The released preset's baseline m0 is its Questioner: another one replaces it (the released m1, m2 stay).
    calls = dry_run(tmp_path, "released", QUESTIONER="hf:/models/other-7b", ORIGINAL=str(tmp_path))
    models = calls[-1][calls[-1].index("--models") + 1:calls[-1].index("--roleplayer")]
    assert models == ["m0=hf:/models/other-7b", "m1=hf:scandukuri/mistral-stargate-m1",
                      "m2=hf:scandukuri/mistral-stargate"]


def test_a_served_questioner_asks_and_scores_on_its_server_and_trains_locally(tmp_path):
    """`SERVED_QUESTIONER=openai:... bash run_all.sh paper` (docs/CLUSTER.md): 02, 03 and 05 ask and score on the
    server with the preset's Questioner as --tokenizer; 04 trains that Questioner; the Roleplayer is served."""
    served = "openai:mistralai/Mistral-7B-Instruct-v0.2@http://127.0.0.1:8000/v1"
    calls = dry_run(tmp_path, "paper", SERVED_QUESTIONER=served)
    local = "hf:mistralai/Mistral-7B-Instruct-v0.2"
    for call in calls[1:]:
        on_server = call[0] != "04_train.py"
        assert flag(call, "--questioner") == (served if on_server else local), call
        assert (flag(call, "--tokenizer") if "--tokenizer" in call else None) == (local if on_server else None)
        if "--roleplayer" in call:
            assert flag(call, "--roleplayer") == "openai:mistralai/Mixtral-8x7B-Instruct-v0.1@http://127.0.0.1:8001/v1"
    assert [c[0] for c in calls].count("04_train.py") == 3


def test_args_files_record_every_setting(tmp_path):
    from utils import record_args

    step = importlib.import_module("02_simulate")
    args, sim, model = parser("02_simulate").parse_args_into_dataclasses(
        args=["--run_dir", "r", "--max_turns", "2", "--dtype", "float32"])
    record_args(tmp_path / "args.json", args, sim, model)
    recorded = json.loads((tmp_path / "args.json").read_text())
    assert recorded["run_dir"] == "r" and recorded["max_turns"] == 2 and recorded["dtype"] == "float32"
    # One flat object with every flag, so the run can be repeated from it.
    assert set(recorded) == {f.name for c in (step.Args, SimulationSettings, ModelSettings)
                             for f in dataclasses.fields(c)}


# --- Imports run one way -----------------------------------------------------------------------------------

def test_reading_the_prompts_loads_no_model_code():
    done = subprocess.run([sys.executable, "-c", "import sys, roles; print(sorted({'torch', 'models', 'transformers'}"
                           " & set(sys.modules)))"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules a file imports, wherever the import sits (also inside a function, and by
    importlib.import_module("02_simulate"), as steps import other steps)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(node.args[0].value)
    return found & modules


def test_project_modules_import_each_other_in_no_circle():
    files = {p.stem: p for p in REPO.glob("*.py")}
    graph = {name: project_imports(path, set(files)) for name, path in files.items()}
    assert graph["roles"] == set()  # the prompts stand alone

    def visit(name, path):
        assert name not in path, f"import circle: {' -> '.join(path[path.index(name):] + [name])}"
        for other in graph[name]:
            visit(other, path + [name])

    for name in graph:
        visit(name, [])


def test_a_no_flag_says_what_it_does(monkeypatch, capsys):
    """--no_gradient_checkpointing's help is its own, not a copy of --gradient_checkpointing's."""
    from utils import parse_args

    monkeypatch.setattr(sys, "argv", ["04_train.py", "--help"])
    with pytest.raises(SystemExit):
        parse_args(importlib.import_module("04_train").Args, ModelSettings)
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-gradient-checkpointing turn --gradient_checkpointing off" in text
