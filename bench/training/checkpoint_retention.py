"""Artifact bytes of a train run's checkpoints before and after retention.

    PATH=.venv/bin:$PATH python -m bench.training.checkpoint_retention [EPOCHS (40)] [MODEL (cnn)]

Runs `mlflow run . -e train -P epochs=N -P model=M` against a fresh `mlflow server` with proxied
artifacts, then sums the bytes under checkpoints/ on the server's disk: what autolog logged
(the epoch count times one checkpoint, read from the run's output) and what is left.
Writes bench/results/checkpoint_retention_<model>_<epochs>.json.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

from bench.common import (ROOT, child_env, free_port, markdown_table, save, stop_process,
                          wait_for_http)
from lightcycle.operations.tracking_server import mlflow_server_command


def main(epochs: int = 40, model: str = "cnn") -> None:
    with tempfile.TemporaryDirectory(prefix="bench-retention-") as tmp:
        port = free_port()
        server = subprocess.Popen(
            mlflow_server_command(f"sqlite:///{tmp}/mlflow.db", Path(tmp, "artifacts"),
                                  "127.0.0.1", port),
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_http(url + "/health", server, timeout=120)
            out = subprocess.run(
                ["mlflow", "run", str(ROOT), "-e", "train", "--env-manager", "local",
                 "-P", f"epochs={epochs}", "-P", f"model={model}"],
                capture_output=True, text=True, check=True, cwd=ROOT,
                env=child_env(MLFLOW_TRACKING_URI=url)).stdout
        finally:
            stop_process(server)
        dirs = list(Path(tmp, "artifacts").rglob("checkpoints/epoch_*"))
        kept = sum(f.stat().st_size for d in dirs for f in d.iterdir())
        line = next(l for l in out.splitlines() if l.startswith("checkpoints: "))
        removed_mb = float(re.search(r"\(([\d.]+) MB\)", line).group(1))
        save(f"checkpoint_retention_{model}_{epochs}", {
            "command": f"python -m bench.training.checkpoint_retention {epochs} {model}",
            "epochs": epochs, "kept_checkpoints": len(dirs), "kept_mb": round(kept / 1e6, 2),
            "before_mb": round(kept / 1e6 + removed_mb, 2), "log_line": line})


def table(figures: dict) -> str:
    return markdown_table(
        [f"checkpoints of one {figures['epochs']}-epoch run", "count", "MB"],
        [["logged by autolog (one per epoch)", figures["epochs"], figures["before_mb"]],
         ["left once the run finished", figures["kept_checkpoints"], figures["kept_mb"]]])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("epochs", type=int, nargs="?", default=40, help="default: 40")
    parser.add_argument("model", nargs="?", default="cnn", help="default: cnn")
    main(**vars(parser.parse_args()))
