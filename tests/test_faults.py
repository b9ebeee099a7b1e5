"""Faults and security (issue 7): killed training resumes, tracking-server restarts, concurrent
chains, basic auth, serving under load, and what `serve` does when the alias moves.

Real parts only: `mlflow server` on 127.0.0.1, `mlflow run . -e <step> --env-manager local`,
`mlflow models serve`. Conditions are polled, never slept for.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from bench.common import server_usage
from bench.serving import served as load_generator  # shared with the benchmarks (BENCHMARKS.md)
from conftest import (PROJECT_ROOT, SAMPLE_DIR, check, free_port, mlflow_run, runs_of,
                      serve_step, start_tracking_server, stop_process, wait_for_http)
from lightcycle.lifecycle import promote, promotion_lock, registry
from lightcycle.training import resume
from lightcycle.training.config import TrainConfig
from lightcycle.model import data
from lightcycle.operations.tracking_server import AUTH_CACHE_TTL_S
from lightcycle.serving import scoring_server

pytestmark = pytest.mark.slow

CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


# --- helpers -------------------------------------------------------------------------------

def poll(predicate, timeout: float, what: str, interval: float = 0.25):
    """Return predicate()'s first truthy value; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def popen_main(params: dict, experiment_id: str, log: Path, env: dict | None = None,
               entry_point: str = "main"):
    cmd = ["mlflow", "run", str(PROJECT_ROOT), "-e", entry_point, "--env-manager", "local",
           "--experiment-id", experiment_id]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> tuple[int, str]:
    try:
        proc.wait(timeout)
    finally:
        stop_process(proc)
    return proc.returncode, log.read_text()


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    kids = [int(p) for p in out.stdout.split()]
    return kids + [g for k in kids for g in descendants(k)]


def argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def versions(name: str, client: MlflowClient | None = None) -> list:
    try:
        return sorted((client or MlflowClient()).search_model_versions(f"name = '{name}'"),
                      key=lambda v: int(v.version))
    except MlflowException:
        return []


def step_run(experiment_id: str, entry_point: str, status: str | None = None):
    try:
        runs = runs_of(experiment_id, entry_point, status)
    except MlflowException:
        return None  # the server is restarting
    return runs[0] if runs else None


def checkpoint_epochs(client: MlflowClient, run_id: str) -> list[int]:
    """Epochs whose checkpoint file is uploaded (the tag naming it is set before the upload)."""
    epochs = []
    for entry in client.list_artifacts(run_id, "checkpoints"):
        if entry.is_dir and entry.path.rsplit("/", 1)[-1].startswith("epoch_"):
            if any(f.path.endswith(".pth") for f in client.list_artifacts(run_id, entry.path)):
                epochs.append(int(entry.path.rsplit("_", 1)[-1]))
    return sorted(epochs)


def assert_registry_consistent(name: str, client: MlflowClient | None = None) -> None:
    """No duplicate version per source run, every version READY, champion on a READY version,
    no promotion lock left behind."""
    client = client or MlflowClient()
    found = versions(name, client)
    run_ids = [v.run_id for v in found]
    assert len(run_ids) == len(set(run_ids)), f"duplicate versions of {name}: {run_ids}"
    assert all(v.status == "READY" for v in found), [(v.version, v.status) for v in found]
    champion = registry.alias_version(client, name, registry.CHAMPION)
    if champion is not None:
        assert champion.status == "READY"
    with pytest.raises(MlflowException):
        client.get_registered_model(name + promotion_lock.LOCK_SUFFIX)


# --- crash and resume ------------------------------------------------------------------------

