"""Two-process training: `train -P engine=spark` (TorchDistributor on local[2]) against Lightning's
own DDP (`devices=2 strategy=ddp`), same data, epochs and net, side by side; and Spark's start-up.

    PATH=.venv/bin:$PATH python -m bench.spark.train [--epochs 2] [--rounds 1]

Each train is `python steps/train.py ...` as `mlflow run` starts it, against one sqlite tracking
store in a temp dir, timed from process start to exit (`wall_s`); `fit_s` is the run's own
`fit_seconds` metric (Trainer.fit alone). Rounds alternate DDP and Spark, so machine drift hits
both. The Spark overhead is measured apart: a Spark session on local[2] (`session_s`) and a
TorchDistributor run of a function that only returns (`noop_distributor_s`: two barrier tasks,
each starting torchrun and one Python process).
"""

import os
import sys
import tempfile

from bench.common import child_env, command_line, report, sqlite_store, timed, timed_run

ENGINES = {
    "ddp_devices2": ["--devices", "2", "--strategy", "ddp"],
    "spark_local2": ["--engine", "spark", "--num_processes", "2"],
}


def _noop():
    return os.environ.get("RANK")


def train(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    wall, out = timed_run([sys.executable, "steps/train.py", *args], env)
    return wall, next(line.split("run_id=")[1].split()[0] for line in out.splitlines()
                      if line.startswith("run_id="))


def main(argv: list[str] | None = None) -> dict:
    parser = command_line(__doc__, rounds=1)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    import mlflow

    figures: dict = {"load_average_at_start": os.getloadavg(), "epochs": args.epochs,
                     "data": "data/sample (720 train / 80 val images), cnn"}
    with tempfile.TemporaryDirectory(prefix="bench-spark-train-") as tmp:
        uri = sqlite_store(tmp)
        env = child_env(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")
        client = mlflow.MlflowClient(uri)
        for round_ in range(args.rounds):
            for name, extra in ENGINES.items():
                wall, run_id = train(["--epochs", str(args.epochs), "--resume", "false", *extra],
                                     env)
                run = client.get_run(run_id)
                figures.setdefault(name, []).append({
                    "wall_s": round(wall, 1), "fit_s": round(run.data.metrics["fit_seconds"], 1),
                    "world_size": run.data.params["world_size"]})
                print(round_, name, figures[name][-1], flush=True)

        from lightcycle.spark import spark_session
        from pyspark.ml.torch.distributor import TorchDistributor

        seconds, spark = timed(spark_session, "local[2]", app="bench")
        figures["session_s"] = round(seconds, 1)
        figures["noop_distributor_s"] = round(timed(TorchDistributor(
            num_processes=2, local_mode=False, use_gpu=False).run, _noop)[0], 1)
        spark.stop()
    ratios = {key: round(sum(r[key] for r in figures["spark_local2"])
                         / sum(r[key] for r in figures["ddp_devices2"]), 2) for key in ("wall_s", "fit_s")}
    figures["load_average_at_end"] = os.getloadavg()
    rows = [[label, [r["wall_s"] for r in figures[name]], [r["fit_s"] for r in figures[name]]]
            for name, label in (("ddp_devices2", "Lightning DDP, `devices=2 strategy=ddp`"),
                                ("spark_local2", "Spark, `engine=spark num_processes=2`"))]
    return report("spark_train", {**figures, "spark_vs_ddp": ratios}, (
        [f"launch, epochs={args.epochs} (one figure a round)", "wall (s)", "fit (s)"],
        [*rows, ["Spark / DDP", ratios["wall_s"], ratios["fit_s"]],
         ["a `local[2]` SparkSession", figures["session_s"], ""],
         ["TorchDistributor running a no-op", figures["noop_distributor_s"], ""]]))


if __name__ == "__main__":
    main()
