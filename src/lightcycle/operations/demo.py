"""`make demo`: the whole chain on the bundled sample, with the default sqlite store; it needs
no network once the venv is built."""

from __future__ import annotations

import os
import subprocess
import sys

from lightcycle.lifecycle.tracking import PROJECT_ROOT


def main() -> int:
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    uri = os.environ["MLFLOW_TRACKING_URI"]
    print(f"lightcycle demo: `mlflow run .` on the bundled sample, tracking to {uri}", flush=True)
    code = subprocess.call(["mlflow", "run", ".", "--env-manager", "local"], cwd=PROJECT_ROOT)
    if code == 0:
        print(
            "\nLook at it:\n"
            f"  mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000\n"
            "  Experiments > Default: the main run and its four step runs (params, metrics,\n"
            "  plots/, tensorboard/, checkpoints/); Models: lightcycle-fashion-scripted@champion.\n"
            "  mlflow run . -e lineage --env-manager local        # the chain behind the champion\n"
            "  mlflow run . -e serve --env-manager local          # serve it on 127.0.0.1:5001"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