def test_killed_train_resumes_from_logged_checkpoint_on_rerun(tracking_uri, experiment,
                                                                model_name, tmp_path):
    params = {"epochs": 4, "model_name": model_name, "min_accuracy": 0.1}
    client = MlflowClient()
    log = tmp_path / "first.log"
    first = popen_main(params, experiment, log)
    try:
        train = poll(lambda: step_run(experiment, "train", "RUNNING"), 300, "the train run")
        # Found before the first checkpoint, so that the kill follows it within one poll and
        # lands before the last epoch: a kill after it would leave nothing to resume.
        pids = poll(lambda: [p for p in descendants(first.pid) if argv(p)[1:2] == ["steps/train.py"]],
                    30, "the train process")
        poll(lambda: checkpoint_epochs(client, train.info.run_id), 300, "the first checkpoint",
             interval=0.05)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    finally:
        returncode, output = finish(first, log)
    assert returncode != 0, output[-3000:]
    killed = client.get_run(train.info.run_id)
    assert killed.info.status in ("FAILED", "KILLED")
    assert not runs_of(experiment, status="RUNNING"), "a run was left RUNNING"
    saved = checkpoint_epochs(client, killed.info.run_id)
    assert saved and saved[-1] < 3, f"the kill came after the last epoch's checkpoint: {saved}"

    rerun = check(mlflow_run("main", params, experiment))
    finished = runs_of(experiment, "train", "FINISHED")
    assert len(finished) == 1
    resumed = finished[0]
    assert resumed.data.tags["lightcycle.resumed_from"] == killed.info.run_id
    # At most the epoch in progress is lost: it starts right after the newest saved checkpoint
    # and trains only the epochs after it.
    assert int(resumed.data.tags["lightcycle.resumed_from_epoch"]) == saved[-1]
    # Finished, it kept its latest checkpoint and its best, both from the epochs it trained.
    kept = checkpoint_epochs(client, resumed.info.run_id)
    assert max(kept) == 3 and min(kept) > saved[-1] and len(kept) <= 2
    assert f"resuming from run {killed.info.run_id}" in rerun.stdout + rerun.stderr
    # Every later step ran once, on the resumed run's model.
    for step in ("register", "torchscript", "promote"):
        assert len(runs_of(experiment, step)) == 1, step
    assert [v.run_id for v in versions(model_name)] == [resumed.info.run_id]
    assert not runs_of(experiment, status="RUNNING")

    # Only data with the same digest is resumed from.
    cfg = dataclasses.asdict(TrainConfig(epochs=4))
    digest = killed.data.tags["lightcycle.data_digest"]
    assert resume.find_resumable_checkpoint(experiment, cfg, digest, str(tmp_path)).resume.run_id \
        == killed.info.run_id
    assert resume.find_resumable_checkpoint(experiment, cfg, "0" * 16, str(tmp_path)).resume is None
    # resume=false (what `main -P force=true` passes: test_chain) starts training over: no
    # resume, every epoch trained again.
    forced = check(mlflow_run("train", {"epochs": 4, "resume": "false"}, experiment))
    assert "resuming" not in forced.stdout + forced.stderr
    newest = runs_of(experiment, "train", "FINISHED")[0]
    assert newest.info.run_id != resumed.info.run_id
    assert "lightcycle.resumed_from" not in newest.data.tags
    # Every epoch trained again (one epoch metric each); retention then kept the latest.
    assert len(client.get_metric_history(newest.info.run_id, "val_loss")) == 4
    assert max(checkpoint_epochs(client, newest.info.run_id)) == 3


def test_ddp_ranks_resume_from_the_same_checkpoint(tracking_uri, experiment, tmp_path):
    """Two gloo processes; rank 1 is SIGKILLed after a checkpoint is logged. The re-run's two
    ranks both continue from the checkpoint rank 0 chose, or their weights and epoch counters
    would part."""
    params = {"model": "mlp", "epochs": 4, "devices": 2, "strategy": "ddp"}
    client = MlflowClient()
    log = tmp_path / "first.log"
    first = popen_main(params, experiment, log, entry_point="train")
    try:
        train = poll(lambda: step_run(experiment, "train", "RUNNING"), 300, "the train run")
        poll(lambda: checkpoint_epochs(client, train.info.run_id), 300, "the first checkpoint")
        # Lightning starts rank 1 as `python /abs/path/steps/train.py ...` with LOCAL_RANK=1.
        ranks = poll(lambda: [p for p in descendants(first.pid)
                              if argv(p)[1:2] and argv(p)[1].endswith("steps/train.py")
                              and b"\0LOCAL_RANK=1\0" in b"\0" + environ(p)],
                     60, "rank 1's process")
        os.kill(ranks[0], signal.SIGKILL)
    finally:
        returncode, output = finish(first, log, timeout=300)
    assert returncode != 0, output[-3000:]
    assert client.get_run(train.info.run_id).info.status in ("FAILED", "KILLED")

    rerun = check(mlflow_run("train", params, experiment))
    out = rerun.stdout + rerun.stderr
    chosen = {line.split(": ", 1)[0]: line.split("checkpoint ", 1)[1].split(" ")[0]
              for line in out.splitlines() if ": resuming from run " in line}
    assert set(chosen) == {"rank 0", "rank 1"}, out[-3000:]
    assert chosen["rank 0"] == chosen["rank 1"]
    (finished,) = runs_of(experiment, "train", "FINISHED")
    assert finished.data.tags["lightcycle.resumed_from"] == train.info.run_id
    assert finished.data.tags["lightcycle.resumed_checkpoint"] == chosen["rank 0"]


# --- tracking server restart -----------------------------------------------------------------

