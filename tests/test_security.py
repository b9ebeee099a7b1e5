"""Security on a shared tracking server (issue 22): nothing a server hands back is unpickled,
resume says what it skipped, and no secret reaches tracking or stdout.

Real parts: `mlflow server` on 127.0.0.1, `mlflow run . -e train --env-manager local`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Param

from conftest import SAMPLE_DIR, check, mlflow_run, runs_of
from lightcycle.errors import UserError
from lightcycle.lifecycle import model_io, tracking
from lightcycle.model import data
from lightcycle.model.nets import build_net, example_input
from lightcycle.training import resume
from lightcycle.training.config import TrainConfig

CHECKPOINT = "checkpoints/epoch_{}/checkpoint.pth"


class _Payload:
    """Unpickling this runs a shell command that creates `marker`: what a planted file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def planted_pickle(path: Path, marker: Path) -> Path:
    torch.save({"epoch": 0, "state_dict": _Payload(marker)}, path)
    return path


def failed_twin(client: MlflowClient, experiment: str, cfg: TrainConfig, checkpoints=(),
                start_time: int | None = None, tag_checkpoint: bool = True) -> str:
    """A FAILED train run that matches `cfg` on everything resume compares, as anyone with
    EDIT on the experiment can make one: the code version and data digest are public hashes."""
    tags = {**tracking.step_tags("train"),
            tracking.TAG_DATA_DIGEST: data.dataset_digest(SAMPLE_DIR)}
    if tag_checkpoint:
        tags["mlflow.latest_checkpoint_artifact"] = CHECKPOINT.format(0)
    run = client.create_run(experiment, tags=tags, start_time=start_time)
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in dataclasses.asdict(cfg).items()])
    for epoch, path in checkpoints:
        client.log_artifact(run_id, str(path), CHECKPOINT.format(epoch).rsplit("/", 1)[0])
    client.set_terminated(run_id, "FAILED")
    return run_id


# --- 1. no pickle from the server ------------------------------------------------------------

@pytest.mark.slow
def test_planted_checkpoint_is_never_executed_and_train_says_it_starts_fresh(
        tracking_uri, experiment, tmp_path):
    marker = tmp_path / "pwned"
    planted = planted_pickle(tmp_path / "checkpoint.pth", marker)
    twin = failed_twin(MlflowClient(), experiment, TrainConfig(epochs=3), [(0, planted)])

    result = check(mlflow_run("train", {"epochs": 3}, experiment))
    out = result.stdout + result.stderr
    assert not marker.exists(), "the planted checkpoint ran its command"
    assert f"resume: skipped run {twin} {CHECKPOINT.format(0)}: refused" in out, out[-3000:]
    assert "loading it would run code" in out
    assert "resume: starting fresh: none of the 1 matching failed run(s)" in out
    finished = runs_of(experiment, "train", "FINISHED")
    assert len(finished) == 1 and resume.TAG_RESUMED_FROM not in finished[0].data.tags

    # 4. Retention: the finished run keeps its latest checkpoint and its best, nothing else.
    run = finished[0]
    client = MlflowClient()
    kept = sorted(int(f.path.rsplit("_", 1)[-1]) for f in client.list_artifacts(run.info.run_id,
                                                                                "checkpoints"))
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_loss"),
                                      key=lambda m: m.step)]
    best = min(range(3), key=lambda e: (losses[e], -e))
    assert kept == sorted({2, best}), (kept, losses)
    assert run.data.tags[resume.TAG_BEST_CHECKPOINT] == CHECKPOINT.format(best)
    assert "checkpoints: kept epoch 3 (latest" in out
    assert f"removed {3 - len(kept)} older" in out
    # The planted twin failed: nothing of it was removed.
    assert [f.path for f in client.list_artifacts(twin, "checkpoints")] == ["checkpoints/epoch_0"]


def test_eager_model_is_a_state_dict_and_a_net_spec(tracking_uri, experiment, tmp_path):
    import mlflow

    net = build_net("mlp", width=64, depth=1).eval()
    with mlflow.start_run():
        info = model_io.log_eager_model(net)
    loaded = model_io.load_eager_net(info.model_uri)
    assert type(loaded).__name__ == "MLP"
    assert torch.equal(loaded(example_input()), net(example_input()))

    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "m")))
    conf = mlflow.models.Model.load(str(local)).flavors
    assert set(conf) == {model_io.FLAVOR}  # no pickled-module flavor, nothing else to load
    assert conf[model_io.FLAVOR]["net"] == {"name": "mlp", "width": 64, "depth": 1, "dropout": 0.2}
    weights = local / model_io.WEIGHTS_FILE
    # Tensors and plain containers only: no class of lightcycle (or anything) is named inside,
    # so moving a module breaks no registered version.
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(weights)) == []
    assert b"lightcycle" not in weights.read_bytes()


