"""Every `mlflow run` command in README.md's quick reference, run exactly as written, in order,
against a fresh tracking server: the path a new user takes from a fresh clone.

Placeholders are the only substitutions: `<train run id>` becomes the id the `train` command
before it printed, and port 5001 a free port (the machine may be serving on 5001 already).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest
import requests
from mlflow import MlflowClient

from conftest import (PROJECT_ROOT, check, free_port, start_tracking_server, stop_process,
                      wait_for_http)

pytestmark = pytest.mark.slow
MARKER = "<!-- tests/test_readme.py runs every command of this block, in order -->"


def readme_lines() -> list[str]:
    text = (PROJECT_ROOT / "README.md").read_text()
    block = text.split(MARKER, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [re.sub(r"\s#.*$", "", line).strip() for line in block.splitlines()]


def readme_commands() -> list[str]:
    return [c for c in readme_lines() if c.startswith(("mlflow run", "python -m lightcycle"))]


def readme_exports() -> dict[str, str]:
    """The block's `export NAME=value` lines: the environment its commands run in."""
    return dict(word.split("=", 1) for line in readme_lines() if line.startswith("export ")
                for word in shlex.split(line)[1:])


def root_listing() -> set[str]:
    """What git sees in the project root, ignored files included: a stray file shows up here."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored=matching"],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout
    tools = {".pytest_cache/", ".venv/", ".venv"}  # pytest's own cache; the venv make test builds
    return {line[3:] for line in out.splitlines()
            if "/" not in line[3:].rstrip("/") and line[3:] not in tools}


@pytest.fixture(scope="module")
def fresh_server(tmp_path_factory):
    """Its own server: the walk uses the default model names, which no other test may own."""
    server = start_tracking_server(tmp_path_factory.mktemp("readme-server"))
    yield server
    stop_process(server.proc)


def test_readme_commands_run_as_written_and_leave_no_stray_files(fresh_server, tmp_path):
    commands = readme_commands()
    entry_points = {re.search(r"-e (\w+)", c)[1] if " -e " in c else "main"
                    for c in commands if c.startswith("mlflow run")}
    # Every entry point the README's table documents is walked.
    table = set(re.findall(r"^\| `(\w+)` \|", (PROJECT_ROOT / "README.md").read_text(), re.M))
    assert table <= entry_points, table - entry_points
    exports = readme_exports()
    assert exports.get("MLFLOW_EXPERIMENT_NAME"), exports  # a named experiment, not Default
    env = {**os.environ, **exports, "MLFLOW_TRACKING_URI": fresh_server.url,
           "XDG_DATA_HOME": str(tmp_path / "xdg")}  # tune's default study store, per user
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    before = root_listing()
    port, train_run_id, server = free_port(), None, None
    try:
        for command in commands:
            command = command.replace("5001", str(port))
            if "<train run id>" in command:
                command = command.replace("<train run id>", train_run_id)
            if " -e serve " in command:
                server = subprocess.Popen(shlex.split(command), cwd=PROJECT_ROOT, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                          start_new_session=True)
                wait_for_http(f"http://127.0.0.1:{port}/ping", server, timeout=180)
                continue
            result = check(subprocess.run(shlex.split(command), cwd=PROJECT_ROOT, env=env,
                                          capture_output=True, text=True, timeout=900))
            if " -e train " in command:
                train_run_id = re.search(r"run_id=(\w+)", result.stdout)[1]
            if "lightcycle.serving.client" in command:
                assert re.search(r"\t(T-shirt/top|Trouser|Pullover|Dress|Coat|Sandal|Shirt|"
                                 r"Sneaker|Bag|Ankle boot)\t", result.stdout), result.stdout
        assert server is not None and requests.get(f"http://127.0.0.1:{port}/ping").ok
    finally:
        if server is not None:
            stop_process(server)
    assert root_listing() == before, root_listing() - before
    client = MlflowClient(fresh_server.url)
    assert client.get_model_version_by_alias("lightcycle-fashion-scripted", "champion")
    experiment = client.get_experiment_by_name(exports["MLFLOW_EXPERIMENT_NAME"])
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    entry_point_runs = {r.data.tags.get("mlflow.project.entryPoint") for r in runs}
    assert entry_points <= entry_point_runs, entry_points - entry_point_runs
    assert not client.search_runs(["0"]), "a README command ran in the Default experiment"
    # tune's default storage: the per-user file next to no sqlite store, never a file named ''.
    assert (tmp_path / "xdg" / "lightcycle" / "optuna.db").is_file()