class RestartableServer:
    """A function-scoped `mlflow server` that can be stopped and started again on the same
    backend store, artifact root and port."""

    def __init__(self, root: Path, backend_uri: str | None = None, env: dict | None = None):
        self.root, self.backend_uri, self.env = root, backend_uri, env
        self.server = start_tracking_server(root, backend_uri=backend_uri, env=env)
        self.port = int(self.server.url.rsplit(":", 1)[1])
        self.restarts = 0

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> None:
        self.server = start_tracking_server(self.root, backend_uri=self.backend_uri,
                                            port=self.port, env=self.env)

    def restart(self) -> None:
        stop_process(self.server.proc)
        self.start()
        self.restarts += 1

    def stop(self) -> None:
        stop_process(self.server.proc)


@pytest.fixture
def restartable_server(request, tmp_path, monkeypatch):
    """On sqlite; `@pytest.mark.parametrize("restartable_server", [...], indirect=True)` picks
    the backend (a fresh database of the session's PostgreSQL cluster for "postgresql")."""
    backend = getattr(request, "param", "sqlite")
    backend_uri = env = None
    if backend == "postgresql":
        cluster = request.getfixturevalue("postgresql_cluster")
        database = f"restart_{uuid.uuid4().hex[:8]}"
        cluster.create_database(database)
        backend_uri, env = cluster.uri(database), cluster.env()
    server = RestartableServer(tmp_path / "restartable", backend_uri, env)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    mlflow.set_tracking_uri(server.url)
    yield server
    server.stop()
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("restartable_server", ["sqlite", "postgresql"], indirect=True)
def test_main_survives_tracking_server_restart_without_duplicates(restartable_server, tmp_path,
                                                                   model_name):
    """Two restarts, each while a step is at work: one mid-training (after the first epoch's
    checkpoint is uploaded, so autolog is logging), one while the deployable is converted,
    logged and registered. `main` completes on its first try, with nothing doubled."""
    server = restartable_server
    client = MlflowClient()
    experiment = mlflow.create_experiment("restart")
    params = {"epochs": 3, "model_name": model_name, "min_accuracy": 0.1}
    log = tmp_path / "main.log"
    proc = popen_main(params, experiment, log, env={"MLFLOW_TRACKING_URI": server.url})
    outages = []

    def restart_now(what: str):
        assert proc.poll() is None, f"main exited before the restart {what}:\n" + \
            log.read_text()[-3000:]
        down = time.time()
        server.restart()
        outages.append((what, down, time.time()))

    try:
        # 1: during training, once it has logged its first epoch (it has more to log).
        train = poll(lambda: step_run(experiment, "train", "RUNNING") or proc.poll() is not None,
                     300, "the train run")
        assert proc.poll() is None, log.read_text()[-3000:]
        poll(lambda: checkpoint_epochs(client, train.info.run_id) or proc.poll() is not None,
             600, "the first epoch's checkpoint")
        restart_now("during training")
        # 2: while torchscript runs (it logs the deployable, registers it, moves `challenger`).
        poll(lambda: step_run(experiment, "torchscript", "RUNNING") or proc.poll() is not None,
             600, "the torchscript run")
        restart_now("during conversion")
    finally:
        returncode, output = finish(proc, log)
    assert server.restarts == 2 and [o[0] for o in outages] == ["during training",
                                                              "during conversion"]
    # With the bounded retries every step sets, an outage this short (one server start) is
    # ridden out: `main` completes on the first try. (A longer one fails the step with an
    # `error:` line and the same command completes on re-run; see the README.)
    assert returncode == 0, output[-4000:]
    # Each outage fell inside the step it was meant for: training logged epochs on both sides
    # of the first, and the conversion run spans the second.
    (_, down, up), (_, down2, up2) = outages
    trained = client.get_run(train.info.run_id)
    steps = [m.timestamp / 1000 for m in client.get_metric_history(train.info.run_id, "train_loss")]
    assert trained.info.status == "FINISHED" and len(steps) == 3, steps
    assert min(steps) < down and max(steps) > up, (steps, down, up)
    (conversion,) = runs_of(experiment, "torchscript")
    assert conversion.info.start_time / 1000 < down2 and conversion.info.end_time / 1000 > up2
    for name in (model_name, registry.deployable_name(model_name)):
        found = versions(name)
        assert [v.version for v in found] == ["1"], (name, [v.version for v in found])
        assert_registry_consistent(name)
    champion = registry.alias_version(MlflowClient(), registry.deployable_name(model_name),
                                      registry.CHAMPION)
    assert champion is not None and champion.version == "1"
    assert not runs_of(experiment, status="RUNNING")


