"""The README's quick start and `make demo`, exactly as a new user types them, on the default
sqlite store (`export MLFLOW_TRACKING_URI=sqlite:///mlflow.db`), checked by their outcomes.

Both run in a copy of the project in a temp dir, as if it were the user's clone, so the store,
artifacts and study they write (mlflow.db, mlruns/, optuna.db) land there and the checkout stays
as it was. `make demo` runs first (`python -m lightcycle.operations.demo`, what its recipe runs);
the block's first command, the same `main`, then reuses the demo's runs, as the README says.
Placeholders are the only substitutions: `<train run id>` becomes the id the `train` command
before it printed, and port 5001 a free port (the machine may be serving on 5001 already).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import requests
from mlflow import MlflowClient

from conftest import PROJECT_ROOT, SAMPLE_DIR, check, free_port, stop_process, wait_for_http
from lightcycle.lifecycle import promote
from lightcycle.model import data
from lightcycle.operations import demo as demo_experiment

pytestmark = pytest.mark.slow
MARKER = "<!-- tests/test_readme.py runs every command of this block, in order -->"
NAME = "lightcycle-fashion"
DEPLOYABLE = NAME + "-scripted"


def readme_block() -> list[str]:
    """The quick-start block's lines, comments dropped, in order (the `export` line included)."""
    text = (PROJECT_ROOT / "README.md").read_text()
    block = text.split(MARKER, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [re.sub(r"\s#.*$", "", line).strip() for line in block.splitlines()]
    return [line for line in lines if line]


def root_listing(root=PROJECT_ROOT) -> set[str]:
    """What git sees in the project root, ignored files included: a stray file shows up here."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored=matching"],
                         cwd=root, capture_output=True, text=True, check=True).stdout
    tools = {".pytest_cache/", ".venv/", ".venv"}  # pytest's own cache; the venv make test builds
    return {line[3:] for line in out.splitlines()
            if "/" not in line[3:].rstrip("/") and line[3:] not in tools}


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The user's copy of the project, and the environment of the shell they type into: the
    venv first on PATH, no tracking URI or experiment of the test session's."""
    copy = tmp_path_factory.mktemp("user") / "lightcycle"
    shutil.copytree(PROJECT_ROOT, copy, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", "mlruns", "mlartifacts", "mlflow.db",
        "optuna.db", ".pytest_cache", "lightning_logs", ".mlflow-server"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_EXPERIMENT", "MLFLOW_RUN"))}
    # The copy's own code, as in a clone with `pip install -e .` (the venv's points elsewhere).
    env["PYTHONPATH"] = os.pathsep.join([str(copy / "src"), env.get("PYTHONPATH", "")])
    env["XDG_DATA_HOME"] = str(copy.parent / "xdg")  # tune's per-user store, were it used
    return copy, env


def test_make_demo_then_the_quick_start_as_typed_on_the_default_store(clone):
    copy, env = clone
    before = root_listing()

    # `make demo`: the whole chain offline on the bundled sample, into ./mlflow.db.
    demo = check(subprocess.run([sys.executable, "-m", "lightcycle.operations.demo"], cwd=copy,
                                env=env, capture_output=True, text=True, timeout=1500))
    assert "tracking to sqlite:///mlflow.db" in demo.stdout
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000" in demo.stdout
    assert (copy / "mlflow.db").is_file() and (copy / "mlruns").is_dir()
    store = f"sqlite:///{copy / 'mlflow.db'}"
    client = MlflowClient(store, registry_uri=store)  # never the default ./mlflow.db here
    champion = client.get_model_version_by_alias(DEPLOYABLE, "champion")
    assert str(champion.version) == "1" and champion.tags["lightcycle.gate.decision"] == "promoted"
    assert float(champion.tags["lightcycle.gate.accuracy"]) > 0.5  # main's default min_accuracy
    experiment = client.get_experiment_by_name(demo_experiment.EXPERIMENT)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs_in = [experiment.experiment_id]
    (train,) = client.search_runs(runs_in, "tags.`mlflow.project.entryPoint` = 'train'")
    assert train.data.params["epochs"] == "40"  # main's documented default

    block = readme_block()
    exports = dict(word.split("=", 1) for line in block if line.startswith("export ")
                   for word in shlex.split(line)[1:])
    assert exports["MLFLOW_TRACKING_URI"] == "sqlite:///mlflow.db", exports
    # A named experiment, the one `make demo` uses, so `main` below reuses the demo's runs.
    assert exports["MLFLOW_EXPERIMENT_NAME"] == demo_experiment.EXPERIMENT, exports
    env = {**env, **exports}
    commands = [line for line in block if not line.startswith("export ")]
    entry_points = {re.search(r"-e (\w+)", c)[1] if " -e " in c else "main"
                    for c in commands if c.startswith("mlflow run")}
    # Every entry point the README's table documents is walked.
    table = set(re.findall(r"^\| `(\w+)` \|", (PROJECT_ROOT / "README.md").read_text(), re.M))
    assert table <= entry_points, table - entry_points
    assert all(c.startswith(("mlflow run", "python -m lightcycle")) for c in commands), commands

    port, train_run_id, server, out = free_port(), None, None, {}
    try:
        for command in commands:
            typed = command.replace("5001", str(port))
            if "<train run id>" in typed:
                typed = typed.replace("<train run id>", train_run_id)
            if " -e serve " in typed:
                served = (copy.parent / "serve.log").open("w")
                server = subprocess.Popen(shlex.split(typed), cwd=copy, env=env, stdout=served,
                                          stderr=subprocess.STDOUT, start_new_session=True)
                wait_for_http(f"http://127.0.0.1:{port}/ping", server, timeout=180)
                continue
            result = check(subprocess.run(shlex.split(typed), cwd=copy, env=env,
                                          capture_output=True, text=True, timeout=900))
            key = re.search(r"-e (\w+)", typed)[1] if " -e " in typed else \
                ("main" if typed.startswith("mlflow run") else "client")
            if key == "main" and "deployable=onnx" in typed:
                key = "main-onnx"
            out[key] = result.stdout
            if key == "train":
                train_run_id = re.search(r"run_id=(\w+)", result.stdout)[1]
    finally:
        if server is not None:
            stop_process(server)

    # main: the same chain the demo ran.
    # train, register and torchscript are reused; the gate runs again and finds version 1
    # already holding champion.
    assert out["main"].count("reusing finished run") == 3, out["main"][-3000:]
    assert "NOT promoted: version 1 already holds champion" in out["main"], out["main"][-3000:]
    # main -P deployable=onnx: the same trained model, reused, as an onnx champion.
    assert out["main-onnx"].count("reusing finished run") == 2, out["main-onnx"][-3000:]
    onnx = client.get_model_version_by_alias(NAME + "-onnx", "champion")
    assert onnx.tags["lightcycle.source_version"] == f"models:/{NAME}/1"
    assert onnx.tags["lightcycle.gate.decision"] == "promoted"
    # register, torchscript: version 2 of each, the deployable with `challenger`.
    assert f"registered: models:/{NAME}/2 (run {train_run_id})" in out["register"]
    assert f"registered models:/{DEPLOYABLE}/2 from models:/{NAME}/2 with alias challenger" \
        in out["torchscript"]
    # promote: the verdict it prints is the rule applied to the two accuracies it recorded.
    v2 = client.get_model_version(DEPLOYABLE, "2")
    accuracy = float(v2.tags[promote.TAG_ACCURACY])
    champion_accuracy = float(v2.tags[promote.TAG_CHAMPION_ACCURACY])
    promoted, reason = promote.decide(accuracy, 0.5, champion_accuracy)
    verdict = "PROMOTED to champion" if promoted else "NOT promoted"
    assert f"models:/{DEPLOYABLE}/2: {verdict}: " in out["promote"], out["promote"]
    assert v2.tags[promote.TAG_DECISION] == ("promoted" if promoted else "rejected")
    now = str(client.get_model_version_by_alias(DEPLOYABLE, "champion").version)
    assert now == ("2" if promoted else "1")
    # lineage: the champion's chain, by value.
    eager = client.get_model_version(NAME, now)
    assert (f"models:/{DEPLOYABLE}@champion -> models:/{DEPLOYABLE}/{now} " in out["lineage"]
            and f"  eager        models:/{NAME}/{now}: test accuracy "
            f"{eager.tags['lightcycle.test_accuracy']}" in out["lineage"]
            and f"  training run {eager.tags['lightcycle.source_run_id']} (FINISHED)"
            in out["lineage"]), out["lineage"]
    # predict: one prediction per test image, logged to its run.
    images = len(data.load_split(SAMPLE_DIR, "test").labels)
    assert f"wrote {images} predictions to run " in out["predict"], out["predict"]
    # the client, against the served onnx champion: one line per image with a class name.
    assert f"serving models:/{NAME}-onnx@champion -> models:/{NAME}-onnx/{onnx.version} " \
        in (copy.parent / "serve.log").read_text()
    rows = [line for line in out["client"].splitlines() if "\t" in line]
    assert len(rows) == images and all(row.split("\t")[1] in data.CLASS_NAMES for row in rows)
    # tune: two trials under one parent; the study next to the store.
    assert (copy / "optuna.db").is_file()
    (parent,) = client.search_runs(runs_in, "tags.`mlflow.project.entryPoint` = 'tune'")
    trials = client.search_runs(runs_in, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(trials) == 2
    # Every entry point walked left its run in the named experiment, none in Default.
    walked = {r.data.tags.get("mlflow.project.entryPoint")
              for r in client.search_runs(runs_in, max_results=1000)}
    assert entry_points <= walked, entry_points - walked
    assert not client.search_runs(["0"]), "a README command ran in the Default experiment"

    # What the README says the default store writes, in the user's copy; nothing in the checkout.
    assert {"mlflow.db", "mlruns/", "optuna.db"} <= set(os.listdir(copy)) | {"mlruns/"}
    assert root_listing() == before, root_listing() - before
