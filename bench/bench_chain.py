"""`main` end to end (3 epochs) and fully cached, on a fresh sqlite store; step import costs.

    PATH=.venv/bin:$PATH .venv/bin/python bench/bench_chain.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save

ROOT = Path(__file__).resolve().parents[1]
STEP_MODULES = {
    "train": "lightcycle.train", "register": "lightcycle.registry",
    "torchscript": "lightcycle.export", "promote": "lightcycle.promote",
    "main": "lightcycle.pipeline", "lineage": "lightcycle.lineage", "serve": "lightcycle.serve",
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


def main():
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        cmd = ["mlflow", "run", ".", "--env-manager", "local", "-P", "epochs=3"]
        figures["main_3_epochs_s"] = round(timed(cmd, env), 1)
        figures["main_cached_rerun_s"] = round(timed(cmd, env), 1)
    figures["goals"] = {"main_3_epochs_s": 60, "main_cached_rerun_s": 15}
    figures["step_import_s"] = {}
    for step, module in STEP_MODULES.items():
        seconds, lightning = import_cost(module)
        figures["step_import_s"][step] = {"seconds": round(seconds, 2), "imports_lightning": lightning}
    save("chain", figures)


if __name__ == "__main__":
    main()