def test_a_lost_create_model_version_answer_leaves_one_version(tracking_uri, experiment,
                                                                 model_name, tmp_path):
    """The server commits the version and its answer is lost: MLflow's client re-sends the
    POST, the server makes a second version, and register_model deletes it again."""
    from lossy_proxy import LossyProxy

    client = MlflowClient()
    run = client.create_run(experiment)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "MLmodel").write_text("flavors: {}\n")
    client.log_artifacts(run.info.run_id, str(tmp_path / "model"), "model")
    source = f"{run.info.artifact_uri}/model"
    with LossyProxy(tracking_uri, ("/model-versions/create",)) as proxy:
        lossy = MlflowClient(proxy.url)
        version, created = registry.register_model(source, model_name, run.info.run_id,
                                                   {"lightcycle.source_run_id": run.info.run_id},
                                                   client=lossy)
    creates = [status for method, path, status in proxy.seen
               if path.endswith("/model-versions/create")]
    assert creates[0] is None and len(creates) >= 2, proxy.seen  # the retry reached the server
    assert created and version.version == "1" and version.status == "READY"
    found = versions(model_name, client)
    assert [(v.version, v.run_id) for v in found] == [("1", run.info.run_id)], \
        [(v.version, v.run_id) for v in found]
    assert found[0].tags["lightcycle.source_run_id"] == run.info.run_id
    # Registering the same run again is a no-op that finds the one version.
    again, created = registry.register_model(source, model_name, run.info.run_id, {}, client=client)
    assert (again.version, created) == ("1", False)


def test_a_step_rides_out_a_tracking_server_restart_and_says_so(restartable_server,
                                                                monkeypatch, capsys):
    """A step whose run exists (MLFLOW_RUN_ID set by `mlflow run`) waits for a restarting
    server instead of failing, and says why it waits; past the grace it fails, saying so."""
    import threading

    from lightcycle.errors import UserError
    from lightcycle.lifecycle import connection

    server = restartable_server
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    stop_process(server.server.proc)
    outcome = {}

    def check_during_outage():
        try:
            outcome["uri"] = connection.check_tracking_server()
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    waiter = threading.Thread(target=check_during_outage)
    waiter.start()
    poll(lambda: "is not answering" in capsys.readouterr().out or waiter.join(0) or
         not waiter.is_alive(), 30, "the waiting message")
    assert waiter.is_alive(), outcome  # still waiting, not failed
    server.start()
    waiter.join(connection.RESTART_GRACE_SECONDS)
    assert outcome == {"uri": server.url}, outcome

    # Past the grace: a clear error naming the wait.
    stop_process(server.server.proc)
    monkeypatch.setattr(connection, "RESTART_GRACE_SECONDS", 1.0)
    with pytest.raises(UserError, match=r"Cannot reach the MLflow tracking server at .* for 1 s"):
        connection.check_tracking_server()
    # Outside `mlflow run` (no run yet) there is no grace: it fails at once.
    monkeypatch.delenv("MLFLOW_RUN_ID")
    started = time.monotonic()
    with pytest.raises(UserError, match=r"\(ConnectionError\)\. Start it"):
        connection.check_tracking_server()
    assert time.monotonic() - started < 10


# --- concurrency, load, alias following: one pair of concurrent chains -----------------------

CONCURRENT_NAME = f"concurrent-{uuid.uuid4().hex[:6]}"


LOCK_WAIT = "[lock] waiting: {lock} is held by run '{run}'"


@pytest.fixture(scope="module")
def two_chains(backend_server, tmp_path_factory):
    """Two `main` runs with different seeds started together against one server, once per
    tracking backend (sqlite, PostgreSQL).

    Their gates are made to contend: this process holds the deployable's promotion lock (as a
    RUNNING run, so it is never stale) until both promotes print that they wait for it, then
    lets go, and both go for the lock at the same moment."""
    tracking_server = backend_server
    mlflow.set_tracking_uri(tracking_server.url)
    client = MlflowClient()
    experiment = mlflow.create_experiment(f"concurrent-{uuid.uuid4().hex[:6]}")
    tmp = tmp_path_factory.mktemp("concurrent")
    env = {"MLFLOW_TRACKING_URI": tracking_server.url}
    deployable = registry.deployable_name(CONCURRENT_NAME)
    holder = client.create_run(experiment).info.run_id
    waiting = LOCK_WAIT.format(lock=deployable + promotion_lock.LOCK_SUFFIX, run=holder)
    logs = [tmp / f"seed{seed}.log" for seed in (1, 2)]
    with promotion_lock.promotion_lock(client, deployable, holder):
        procs = [popen_main({"epochs": 1, "seed": seed, "model_name": CONCURRENT_NAME,
                             "min_accuracy": 0.1}, experiment, log, env)
                 for seed, log in zip((1, 2), logs)]
        try:
            poll(lambda: all(waiting in log.read_text() for log in logs)
                 or any(proc.poll() is not None for proc in procs), 900, "both promotes to wait")
        except BaseException:
            for proc in procs:
                stop_process(proc)
            raise
    client.set_terminated(holder)
    results = [finish(proc, log) for proc, log in zip(procs, logs)]
    yield {"experiment": experiment, "results": results, "url": tracking_server.url,
           "deployable": deployable, "holder": holder, "waiting": waiting}
    mlflow.set_tracking_uri(None)


