"""`make demo`: the whole chain on the bundled sample, with the default sqlite store; it needs
no network once the venv is built."""

from __future__ import annotations

import os
import subprocess
import sys

from lightcycle.lifecycle.tracking import PROJECT_ROOT

EXPERIMENT = "lightcycle"  # a named experiment, not MLflow's `Default`


def main() -> int:
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    uri = os.environ["MLFLOW_TRACKING_URI"]
    if not os.environ.get("MLFLOW_EXPERIMENT_ID"):  # `mlflow run` refuses both
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    variable = ("MLFLOW_EXPERIMENT_ID" if os.environ.get("MLFLOW_EXPERIMENT_ID")
                else "MLFLOW_EXPERIMENT_NAME")
    experiment = os.environ[variable]
    print(f"lightcycle demo: `mlflow run .` on the bundled sample, tracking to {uri}, "
          f"experiment {experiment}", flush=True)
    code = subprocess.call(["mlflow", "run", ".", "--env-manager", "local"], cwd=PROJECT_ROOT)
    if code == 0:
        print(
            "\nLook at it:\n"
            f"  mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000\n"
            f"  Experiments > {experiment}: the main run and its step runs (train-..., register-...,\n"
            "  torchscript-..., promote-...); Models: lightcycle-fashion-scripted, each version's\n"
            "  description (accuracy, parity, gate verdict) and @champion.\n"
            f"  export MLFLOW_TRACKING_URI={uri} {variable}={experiment}\n"
            "  mlflow run . -e lineage --env-manager local        # the chain behind the champion\n"
            "  mlflow run . -e serve --env-manager local          # serve it on 127.0.0.1:5001"
        )
    return code

if __name__ == "__main__":
    sys.exit(main())
