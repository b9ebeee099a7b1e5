"""Shared fixtures: a real `mlflow server` on 127.0.0.1 and helpers to run entry points.

Servers: `tracking_server` is the sqlite one every test gets by default. `backend_server` is a
server per backend (sqlite, postgresql): a test that uses it, directly, through
`backend_experiment`, or through a module's `tracking_server` override (see test_chain.py),
runs once per backend; `@pytest.mark.backends("sqlite")` narrows that. The postgresql variant runs on a throw-away PostgreSQL cluster and is
skipped, saying why, where PostgreSQL is not installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from lightcycle.operations.postgres import PostgresCluster, postgres_unavailable_reason
from processes import free_port, stop_process, wait_for_http  # noqa: F401 - re-exported to tests
from synthetic import FULL_SIZE, synthetic_data_dir

pytest_plugins = ["strict"]  # LIGHTCYCLE_STRICT=1: skips fail the run (tests/strict.py)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = PROJECT_ROOT / "data" / "sample"
VENV_BIN = str(Path(sys.executable).parent)

# `mlflow run` and `mlflow models serve` exec `python`/`uvicorn` by name: the venv leads PATH.
os.environ["PATH"] = VENV_BIN + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# One OpenMP thread per torch process. The suite runs two workers, and many tests run
# processes side by side (two chains, DDP ranks, tune workers, servers under load); torch's
# default of one thread per core then oversubscribes the cores, and OpenMP's spinning threads
# made two 2-thread trainings on 2 cores 5x slower per epoch than two 1-thread ones (BENCHMARKS.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")


BACKENDS = ("sqlite", "postgresql")
# The server's GenAI job runner (8 huey processes per server) serves nothing lightcycle uses.
NO_SERVER_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@dataclass
class TrackingServer:
    url: str
    root: Path
    proc: subprocess.Popen
    backend: str = "sqlite"
    cluster: PostgresCluster | None = None  # the postgresql backend's cluster

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"


def start_tracking_server(root: Path, backend_uri: str | None = None, port: int | None = None,
                          extra_args: list[str] | None = None,
                          env: dict[str, str] | None = None) -> TrackingServer:
    """`mlflow server` on 127.0.0.1. Pass the same root, backend and port to restart one."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    backend_uri = backend_uri or f"sqlite:///{root / 'mlflow.db'}"
    log = root / "server.log"
    proc = subprocess.Popen(
        [os.path.join(VENV_BIN, "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", backend_uri,
         "--artifacts-destination", str(root / "artifacts"), *(extra_args or [])],
        stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **NO_SERVER_JOBS, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/health", proc, timeout=120, log=log)
    except BaseException:
        stop_process(proc)
        raise
    return TrackingServer(url, root, proc)


@pytest.fixture(scope="session")
def sqlite_server(tmp_path_factory):
    server = start_tracking_server(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    stop_process(server.proc)


@pytest.fixture(scope="session")
def postgresql_cluster(tmp_path_factory):
    """A throw-away PostgreSQL cluster on 127.0.0.1 with a database `mlflow`."""
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(f"PostgreSQL backend not tested: {reason}")
    # pytest's tmp dirs are closed to other users; the cluster's owner (postgres) needs its own.
    root = Path(tempfile.mkdtemp(prefix="lightcycle-pg-"))
    root.chmod(0o755)
    cluster = PostgresCluster(root / "cluster", free_port(),
                              pgpass=tmp_path_factory.mktemp("pgpass") / "pgpass")
    try:
        cluster.init()
        cluster.start()
        cluster.create_database("mlflow")
        yield cluster
    finally:
        try:
            cluster.stop()
        except Exception:
            cluster.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgresql_server(postgresql_cluster, tmp_path_factory):
    server = start_tracking_server(tmp_path_factory.mktemp("mlflow-server-pg"),
                                   backend_uri=postgresql_cluster.uri("mlflow"),
                                   env=postgresql_cluster.env())
    server.backend, server.cluster = "postgresql", postgresql_cluster
    yield server
    stop_process(server.proc)


@pytest.fixture(scope="session")
def backend_server(request):
    """The server on each backend: parametrized by pytest_generate_tests below."""
    return request.getfixturevalue(f"{request.param}_server")


def pytest_generate_tests(metafunc):
    if "backend_server" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        backends = marker.args if marker else BACKENDS
        # Session scope: pytest groups the tests by backend, so each server (and each
        # module-scoped fixture built on it, like test_chain's chain) is set up once per backend.
        metafunc.parametrize("backend_server", backends, indirect=True, ids=backends,
                             scope="session")


@pytest.fixture(scope="session")
def tracking_server(sqlite_server):
    """The default server: sqlite. Modules that must run on every backend override this
    with `def tracking_server(backend_server): return backend_server`."""
    return sqlite_server


@pytest.fixture
def tracking_uri(tracking_server, monkeypatch):
    """Point this test process (and everything it starts) at the session's server."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.url)
    mlflow.set_tracking_uri(tracking_server.url)
    yield tracking_server.url
    mlflow.set_tracking_uri(None)


@pytest.fixture
def experiment(tracking_uri, monkeypatch):
    """A fresh experiment per test, so cache lookups never see another test's runs."""
    import mlflow

    name = f"test-{uuid.uuid4().hex[:10]}"
    experiment_id = mlflow.create_experiment(name)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@pytest.fixture
def backend_experiment(backend_server, monkeypatch):
    """`experiment`, on the server of each backend: the test runs once per backend.

    For one test in a module that otherwise stays on sqlite; use it instead of
    tracking_uri/experiment (which follow `tracking_server`). Returns (server, experiment_id).
    """
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", backend_server.url)
    mlflow.set_tracking_uri(backend_server.url)
    experiment_id = mlflow.create_experiment(f"test-{uuid.uuid4().hex[:10]}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    mlflow.set_experiment(experiment_id=experiment_id)
    yield backend_server, experiment_id
    mlflow.set_tracking_uri(None)


@pytest.fixture
def model_name():
    return f"fashion-{uuid.uuid4().hex[:8]}"


def mlflow_run(entry_point: str, params: dict[str, object] | None = None,
               experiment_id: str | None = None, timeout: float = 900,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`mlflow run . -e <entry_point> --env-manager local -P k=v ...`, as a user types it."""
    cmd = ["mlflow", "run", str(PROJECT_ROOT), "-e", entry_point, "--env-manager", "local"]
    if experiment_id:
        cmd += ["--experiment-id", experiment_id]
    for key, value in (params or {}).items():
        cmd += ["-P", f"{key}={value}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=PROJECT_ROOT)


@contextlib.contextmanager
def serve_step(model_uri: str, log: Path, env: dict[str, str] | None = None,
               timeout: float = 180):
    """`mlflow run . -e serve -P model_uri=...` on a free port, as a user starts it; yields its
    URL once /ping answers, and stops it (the whole process group) afterwards."""
    port = free_port()
    proc = subprocess.Popen(
        ["mlflow", "run", str(PROJECT_ROOT), "-e", "serve", "--env-manager", "local",
         "-P", f"model_uri={model_uri}", "-P", f"port={port}"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
        env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, timeout=timeout, log=log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def runs_of(experiment_id: str, entry_point: str | None = None, status: str | None = None):
    from mlflow import MlflowClient

    clauses = []
    if entry_point:
        clauses.append(f"tags.`mlflow.project.entryPoint` = '{entry_point}'")
    if status:
        clauses.append(f"attributes.status = '{status}'")
    return MlflowClient().search_runs([experiment_id], " and ".join(clauses),
                                      max_results=1000)


def copy_sample(dest: Path) -> Path:
    shutil.copytree(SAMPLE_DIR / "FashionMNIST", dest / "FashionMNIST")
    return dest


SAMPLE_CHAIN_MODEL = "sample-fashion"


@pytest.fixture(scope="session")
def sample_chain(sqlite_server):
    """One documented `main` (1 epoch, both deployables) on the default server, shared by the
    modules that only read what it registered (serving, Spark). Modules that move aliases or
    count runs make their own chain. Returns what it made."""
    from mlflow import MlflowClient

    experiment_id = MlflowClient(sqlite_server.url).create_experiment("sample-chain")
    params = {"epochs": 1, "model_name": SAMPLE_CHAIN_MODEL, "min_accuracy": 0.1,
              "deployable": "both"}
    result = check(mlflow_run("main", params, experiment_id,
                              env={"MLFLOW_TRACKING_URI": sqlite_server.url}))
    return {"experiment": experiment_id, "name": SAMPLE_CHAIN_MODEL, "params": params,
            "stdout": result.stdout, "stderr": result.stderr,
            "champion": f"models:/{SAMPLE_CHAIN_MODEL}-scripted@champion",
            "pt2_champion": f"models:/{SAMPLE_CHAIN_MODEL}-pt2@champion"}


@pytest.fixture(scope="module")
def tracked_sample_chain(sample_chain, tracking_server):
    """`sample_chain`, with this process's MLflow pointed at its server for the whole module:
    module fixtures that load its models cannot use the per-test `tracking_uri`."""
    import mlflow

    mlflow.set_tracking_uri(tracking_server.url)
    yield sample_chain
    mlflow.set_tracking_uri(None)


# --- the checkout stays as it was ------------------------------------------------------------
# Every test writes under pytest's tmp dirs or its own temp copy of the project; anything new
# in the checkout (ignored files included) after the session fails the run. On the controller
# only (xdist workers share it).

def checkout_listing() -> set[str] | None:
    """What git sees in the checkout, ignored files included; None outside a git checkout."""
    result = subprocess.run(["git", "status", "--porcelain", "--ignored=matching",
                             "--untracked-files=all"], cwd=PROJECT_ROOT, capture_output=True,
                            text=True)
    if result.returncode != 0:
        return None
    own = (".venv", ".pytest_cache/")  # the venv `make` builds; pytest's own cache
    return {line[3:] for line in result.stdout.splitlines() if not line[3:].startswith(own)}


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):
        session.config._checkout_before = checkout_listing()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_checkout_before", None)
    if before is None or hasattr(session.config, "workerinput"):
        return
    added = sorted((checkout_listing() or set()) - before)
    if added:
        session.config.get_terminal_writer().line(
            "the tests left files in the checkout (they belong under a tmp dir): "
            + ", ".join(added[:20]), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- scheduling on pytest-xdist workers (`make test` runs `-n 2 --dist loadgroup`) ----------
# Each module is one xdist group per tracking backend, so its module-scoped fixtures are built
# once, on one worker; modules that share a session fixture name one group
# (`pytest.mark.xdist_group`). A worker takes the next group when it is nearly done with its
# own, in collection order: the longest groups go first, so no long one starts last while the
# other worker idles. Heaviest first, by their measured seconds (BENCHMARKS.md); `make test`
# passes --no-loadscope-reorder, or xdist would put the groups with the most tests first.
LONGEST_GROUPS_FIRST = (
    "test_chain-sqlite", "sample-chain", "test_faults", "test_readme", "faults-auth", "test_tune",
    "test_chain-postgresql", "faults-concurrent-sqlite", "test_train", "test_postgres-postgresql",
    "test_docker", "faults-concurrent-postgresql",
)


def pytest_itemcollected(item):
    marker = item.get_closest_marker("xdist_group")
    group = marker.args[0] if marker else item.module.__name__.rsplit(".", 1)[-1]
    # A test on a backend: the session servers' `backend_server`, or a module's own fixture
    # parametrized by BACKENDS (test_follow's servers that it restarts).
    params = item.callspec.params if hasattr(item, "callspec") else {}
    backend = params.get("backend_server") or next(
        (value for value in params.values() if isinstance(value, str) and value in BACKENDS), None)
    if backend:
        group = f"{group}-{backend}"
        item.own_markers[:] = [m for m in item.own_markers if m.name != "xdist_group"]
    if backend or not marker:
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by parametrized fixtures
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_GROUPS_FIRST)}

    def group(item) -> str:
        return item.get_closest_marker("xdist_group").args[0]

    # Stable: the items of a group (and of a module) keep their order and stay together.
    items.sort(key=lambda item: rank.get(group(item), len(rank)))


@pytest.fixture(scope="session")
def full_size_data(tmp_path_factory) -> Path:
    """A data_dir of the real data set's size (60,000 train / 10,000 test), built from the
    sample on the fly and never committed: what users run on."""
    return synthetic_data_dir(tmp_path_factory.mktemp("full-size"), **FULL_SIZE)