@pytest.mark.xdist_group("faults-concurrent")
def test_concurrent_mains_leave_one_champion_with_the_better_accuracy(two_chains):
    mlflow.set_tracking_uri(two_chains["url"])
    for returncode, output in two_chains["results"]:
        assert returncode == 0, output[-4000:]
        # Each gate waited for the lock while another held it...
        assert two_chains["waiting"] in output, output[-4000:]
    client = MlflowClient()
    eager = versions(CONCURRENT_NAME)
    deployable = versions(two_chains["deployable"])
    assert [v.version for v in eager] == ["1", "2"]
    assert [v.version for v in deployable] == ["1", "2"]
    for name in (CONCURRENT_NAME, two_chains["deployable"]):
        assert_registry_consistent(name, client)
    # search_model_versions leaves `aliases` empty: read each version.
    holders = [v for v in deployable if registry.CHAMPION in
               client.get_model_version(v.name, v.version).aliases]
    assert len(holders) == 1
    accuracy = {v.version: float(v.tags[promote.TAG_ACCURACY]) for v in deployable}
    assert accuracy[holders[0].version] == max(accuracy.values()), accuracy
    assert len(runs_of(two_chains["experiment"], "promote", "FINISHED")) == 2
    # ...and, let go at the same moment, they ran one after the other: the first found no
    # champion and took it; the second compared against the first. Two gates that overlapped
    # would both have read "no champion" and both recorded no champion accuracy.
    seen = {v.version: v.tags[promote.TAG_CHAMPION_ACCURACY] for v in deployable}
    first = [version for version, champion in seen.items() if champion == ""]
    assert len(first) == 1, seen
    (second,) = set(seen) - set(first)
    assert seen[second] == f"{accuracy[first[0]]:.6g}", (seen, accuracy)


def test_concurrent_promotion_lock_serializes_read_compare_write(tracking_uri, experiment,
                                                                  model_name):
    """The lock `promote` takes around read-compare-move, hammered directly: four threads each
    read a counter kept in the registry and write it back plus one, ten times. Any overlap of
    two read-then-write sections loses an update."""
    import threading

    client = MlflowClient()
    client.create_registered_model(model_name, tags={"counter": "0"})
    holder = client.create_run(experiment)
    errors, held = [], []

    def worker():
        try:
            for _ in range(10):
                with promotion_lock.promotion_lock(client, model_name, holder.info.run_id, poll=0.05):
                    start = time.monotonic()
                    value = int(client.get_registered_model(model_name).tags["counter"])
                    client.set_registered_model_tag(model_name, "counter", str(value + 1))
                    held.append((start, time.monotonic(), value, threading.get_ident()))
        except Exception:  # noqa: BLE001 - reported below
            import traceback
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    held.sort()
    overlaps = [(a, b) for a, b in zip(held, held[1:]) if b[0] < a[1]]
    assert not overlaps, overlaps
    assert client.get_registered_model(model_name).tags["counter"] == "40", sorted(h[2] for h in held)
    with pytest.raises(MlflowException):
        client.get_registered_model(model_name + promotion_lock.LOCK_SUFFIX)

    # A lock left by a promote that died (its run is no longer RUNNING) is broken, not waited on.
    client.create_registered_model(model_name + promotion_lock.LOCK_SUFFIX, tags={
        promotion_lock.TAG_LOCK_OWNER: "dead", promotion_lock.TAG_LOCK_RUN: holder.info.run_id,
        promotion_lock.TAG_LOCK_SINCE: f"{time.time():.3f}"})
    client.set_terminated(holder.info.run_id, "KILLED")
    with promotion_lock.promotion_lock(client, model_name, "another-run", timeout=30):
        pass

    # A live holder is waited for, and past the timeout the waiter gives up naming the lock,
    # its holder and what to do.
    live = client.create_run(experiment).info.run_id
    lock = model_name + promotion_lock.LOCK_SUFFIX
    with promotion_lock.promotion_lock(client, model_name, live):
        started = time.monotonic()
        with pytest.raises(promotion_lock.UserError) as gave_up:
            with promotion_lock.promotion_lock(client, model_name, "waiter", timeout=1.5,
                                               poll=0.1):
                pytest.fail("took a lock a live run holds")
        assert 1.5 <= time.monotonic() - started < 30
    assert str(gave_up.value) == (
        f"Registered model {lock} (a lock held while `promote` moves the aliases of "
        f"{model_name}) is held by run {live!r}. Wait for that run to finish; if it is not "
        f"running, delete {lock} in the MLflow UI and re-run.")


