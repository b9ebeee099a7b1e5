"""`main` end to end (3 epochs) and fully cached, on a fresh sqlite store (no server); the
import cost of each step's module in a fresh interpreter.

    PATH=.venv/bin:$PATH python -m bench.chain.chain
"""

import os
import statistics
import sys
import tempfile

from bench.common import child_env, command_line, report, sqlite_store, timed_run

STEP_MODULES = {
    "train": "lightcycle.training.train", "register": "lightcycle.lifecycle.registry",
    "torchscript": "lightcycle.lifecycle.export", "promote": "lightcycle.lifecycle.promote",
    "main": "lightcycle.lifecycle.pipeline", "lineage": "lightcycle.lifecycle.lineage", "serve": "lightcycle.serving.scoring_server",
}


def import_cost(module: str) -> tuple[float, bool]:
    code = f"import {module}, sys; print('lightning' in sys.modules)"
    runs = [timed_run([sys.executable, "-c", code]) for _ in range(3)]
    return statistics.median(s for s, _ in runs), runs[-1][1].strip().endswith("True")


def main(argv: list[str] | None = None) -> dict:
    command_line(__doc__).parse_args(argv)
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = child_env(MLFLOW_TRACKING_URI=sqlite_store(tmp))
        cmd = ["mlflow", "run", ".", "--env-manager", "local", "-P", "epochs=3"]
        figures["main_3_epochs_s"] = round(timed_run(cmd, env)[0], 1)
        figures["main_cached_rerun_s"] = round(timed_run(cmd, env)[0], 1)
    figures["goals"] = goals = {"main_3_epochs_s": 60, "main_cached_rerun_s": 15}
    figures["load_average_1_5_15"] = os.getloadavg()
    figures["step_import_s"] = {step: dict(zip(("seconds", "imports_lightning"), import_cost(module)))
                                for step, module in STEP_MODULES.items()}
    rows = [[label, figures[key], f"<= {goals[key]}"] for key, label in (
        ("main_3_epochs_s", "`main`, 3 epochs, fresh sqlite store"),
        ("main_cached_rerun_s", "the same command again, every step reused"))]
    rows += [[f"import of the `{step}` step" + (" (imports Lightning)" if cost["imports_lightning"] else ""),
              round(cost["seconds"], 2), ""] for step, cost in figures["step_import_s"].items()]
    return report("chain", figures,
                  (["measure", "seconds", "goal"], rows))


if __name__ == "__main__":
    main()
