"""`bash run_all.sh released`: the authors' released Questioners beside m0 on the paper's own test split, with 05's
protocol and no training. It needs a GPU, the hub and a Judge key, so here its dry run is checked command by command,
and the same path runs end to end at smoke sizes: tests/original (the release's layout) evaluated with
`05_eval.py --models m0=embedded m1=hf:<a trained model>`, the embedded model as Roleplayer and Judge."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TRAIN_QUESTION
from local_models import embedded_model_dir, load_local
from test_settings import dry_run, flag, parser
from utils import read_jsonl

FIXTURE = REPO / "tests" / "original"
RELEASED = {"m0": "hf:mistralai/Mistral-7B-Instruct-v0.2", "m1": "hf:scandukuri/mistral-stargate-m1",
            "m2": "hf:scandukuri/mistral-stargate"}


def printed_commands(tmp_path, **env) -> tuple[list[list[str]], subprocess.CompletedProcess]:
    """The commands `DRY_RUN=1 bash run_all.sh released` prints, each as its argument list."""
    done = subprocess.run(["bash", "run_all.sh", "released"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, DRY_RUN="1", RUN_DIR=str(tmp_path / "released"),
                                   CACHE_DIR=str(tmp_path / "cache"), **env))
    commands = [shlex.split(line)[1:] for line in done.stdout.splitlines() if line.startswith("python ")]
    return commands, done


def test_the_dry_run_prints_the_released_models_on_the_original_test_split(tmp_path):
    url = "https://raw.githubusercontent.com/scandukuri/assistant-gate/main/star-gate-hgx/data"
    commands, done = printed_commands(tmp_path, ORIGINAL=url)
    assert done.returncode == 0, done.stderr
    assert [c[0] for c in commands] == ["01_generate.py", "05_eval.py"]  # data, then evaluation: no training
    data, evaluation = commands
    assert flag(data, "--from_original") == url and "--oracle" not in data
    models = evaluation[evaluation.index("--models") + 1:][:4]
    assert models[:3] == [f"{name}={spec}" for name, spec in RELEASED.items()]  # m0 first: baseline and Q_BASE
    assert models[3].startswith("--")
    paper = dry_run(tmp_path, "paper")[-1]  # the paper preset's 05 command
    for setting in ("--roleplayer", "--judge", "--n_conversations", "--test_pairs", "--batch_tokens"):
        assert flag(evaluation, setting) == flag(paper, setting), setting
    assert "--questioner" not in evaluation and "--iterations" not in evaluation
    parsed = [parser(script.removesuffix(".py")).parse_args_into_dataclasses(args=argv)[0]  # flags the steps know
              for script, *argv in commands]
    assert parsed[1].models == [f"{name}={spec}" for name, spec in RELEASED.items()]
    assert not (tmp_path / "released").exists()  # a dry run writes nothing


def test_the_released_preset_needs_the_original_data(tmp_path):
    commands, done = printed_commands(tmp_path, ORIGINAL="")
    assert done.returncode == 2 and not commands
    assert done.stderr.startswith("error: the released preset reads the original release's test split: set ORIGINAL")


@pytest.fixture(scope="module")
def full_weights_m1(trained, model_cache, tmp_path_factory) -> Path:
    """A fine-tuned model saved with full weights, as the authors released theirs: the embedded model with
    conftest's trained adapter merged in (its first question: 'Do you have any dietary restrictions?')."""
    from peft import PeftModel

    model, tokenizer = load_local("embedded", model_cache, dtype="float32")
    folder = tmp_path_factory.mktemp("m1") / "full-weights"
    PeftModel.from_pretrained(model, str(trained[0] / "adapter")).merge_and_unload().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_released_path_runs_end_to_end_on_the_fixture(tmp_path, model_cache, full_weights_m1):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "SmolLM2-135M-Instruct").symlink_to(embedded_model_dir(model_cache).resolve())
    run = tmp_path / "run"
    models = {"m0": "embedded", "m1": f"hf:{full_weights_m1}"}
    env = dict(os.environ, ORIGINAL=str(FIXTURE), RUN_DIR=str(run), CACHE_DIR=str(cache), DTYPE="float32",
               MODELS=" ".join(f"{n}={s}" for n, s in models.items()), ROLEPLAYER="embedded", JUDGE="embedded",
               N="1", TEST_PAIRS="2", MODEL_FLAGS="--batch_tokens 32768",
               SIM_FLAGS="--question_max_tokens 10 --answer_max_tokens 10 --max_turns 1",
               EVAL_FLAGS="--final_max_tokens 10 --judge_max_tokens 4")
    done = subprocess.run(["bash", "run_all.sh", "released"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "3 tasks x 2 personas = 6 test pairs" in done.stdout and "iteration" not in done.stdout  # no training
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert list(metrics["models"]) == ["m0", "m1"] and metrics["questioner"] == "embedded"  # m0 is Q_BASE
    assert {name: m["spec"] for name, m in metrics["models"].items()} == models
    assert metrics["test_pairs"] == 2 and metrics["n_conversations"] == 1
    # Each model asked its own questions on the same pairs; m1 was judged against m0 in both orders, its answers
    # and m0's answers after m1's conversations ("m_t asks, m0 answers"), with intervals; the controls are there.
    convs = {name: read_jsonl(run / "eval" / name / "conversations.jsonl", "conversation") for name in models}
    assert {c["questioner"] for c in convs["m1"]} == {models["m1"]}
    pairs = {name: [(c["task_id"], c["persona_id"]) for c in convs[name]] for name in models}
    assert pairs["m0"] == pairs["m1"]
    first = {name: [c["messages"][0]["content"] for c in convs[name]] for name in models}
    assert TRAIN_QUESTION in first["m1"] and TRAIN_QUESTION not in first["m0"]  # m1 asked as it was trained to
    for name in ("judgments", "judgments_asks_only"):
        orders = [(j["task_id"], j["persona_id"], j["order"]) for j in read_jsonl(run / "eval" / "m1" / f"{name}.jsonl",
                                                                                   "judgment")]
        assert len(orders) == 2 * 2 and {o[2] for o in orders} == {"new_first", "new_second"}
    m1 = metrics["models"]["m1"]
    assert m1["win_rate"]["n"] + m1["win_rate"]["unparseable"] == 2 and len(m1["gain_over_m0"]["ci95"]) == 2
    assert set(metrics["controls"]) == {"no_conversation", "persona_in_context", "other_persona"}
    report = (run / "eval" / "report.md").read_text()
    assert f"models m0 = embedded, m1 = hf:{full_weights_m1} (the first is the baseline" in report
    assert "| m1 | " in report and "*69.9*" in report  # beside the paper's m1
    # The same names given to other models in the same run folder: an error, never the old records reused.
    swapped = subprocess.run([sys.executable, "05_eval.py", "--run_dir", str(run), "--cache_dir", str(cache),
                              "--models", f"m0=hf:{full_weights_m1}", "m1=embedded", "--dtype", "float32"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert swapped.returncode == 2 and f"--models ['m0=embedded', 'm1=hf:{full_weights_m1}'] -> " \
        f"['m0=hf:{full_weights_m1}', 'm1=embedded']" in swapped.stderr, swapped.stderr[-2000:]


@pytest.mark.parametrize("models,expected", [
    (["m0=embedded"], "--models needs at least two models: the baseline first"),
    (["m0=embedded", "m1"], "--models 'm1': expected NAME=SPEC"),
    (["m0=embedded", "m 1=embedded"], "--models 'm 1=embedded': expected NAME=SPEC"),
    (["m0=embedded", "m0=hf:other"], "--models: the name 'm0' is given twice"),
    (["m0=embedded", "m1=scripted:data/toy"], "'scripted:data/toy' is not a model"),
    (["m0=embedded", "m1=gpt4"], "unknown model spec 'gpt4'"),
])
def test_bad_model_lists_are_refused_before_any_work(models, expected):
    import importlib

    from utils import StepError

    evaluation = importlib.import_module("05_eval")
    with pytest.raises(StepError, match=expected):
        evaluation.models_to_evaluate(evaluation.Args(models=models))


def test_named_models_are_evaluated_as_given_and_the_runs_own_as_before(tmp_path):
    import importlib

    evaluation = importlib.import_module("05_eval")
    given = evaluation.Args(models=["base=hf:org/base", "mine=openai:mine@http://127.0.0.1:8000/v1"])
    assert evaluation.models_to_evaluate(given) == [("base", "hf:org/base", None),
                                                    ("mine", "openai:mine@http://127.0.0.1:8000/v1", None)]
    own = evaluation.models_to_evaluate(evaluation.Args(run_dir=str(tmp_path), iterations=0, questioner="embedded"))
    assert own == [("m0", "embedded", None)]


def test_the_released_preset_has_no_ablations(tmp_path):
    done = subprocess.run(["bash", "run_all.sh", "released", "--ablations"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, DRY_RUN="1", ORIGINAL=str(FIXTURE),
                                               RUN_DIR=str(tmp_path / "released")))
    assert done.returncode == 2 and done.stderr.startswith("error: the released preset trains nothing")