def test_lock_survives_a_killed_holder_and_contending_processes(tracking_uri, experiment,
                                                               model_name, tmp_path):
    """A holder is SIGKILLed while it holds the lock (its run stays RUNNING: nobody marks it),
    with three processes waiting. Exactly one of them breaks the stale lock, after seeing the
    same holder for `stale_after` seconds of its own clock; then all three take turns, never
    two at once, and no update is lost."""
    client = MlflowClient()
    client.create_registered_model(model_name, tags={"counter": "0"})
    run_id = client.create_run(experiment).info.run_id
    script = str(PROJECT_ROOT / "tests" / "lock_contender.py")
    holder_log, log = tmp_path / "holder.log", tmp_path / "rounds.log"
    holder = subprocess.Popen([sys.executable, script, model_name, run_id, "1", str(holder_log),
                               "--hold"], start_new_session=True)
    contenders = []
    try:
        poll(lambda: holder_log.exists() and holder_log.read_text(), 60, "the holder")
        contenders = [subprocess.Popen([sys.executable, script, model_name, run_id, "5", str(log)],
                                       start_new_session=True) for _ in range(3)]
        os.killpg(holder.pid, signal.SIGKILL)
        for proc in contenders:
            assert proc.wait(180) == 0
    finally:
        for proc in [holder, *contenders]:
            stop_process(proc)
    rounds = sorted(tuple(map(float, line.split()[:2])) for line in log.read_text().splitlines())
    assert len(rounds) == 15
    overlaps = [(a, b) for a, b in zip(rounds, rounds[1:]) if b[0] < a[1]]
    assert not overlaps, overlaps
    assert client.get_registered_model(model_name).tags["counter"] == "15"
    leftovers = [m.name for m in client.search_registered_models(f"name LIKE '{model_name}--%'")]
    assert leftovers == [], leftovers


@pytest.fixture(scope="module")
def served(two_chains, tmp_path_factory):
    """`mlflow run . -e serve` on the champion, as documented."""
    mlflow.set_tracking_uri(two_chains["url"])
    champion = f"models:/{two_chains['deployable']}@champion"
    version = registry.resolve(champion).version
    port = free_port()
    log = tmp_path_factory.mktemp("served") / "serve.log"
    proc = subprocess.Popen(
        ["mlflow", "run", str(PROJECT_ROOT), "-e", "serve", "--env-manager", "local",
         "-P", f"model_uri={champion}", "-P", f"port={port}"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=PROJECT_ROOT, start_new_session=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": two_chains["url"]})
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, timeout=180, log=log)
    except BaseException:
        stop_process(proc)
        raise
    yield {"url": f"http://127.0.0.1:{port}", "proc": proc, "log": log, "champion": champion,
           "version": version, "name": two_chains["deployable"]}
    stop_process(proc)


# Serving does not touch the tracking backend after start: sqlite only (it is the same server
# as `tracking_uri`'s there).
@pytest.mark.xdist_group("faults-concurrent")
@pytest.mark.backends("sqlite")
def test_load_8_clients_30s_mixed_requests_no_5xx_correct_answers_flat_memory(served,
                                                                             tracking_uri):
    mix = load_generator.standard_mix(f"models:/{served['name']}/{served['version']}")
    result = load_generator.run_load(served["url"], mix, clients=8, seconds=30, warmup_seconds=5,
                                     rss=lambda: server_usage(served["proc"])[1])
    # Figures for BENCHMARKS.md come from `bench.serving.served --variant load`; the test writes nothing.
    assert result["kinds"]["good"] > 0 and result["kinds"]["bad"] > 0
    # transport errors, 5xx, wrong answers and bad requests answered other than 4xx, all none
    assert result["problems"] == {}, result["examples"]
    assert result["rss_after_warmup_kib"] > 0  # the server's process group was found
    assert result["rss_end_kib"] <= 1.10 * result["rss_after_warmup_kib"], (
        result["rss_after_warmup_kib"], result["rss_end_kib"])


@pytest.mark.xdist_group("faults-concurrent")
@pytest.mark.backends("sqlite")
def test_fault_alias_moved_while_serving_is_picked_up_by_restart_only(served, two_chains,
                                                                      tracking_uri, tmp_path):
    client = MlflowClient()
    name, started_on = served["name"], served["version"]
    other = next(v.version for v in versions(name) if v.version != started_on)
    test = data.load_split(SAMPLE_DIR, "test")
    pixels = test.images[:32, None].astype(np.float32)
    expected = {v: np.stack(mlflow.pyfunc.load_model(f"models:/{name}/{v}").predict(pixels)
                            ["probabilities"]) for v in (started_on, other)}
    assert not np.allclose(expected[started_on], expected[other], atol=1e-4)

    def served_probabilities(url):
        response = requests.post(url + "/invocations", json={"inputs": pixels.tolist()}, timeout=60)
        assert response.status_code == 200, response.text
        return np.array([row["probabilities"] for row in response.json()["predictions"]])

    assert f"-> models:/{name}/{started_on} " in served["log"].read_text()
    client.set_registered_model_alias(name, registry.CHAMPION, other)  # as a user in the UI
    try:
        # The running server resolved the alias at start and keeps answering with that version.
        for _ in range(3):
            np.testing.assert_allclose(served_probabilities(served["url"]), expected[started_on],
                                       atol=1e-5)
        # The documented restart command picks up the moved alias.
        assert scoring_server.resolve_servable(served["champion"]) == f"models:/{name}/{other}"
        with serve_step(served["champion"], tmp_path / "restarted.log") as url:
            np.testing.assert_allclose(served_probabilities(url), expected[other], atol=1e-5)
    finally:
        client.set_registered_model_alias(name, registry.CHAMPION, started_on)


# --- security: basic auth --------------------------------------------------------------------

ADMIN = "admin"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth-server")
    password = secrets.token_urlsafe(18)
    config = root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
        f"admin_username = {ADMIN}\n"
        # MLflow's basic auth, plus bearer tokens (MLFLOW_TRACKING_TOKEN): tests/token_auth.py
        "authorization_function = token_auth:authenticate\n"
        f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n")  # as `make server AUTH=1`
    token = secrets.token_urlsafe(18)
    server = start_tracking_server(
        root, extra_args=["--app-name", "basic-auth"],
        env={"MLFLOW_AUTH_CONFIG_PATH": str(config),
             # Read once, when the admin user is first created; never written to a file.
             "MLFLOW_AUTH_ADMIN_PASSWORD": password,
             "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
             "LIGHTCYCLE_TEST_BEARER": f"{ADMIN}:{token}",
             "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "tests"),
                                            os.environ.get("PYTHONPATH", "")])})
    yield {"url": server.url, "password": password, "root": root, "token": token}
    stop_process(server.proc)


