"""Artifact bytes of a train run's checkpoints before and after retention (issue 22).

    python bench/bench_checkpoint_retention.py [epochs=40] [model=cnn]

Runs `mlflow run . -e train -P epochs=N -P model=M` against a fresh `mlflow server` with proxied
artifacts, then sums the bytes under checkpoints/ on the server's disk: what autolog logged
(the epoch count times one checkpoint, read from the run's output) and what is left.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import free_port, save, stop_process, wait_for_http

ROOT = Path(__file__).resolve().parents[1]


def main(epochs: int = 40, model: str = "cnn") -> None:
    with tempfile.TemporaryDirectory(prefix="bench-retention-") as tmp:
        port = free_port()
        server = subprocess.Popen(
            ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
             "--artifacts-destination", f"{tmp}/artifacts"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_http(url + "/health", server, timeout=120)
            out = subprocess.run(
                ["mlflow", "run", str(ROOT), "-e", "train", "--env-manager", "local",
                 "-P", f"epochs={epochs}", "-P", f"model={model}"],
                capture_output=True, text=True, check=True, cwd=ROOT,
                env={**os.environ, "MLFLOW_TRACKING_URI": url}).stdout
        finally:
            stop_process(server)
        dirs = list(Path(tmp, "artifacts").rglob("checkpoints/epoch_*"))
        kept = sum(f.stat().st_size for d in dirs for f in d.iterdir())
        line = next(l for l in out.splitlines() if l.startswith("checkpoints: "))
        removed_mb = float(re.search(r"\(([\d.]+) MB\)", line).group(1))
        save(f"checkpoint_retention_{model}_{epochs}", {
            "command": f"python bench/bench_checkpoint_retention.py {epochs} {model}",
            "epochs": epochs, "kept_checkpoints": len(dirs), "kept_mb": round(kept / 1e6, 2),
            "before_mb": round(kept / 1e6 + removed_mb, 2), "log_line": line})


if __name__ == "__main__":
    main(*(int(a) if a.isdigit() else a for a in sys.argv[1:]))