def test_pickled_models_are_refused_saying_how_to_reregister(tracking_uri, experiment, tmp_path):
    client = MlflowClient()
    marker = tmp_path / "pwned"
    run_id = client.create_run(experiment).info.run_id
    # An older eager version: MLflow's pickled-module flavor.
    old = tmp_path / "old"
    old.mkdir()
    (old / "MLmodel").write_text("flavors:\n  pytorch:\n    model_data: data\n"
                                 "    pytorch_version: 2.14.1\n    serialization_format: pickle\n")
    planted_pickle(old / "model.pth", marker)
    client.log_artifacts(run_id, str(old), "old")
    with pytest.raises(UserError, match="Refusing to load runs:/.*/old: it was logged as a "
                                        "pickled nn.Module.*mlflow run . -e register"):
        model_io.load_eager_net(f"runs:/{run_id}/old")
    # Our own flavor with a planted weights file.
    forged = tmp_path / "forged"
    model_io.save_model(build_net("cnn"), str(forged))
    planted_pickle(forged / model_io.WEIGHTS_FILE, marker)
    client.log_artifacts(run_id, str(forged), "forged")
    with pytest.raises(UserError, match="forged: its state_dict.pt is not a plain state_dict"):
        model_io.load_eager_net(f"runs:/{run_id}/forged")
    assert not marker.exists()


# --- 5. resume reports what it skipped, and searches every matching run -----------------------

def test_resume_searches_past_the_newest_fifty_and_says_what_it_skipped(tracking_uri, experiment,
                                                                       tmp_path):
    client = MlflowClient()
    cfg = TrainConfig(epochs=3)
    good = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 0, "global_step": 1, "state_dict": {"w": torch.ones(2)}}, good)
    now = int(time.time() * 1000)
    wanted = failed_twin(client, experiment, cfg, [(0, good)], start_time=now - 10**6)
    torn = tmp_path / "torn" / "checkpoint.pth"
    torn.parent.mkdir()
    torn.write_bytes(good.read_bytes()[:100])
    newest = failed_twin(client, experiment, cfg, [(0, torn)], start_time=now)
    for i in range(60):  # died before their first checkpoint, all newer than `wanted`
        failed_twin(client, experiment, cfg, start_time=now - 1000 - i, tag_checkpoint=False)

    found = resume.find_resumable_checkpoint(experiment, dataclasses.asdict(cfg),
                                             data.dataset_digest(SAMPLE_DIR), str(tmp_path / "d"))
    assert found.resume is not None and found.resume.run_id == wanted
    assert found.candidates == 62
    assert found.skipped[0].startswith(f"run {newest} {CHECKPOINT.format(0)}: ")
    assert sum("died before its first checkpoint" in s for s in found.skipped) == 60
    lines = found.report()
    assert lines[-1] == "resume: skipped 51 more" and len(lines) == 11

    # Nothing matches: the report says so.
    none = resume.find_resumable_checkpoint(experiment, dataclasses.asdict(TrainConfig(epochs=9)),
                                            data.dataset_digest(SAMPLE_DIR), str(tmp_path / "e"))
    assert none.resume is None
    assert none.report() == ["resume: starting fresh: no earlier FAILED or KILLED train run has "
                             "these settings, data and code"]


# --- 6. secrets never reach tracking or stdout -------------------------------------------------

def test_redact_url_hides_passwords_and_nothing_else():
    assert tracking.redact_url("postgresql+psycopg2://optuna:s3cr%2Ft@db:5432/optuna") == \
        "postgresql+psycopg2://optuna:***@db:5432/optuna"
    assert tracking.redact_url("mysql://u:p@h/db?password=x&charset=utf8") == \
        "mysql://u:***@h/db?password=***&charset=utf8"
    for plain in ("sqlite:////tmp/optuna.db", "postgresql://optuna@127.0.0.1:5433/optuna",
                  "http://127.0.0.1:5000", "not a url"):
        assert tracking.redact_url(plain) == plain


def _everything_logged(experiment: str) -> str:
    client = MlflowClient()
    runs = client.search_runs([experiment], max_results=1000)
    return "\n".join(f"{r.data.params}\n{r.data.tags}" for r in runs)