def _without_credentials() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARS}


def _as(url: str, user: str | None, password: str | None) -> dict[str, str]:
    env = {**_without_credentials(), "MLFLOW_TRACKING_URI": url}
    if user:
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    return env


@pytest.fixture(scope="module")
def auth_chain(auth_server):
    env = _as(auth_server["url"], ADMIN, auth_server["password"])
    name = f"auth-{uuid.uuid4().hex[:6]}"
    result = subprocess.run(["mlflow", "run", str(PROJECT_ROOT), "-e", "main", "--env-manager",
                             "local", "-P", "epochs=1", "-P", f"model_name={name}",
                             "-P", "min_accuracy=0.1"],
                            capture_output=True, text=True, timeout=900, env=env, cwd=PROJECT_ROOT)
    return {"result": result, "name": name, "deployable": registry.deployable_name(name)}


@pytest.mark.xdist_group("faults-auth")
def test_auth_chain_runs_with_credentials_from_the_environment(auth_server, auth_chain,
                                                                monkeypatch):
    result = check(auth_chain["result"])
    assert auth_server["password"] not in result.stdout + result.stderr
    for var, value in _as(auth_server["url"], ADMIN, auth_server["password"]).items():
        if var.startswith("MLFLOW_TRACKING"):
            monkeypatch.setenv(var, value)
    client = MlflowClient(auth_server["url"])
    champion = client.get_model_version_by_alias(auth_chain["deployable"], registry.CHAMPION)
    assert champion.version == "1"
    server_log = (auth_server["root"] / "server.log").read_text()
    assert auth_server["password"] not in server_log


@pytest.mark.xdist_group("faults-auth")
def test_auth_a_token_in_mlflow_tracking_token_is_a_credential(auth_server, auth_chain):
    """MLFLOW_TRACKING_TOKEN alone (no user, no password), through `mlflow run`; a wrong one is
    refused naming the variable, never printing the token."""
    check(auth_chain["result"])
    env = {**_without_credentials(), "MLFLOW_TRACKING_URI": auth_server["url"],
           "MLFLOW_TRACKING_TOKEN": auth_server["token"]}
    champion = f"models:/{auth_chain['deployable']}@champion"
    result = subprocess.run(["mlflow", "run", str(PROJECT_ROOT), "-e", "lineage", "--env-manager",
                             "local", "-P", f"model_uri={champion}"], capture_output=True,
                            text=True, timeout=300, env=env, cwd=PROJECT_ROOT)
    check(result)
    assert f"{champion} -> models:/{auth_chain['deployable']}/1 " in result.stdout, result.stdout
    assert auth_server["token"] not in result.stdout + result.stderr
    env["MLFLOW_TRACKING_TOKEN"] = "not-the-token"
    refused = subprocess.run([sys.executable, "steps/lineage.py", "--model_uri", champion],
                             capture_output=True, text=True, timeout=120, env=env, cwd=PROJECT_ROOT)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "refused the credentials of the token in MLFLOW_TRACKING_TOKEN" in refused.stderr
    assert "not-the-token" not in refused.stdout + refused.stderr


