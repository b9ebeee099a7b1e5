"""`main` end to end (3 epochs) and fully cached, on a fresh store; step import costs.

    PATH=.venv/bin:$PATH python -m bench.chain.chain [--backend B]

Backends: `sqlite` (default: the sqlite:/// file URI, no server; also measures step import
costs), `sqlite-server` and `postgresql` (a local `mlflow server --workers 1` with proxied
artifacts on that store; postgresql on a throw-away cluster). Results: bench/results/chain*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, child_env, free_port, markdown_table, save, sqlite_store
from lightcycle.operations.postgres import PostgresCluster
from lightcycle.operations.tracking_server import mlflow_server_command, wait_healthy

STEP_MODULES = {
    "train": "lightcycle.training.train", "register": "lightcycle.lifecycle.registry",
    "torchscript": "lightcycle.lifecycle.export", "promote": "lightcycle.lifecycle.promote",
    "main": "lightcycle.lifecycle.pipeline", "lineage": "lightcycle.lifecycle.lineage", "serve": "lightcycle.serving.scoring_server",
}


def timed(cmd, env) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
    return time.perf_counter() - start


def import_cost(module: str) -> tuple[float, bool]:
    code = f"import {module}, sys; print('lightning' in sys.modules)"
    times, uses_lightning = [], None
    for _ in range(3):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                             text=True)
        times.append(time.perf_counter() - start)
        uses_lightning = out.stdout.strip() == "True"
    return statistics.median(times), uses_lightning


@contextlib.contextmanager
def tracking(backend: str, tmp: Path):
    """Yields (tracking URI, extra env) for a fresh store on `backend`."""
    if backend == "sqlite":
        yield sqlite_store(tmp), {}
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
    proc = subprocess.Popen(mlflow_server_command(uri, tmp / "artifacts", "127.0.0.1", port),
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        yield f"http://127.0.0.1:{port}", {}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(root, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["sqlite", "sqlite-server", "postgresql"],
                        default="sqlite")
    args = parser.parse_args()
    figures = {"backend": args.backend}
    with tempfile.TemporaryDirectory() as tmp, tracking(args.backend, Path(tmp)) as (uri, extra):
        env = child_env(**extra, MLFLOW_TRACKING_URI=uri)
        cmd = ["mlflow", "run", ".", "--env-manager", "local", "-P", "epochs=3"]
        figures["main_3_epochs_s"] = round(timed(cmd, env), 1)
        figures["main_cached_rerun_s"] = round(timed(cmd, env), 1)
    figures["goals"] = {"main_3_epochs_s": 60, "main_cached_rerun_s": 15}
    figures["load_average_1_5_15"] = os.getloadavg()
    if args.backend != "sqlite":
        save(f"chain-{args.backend}", figures)
        return
    figures["step_import_s"] = {}
    for step, module in STEP_MODULES.items():
        seconds, lightning = import_cost(module)
        figures["step_import_s"][step] = {"seconds": round(seconds, 2), "imports_lightning": lightning}
    save("chain", figures)


def table(figures: dict) -> str:
    goals = figures["goals"]
    rows = [[f"`main`, 3 epochs, fresh {figures['backend']} store", figures["main_3_epochs_s"],
             f"<= {goals['main_3_epochs_s']}"],
            ["the same command again, every step reused", figures["main_cached_rerun_s"],
             f"<= {goals['main_cached_rerun_s']}"]]
    for step, cost in figures.get("step_import_s", {}).items():
        rows.append([f"import of the `{step}` step"
                     + (" (imports Lightning)" if cost["imports_lightning"] else ""),
                     cost["seconds"], ""])
    return markdown_table(["measure", "seconds", "goal"], rows)


if __name__ == "__main__":
    main()
