"""`main` end to end (3 epochs) and fully cached, on a fresh store; step import costs.

    PATH=.venv/bin:$PATH python -m bench.chain.chain [--backend B]

Backends: `sqlite` (default: the sqlite:/// file URI, no server; also measures step import
costs), `sqlite-server` and `postgresql` (a local `mlflow server --workers 1` with proxied
artifacts on that store; postgresql on a throw-away cluster). Results: bench/results/chain*.json.
"""

import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import (child_env, command_line, free_port, report, serving, sqlite_store,
                          timed_run)
from lightcycle.operations.postgres import PostgresCluster
from lightcycle.operations.tracking_server import mlflow_server_command

STEP_MODULES = {
    "train": "lightcycle.training.train", "register": "lightcycle.lifecycle.registry",
    "torchscript": "lightcycle.lifecycle.export", "promote": "lightcycle.lifecycle.promote",
    "main": "lightcycle.lifecycle.pipeline", "lineage": "lightcycle.lifecycle.lineage", "serve": "lightcycle.serving.scoring_server",
}


def import_cost(module: str) -> tuple[float, bool]:
    code = f"import {module}, sys; print('lightning' in sys.modules)"
    runs = [timed_run([sys.executable, "-c", code]) for _ in range(3)]
    return statistics.median(s for s, _ in runs), runs[-1][1].strip().endswith("True")


@contextlib.contextmanager
def tracking(backend: str, tmp: Path):
    """Yields the tracking URI of a fresh store on `backend`."""
    if backend == "sqlite":
        yield sqlite_store(tmp)
        return
    env, cluster, root = {}, None, None
    if backend == "postgresql":
        root = Path(tempfile.mkdtemp(prefix="bench-pg-"))
        root.chmod(0o755)  # the cluster's owner (postgres) must reach it
        cluster = PostgresCluster(root / "cluster", free_port(), pgpass=tmp / "pgpass")
        cluster.init()
        cluster.start()
        cluster.create_database("mlflow")
        uri, env = cluster.uri("mlflow"), cluster.env()
    else:
        uri = f"sqlite:///{tmp}/mlflow.db"
    port = free_port()
    try:
        with serving(mlflow_server_command(uri, tmp / "artifacts", "127.0.0.1", port),
                     f"http://127.0.0.1:{port}/health", {**os.environ, **env}):
            yield f"http://127.0.0.1:{port}"
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    parser = command_line(__doc__)
    parser.add_argument("--backend", choices=["sqlite", "sqlite-server", "postgresql"],
                        default="sqlite")
    args = parser.parse_args(argv)
    figures = {"backend": args.backend}
    with tempfile.TemporaryDirectory() as tmp, tracking(args.backend, Path(tmp)) as uri:
        env = child_env(MLFLOW_TRACKING_URI=uri)
        cmd = ["mlflow", "run", ".", "--env-manager", "local", "-P", "epochs=3"]
        figures["main_3_epochs_s"] = round(timed_run(cmd, env)[0], 1)
        figures["main_cached_rerun_s"] = round(timed_run(cmd, env)[0], 1)
    figures["goals"] = goals = {"main_3_epochs_s": 60, "main_cached_rerun_s": 15}
    figures["load_average_1_5_15"] = os.getloadavg()
    if args.backend == "sqlite":  # the step imports do not depend on the store
        figures["step_import_s"] = {step: dict(zip(("seconds", "imports_lightning"), import_cost(module)))
                                    for step, module in STEP_MODULES.items()}
    rows = [[label, figures[key], f"<= {goals[key]}"] for key, label in (
        ("main_3_epochs_s", f"`main`, 3 epochs, fresh {args.backend} store"),
        ("main_cached_rerun_s", "the same command again, every step reused"))]
    rows += [[f"import of the `{step}` step" + (" (imports Lightning)" if cost["imports_lightning"] else ""),
              round(cost["seconds"], 2), ""] for step, cost in figures.get("step_import_s", {}).items()]
    return report("chain" if args.backend == "sqlite" else f"chain-{args.backend}", figures,
                  (["measure", "seconds", "goal"], rows))


if __name__ == "__main__":
    main()