STEP_ARGS = {
    "main": [], "train": ["--epochs", "1"], "register": ["--run_id", "0" * 32],
    "torchscript": ["--model_uri", "models:/x/1"], "promote": ["--model_name", "x"],
    "lineage": [], "serve": ["--port", "1"], "predict": ["--input", "x"],
}


@pytest.mark.xdist_group("faults-auth")
@pytest.mark.parametrize("credentials", ["missing", "wrong"])
def test_auth_every_step_fails_at_once_with_a_clear_message(auth_server, credentials):
    env = _as(auth_server["url"], *((None, None) if credentials == "missing"
                                    else (ADMIN, "not-the-password")))
    needle = ("requires credentials" if credentials == "missing"
              else f"refused the credentials of user '{ADMIN}'")
    # Every step without credentials; a wrong password once is enough (same code path).
    steps = STEP_ARGS if credentials == "missing" else {"promote": STEP_ARGS["promote"]}
    for step, args in steps.items():
        result = subprocess.run([sys.executable, f"steps/{step}.py", *args], capture_output=True,
                                text=True, timeout=120, env=env, cwd=PROJECT_ROOT)
        assert result.returncode == 2, (step, result.stderr[-2000:])
        assert needle in result.stderr and "MLFLOW_TRACKING_PASSWORD" in result.stderr, step
        assert "Traceback" not in result.stderr, (step, result.stderr[-2000:])
    # Through `mlflow run`, MLflow's own CLI creates the run first and fails there, at once,
    # before any step code runs; nothing is created.
    before = requests.post(auth_server["url"] + "/api/2.0/mlflow/runs/search",
                           json={"experiment_ids": ["0"]},
                           auth=(ADMIN, auth_server["password"]), timeout=30).json()
    result = subprocess.run(["mlflow", "run", str(PROJECT_ROOT), "-e", "promote",
                             "--env-manager", "local"], capture_output=True, text=True,
                            timeout=120, env=env, cwd=PROJECT_ROOT)
    assert result.returncode != 0
    assert "401" in result.stderr
    after = requests.post(auth_server["url"] + "/api/2.0/mlflow/runs/search",
                          json={"experiment_ids": ["0"]},
                          auth=(ADMIN, auth_server["password"]), timeout=30).json()
    assert after == before


@pytest.mark.xdist_group("faults-auth")
def test_auth_read_only_user_cannot_move_champion_but_loads_and_serves_it(
        auth_server, auth_chain, monkeypatch, tmp_path):
    check(auth_chain["result"])
    name = auth_chain["deployable"]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_server["password"])
    from mlflow.server import get_app_client

    admin = get_app_client("basic-auth", tracking_uri=auth_server["url"])
    viewer_password = secrets.token_urlsafe(18)
    admin.create_user("viewer", viewer_password)
    admin.grant_user_permission("viewer", "registered_model", name, "READ")
    client = MlflowClient(auth_server["url"])
    before = client.get_model_version_by_alias(name, registry.CHAMPION).version

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "viewer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", viewer_password)
    # The viewer can read the champion...
    assert client.get_model_version_by_alias(name, registry.CHAMPION).version == before
    # ...but not move it, nor delete it.
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|403|Permission denied"):
        client.set_registered_model_alias(name, registry.CHAMPION, before)
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|403|Permission denied"):
        client.delete_registered_model_alias(name, registry.CHAMPION)

    # The viewer loads the champion and serves it, as README's "Running for a team" says.
    test = data.load_split(SAMPLE_DIR, "test")
    pixels = test.images[:8, None].astype(np.float32)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server["url"])
    mlflow.set_tracking_uri(auth_server["url"])
    try:
        loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(pixels)
    finally:
        mlflow.set_tracking_uri(None)
    port = free_port()
    log = tmp_path / "viewer-serve.log"
    proc = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
         "-p", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tmp_path,
        start_new_session=True,
        env={**_as(auth_server["url"], "viewer", viewer_password)})
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, timeout=180, log=log)
        served = requests.post(f"http://127.0.0.1:{port}/invocations",
                               json={"inputs": pixels.tolist()}, timeout=60)
        assert served.status_code == 200, served.text[:2000]
    finally:
        stop_process(proc)
    assert [row["class_id"] for row in served.json()["predictions"]] == list(loaded["class_id"])
    assert viewer_password not in log.read_text()

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_server["password"])
    assert client.get_model_version_by_alias(name, registry.CHAMPION).version == before
