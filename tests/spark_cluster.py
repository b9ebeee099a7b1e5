"""A real Spark standalone cluster on 127.0.0.1: one master and two workers from pyspark's own
jars (`bin/spark-class org.apache.spark.deploy.master.Master` / `...deploy.worker.Worker`),
each worker with one core, 1 GiB and its own work directory, started once per test session.

Each worker's executors get their own processes and directories, so what a real cluster does
differently from local[N] (executors in other JVMs, with other working directories, that do not
inherit the driver's environment) happens here. The workers start without OMP_NUM_THREADS, as
on a cluster node: torch there defaults to one thread per core of the machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from processes import free_port, stop_process, wait_for_http

WORKERS = 2


@dataclass
class SparkCluster:
    url: str  # spark://127.0.0.1:PORT
    ui: str  # the master's web UI (its /json/ lists workers and applications)
    work_dirs: list[Path]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def executor_logs(self, app_id: str) -> dict[Path, str]:
        """Every executor's stderr of application `app_id`, by worker work directory."""
        return {work: "".join(p.read_text(errors="replace")
                              for p in sorted((work / app_id).glob("*/stderr")))
                for work in self.work_dirs if (work / app_id).is_dir()}

    def applications(self) -> list[dict]:
        state = requests.get(self.ui + "/json/", timeout=10).json()
        return state.get("activeapps", []) + state.get("completedapps", [])

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)


def _spark_class() -> str:
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-class")


def start_cluster(root: Path) -> SparkCluster:
    root.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
               SPARK_NO_DAEMONIZE="1")
    port, ui_port = free_port(), free_port()
    cluster = SparkCluster(f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{ui_port}",
                           [root / f"worker-{i}" for i in range(WORKERS)])

    def launch(name: str, *args: str) -> subprocess.Popen:
        log = root / f"{name}.log"
        proc = subprocess.Popen([_spark_class(), *args], stdout=log.open("w"),
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        cluster.procs.append(proc)
        return proc

    try:
        master = launch("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                        "--port", str(port), "--webui-port", str(ui_port))
        wait_for_http(cluster.ui + "/json/", master, timeout=120, log=root / "master.log")
        for i, work in enumerate(cluster.work_dirs):
            work.mkdir()
            launch(f"worker-{i}", "org.apache.spark.deploy.worker.Worker", cluster.url,
                   "--host", "127.0.0.1", "--cores", "1", "--memory", "1g",
                   "--work-dir", str(work), "--webui-port", str(free_port()))
        _wait_for_workers(cluster, root)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for_workers(cluster: SparkCluster, root: Path, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = requests.get(cluster.ui + "/json/", timeout=10).json()
        if sum(w["state"] == "ALIVE" for w in state.get("workers", [])) == WORKERS:
            return
        if any(p.poll() is not None for p in cluster.procs):
            break
        time.sleep(0.5)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted(root.glob("*.log")))
    raise RuntimeError(f"the Spark workers did not register within {timeout}s:\n{logs}")


@pytest.fixture(scope="session")
def spark_cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("spark-cluster"))
    yield cluster
    cluster.stop()