@pytest.mark.slow
def test_tune_never_logs_or_prints_the_storage_password(postgresql_cluster, tracking_uri,
                                                        experiment, capfd, monkeypatch):
    import mlflow

    from lightcycle.training import tune

    postgresql_cluster.create_database("optuna_secret")
    password = postgresql_cluster.role_password("optuna_secret")
    url = postgresql_cluster.uri("optuna_secret").replace("optuna_secret@",
                                                          f"optuna_secret:{password}@")
    monkeypatch.delenv("PGPASSFILE", raising=False)  # the URL's password is what logs in
    monkeypatch.setenv("LIGHTCYCLE_TEST_STORAGE", url)
    for i, storage in enumerate((url, "env:LIGHTCYCLE_TEST_STORAGE")):
        with mlflow.start_run():
            tune.tune(tune.TuneConfig(n_trials=i + 1, epochs=1, models="mlp", study_name="secret",
                                      optuna_storage=storage, data_dir=str(SAMPLE_DIR)))
    out = capfd.readouterr()
    assert "optuna_secret:***@127.0.0.1" in out.out  # it says where the study is...
    logged = _everything_logged(experiment)
    assert "optuna_secret:***@127.0.0.1" in logged
    assert "env:LIGHTCYCLE_TEST_STORAGE" in logged
    assert password not in out.out + out.err + logged  # ...never with the password


# --- 7. `make server`: private files, one sqlite writer, the app's own database password -------

def _argvs():
    for entry in Path("/proc").iterdir():
        try:
            yield (entry / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue


@pytest.mark.slow
def test_team_server_state_is_private_and_sqlite_has_one_writer(tmp_path):
    import signal
    import subprocess
    import sys

    from conftest import free_port, stop_process, wait_for_http

    state, port = tmp_path / "state", free_port()
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightcycle.operations.tracking_server", "--dir", str(state),
         "--port", str(port), "--backend", "sqlite", "--auth", "--workers", "2"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/health", proc, timeout=180, log=log)
        auth = ("admin", (state / "admin-password").read_text().strip())
        client_env = {"MLFLOW_TRACKING_USERNAME": auth[0], "MLFLOW_TRACKING_PASSWORD": auth[1]}
        with pytest.MonkeyPatch.context() as mp:
            for key, value in client_env.items():
                mp.setenv(key, value)
            client = MlflowClient(url)
            run = client.create_run(client.create_experiment("private"))
            (tmp_path / "a.txt").write_text("artifact")
            client.log_artifact(run.info.run_id, str(tmp_path / "a.txt"), "sub")
        server_argv = next(argv for argv in _argvs() if "--backend-store-uri" in argv
                           and str(state / "mlflow.db") in " ".join(argv))
        server_environ = next(
            (entry / "environ").read_bytes().decode().split("\0") for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and (entry / "cmdline").exists()
            and (entry / "cmdline").read_bytes().decode().split("\0") == server_argv)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        stop_process(proc)
    text = log.read_text()
    assert "[server] sqlite store: 1 worker, not 2" in text
    assert server_argv[server_argv.index("--workers") + 1] == "1"
    paths = [state, *state.rglob("*")]
    names = {p.relative_to(state).as_posix() for p in paths if p != state}
    assert {"mlflow.db", "basic_auth.db", "admin-password", "basic_auth.ini",
            "flask-secret-key", "webhook-secret-key", "artifacts"} <= names
    # The server encrypts webhook secrets with the kept key (a valid Fernet key), not its own.
    from cryptography.fernet import Fernet

    key = (state / "webhook-secret-key").read_text().strip()
    Fernet(key)
    assert f"MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY={key}" in server_environ
    assert any(n.endswith("sub/a.txt") for n in names)
    wrong = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in paths
             if (p.stat().st_mode & 0o777) != (0o700 if p.is_dir() else 0o600)}
    assert not wrong, wrong


@pytest.mark.slow
def test_postgres_application_role_has_its_own_generated_password(postgresql_cluster):
    import psycopg2

    postgresql_cluster.create_database("approle")
    own = postgresql_cluster.role_password("approle")
    assert own and own != postgresql_cluster.password()

    def connect(password):
        return psycopg2.connect(host="127.0.0.1", port=postgresql_cluster.port, user="approle",
                                password=password, dbname="approle", connect_timeout=10)

    connect(own).close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        connect(postgresql_cluster.password())
    postgresql_cluster.create_database("approle")  # again: same role, same password
    assert postgresql_cluster.role_password("approle") == own
