"""Time to log one model version (eager, with explicit requirements) and to register it.

    PATH=.venv/bin:$PATH python -m bench.chain.log_model
"""

import os
import statistics
import tempfile

import mlflow

from bench.common import report, sqlite_store, timed
from lightcycle.lifecycle import model_io
from lightcycle.model.nets import build_net


def main(argv: list[str] | None = None, repeats: int = 5) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(sqlite_store(tmp))
        # Artifacts beside the store: a sqlite store's default, ./mlruns, is the checkout's.
        mlflow.set_experiment(experiment_id=mlflow.create_experiment(
            "bench", artifact_location=os.path.join(tmp, "artifacts")))
        net = build_net("cnn").eval()
        log_times, register_times = [], []
        with mlflow.start_run():
            model_io.log_eager_model(net, name="warmup")
            for i in range(repeats):
                seconds, info = timed(model_io.log_eager_model, net, name=f"model{i}")
                log_times.append(seconds)
                register_times.append(timed(mlflow.register_model, info.model_uri, "bench-model")[0])
    figures = {"log_model_s_median": round(statistics.median(log_times), 3),
               "log_model_s_max": round(max(log_times), 3),
               "register_s_median": round(statistics.median(register_times), 3), "goal_s": 1.0}
    return report("log_model", figures, (["measure", "seconds", "goal"], [
        ["log one model version (eager, explicit requirements), median",
         figures["log_model_s_median"], f"<= {figures['goal_s']}"],
        ["the same, slowest", figures["log_model_s_max"], ""],
        ["register that version, median", figures["register_s_median"], ""]]))


if __name__ == "__main__":
    main()
