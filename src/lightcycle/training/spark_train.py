"""`train -P engine=spark`: the same training, in `num_processes` Spark barrier tasks.

pyspark's TorchDistributor starts one torchrun node per task (one process, or one per GPU the
task holds) and each process runs lightcycle.training.train.train, the code a local or
torchrun launch runs. The step, as the Spark driver, owns the MLflow run: it starts it (under
`mlflow run`, it takes the one `mlflow run` made) and hands the tasks its id with the tracking
URI, the experiment and MLflow's own credential variables, so no spark.executorEnv.* setting is
needed. Rank 0 logs into that run as a local train does; the other ranks only train. The run
ends FINISHED when rank 0 is done, FAILED when the Spark job fails.

The executors need Python with this package and its requirements (torch, lightning, mlflow,
torchvision) and access to the tracking server and the data (the driver's working directory
when they see it, else data_dir as a path they see, or download=true).
"""

from __future__ import annotations

import os
import re

# MLflow's credential variables, which the driver may read from ~/.mlflow/credentials instead.
_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
_FOREIGN_VARS = ("DATABRICKS_HOST", "DATABRICKS_TOKEN")  # the `databricks` tracking URI's


def executor_env(run_id: str, experiment_id: str) -> dict[str, str]:
    """What a task needs to log into the driver's run, as environment variables: every MLFLOW_*
    variable of the driver (tracking URI, credentials, TLS settings, artifact endpoints), the
    credentials the driver reads from ~/.mlflow/credentials, and the run itself."""
    import mlflow
    from mlflow.utils.credentials import read_mlflow_creds

    env = {k: v for k, v in os.environ.items()
           if k.startswith("MLFLOW_") or k in _FOREIGN_VARS}
    env.pop("MLFLOW_EXPERIMENT_NAME", None)  # the id below says it
    creds = read_mlflow_creds()
    for name, value in zip(_CREDENTIALS, (creds.username, creds.password)):
        if value and name not in env:
            env[name] = value
    env.update(MLFLOW_TRACKING_URI=_absolute(mlflow.get_tracking_uri()),
               MLFLOW_EXPERIMENT_ID=experiment_id, MLFLOW_RUN_ID=run_id)
    return env


def _absolute(uri: str) -> str:
    """A relative sqlite path means the driver's working directory; the tasks run elsewhere."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


def train_on_spark(cfg) -> str:
    """Run the training in Spark tasks; returns the run id."""
    import mlflow

    from lightcycle import defaults
    from lightcycle.errors import UserError
    from lightcycle.lifecycle import connection, tracking
    from lightcycle.spark import require_spark, spark_job

    cfg.validate(this_machine_trains=False)  # the executors check their own GPUs
    require_spark()
    connection.check_tracking_server()
    master = "" if cfg.spark_master == defaults.AUTO else cfg.spark_master
    conf = "" if cfg.spark_conf == "none" else cfg.spark_conf
    with spark_job(master, conf, "lightcycle-train", f"local[{cfg.num_processes}]") as spark:
        from pyspark.ml.torch.distributor import TorchDistributor

        use_gpu = cfg.accelerator in ("gpu", "cuda")
        try:
            distributor = TorchDistributor(num_processes=cfg.num_processes, local_mode=False,
                                           use_gpu=use_gpu)
        except RuntimeError as exc:
            raise UserError(f"engine=spark, accelerator={cfg.accelerator}: {exc} Pass e.g. "
                            "spark_conf=spark.executor.resource.gpu.amount=1,"
                            "spark.task.resource.gpu.amount=1 (and a GPU discovery script "
                            "on the workers).") from None
        task_cores = int(spark.conf.get("spark.task.cpus", "1"))
        with mlflow.start_run() as run:
            print(f"training in {cfg.num_processes} Spark task(s) on "
                  f"{spark.sparkContext.master}, logging to run {run.info.run_id}", flush=True)
            env = executor_env(run.info.run_id, run.info.experiment_id)
            try:
                distributor.run(_task, cfg, env, os.getcwd(), task_cores)
            except Exception as exc:
                # A UserError raised in a task (bad data_dir, no GPU there) as its one line.
                found = re.search(r"lightcycle\.errors\.UserError: ([^\n]+)", str(exc))
                if found:
                    raise UserError(f"a Spark training task failed: {found[1].strip()}") from None
                raise
        # Rank 0 printed these in its task, into the executor's log: say them here, as a local
        # train does.
        output = mlflow.MlflowClient().get_run(run.info.run_id).data.tags.get(
            tracking.TAG_OUTPUT_URI, "")
        print(f"run_id={run.info.run_id} model_uri={output}", flush=True)
        return run.info.run_id


def _task(cfg, env: dict[str, str], driver_cwd: str, task_cores: int):
    """One training process in a Spark task (under torchrun)."""
    os.environ.update(env)
    if os.path.isdir(driver_cwd):  # the executor sees the driver's files: same relative paths
        os.chdir(driver_cwd)
    import torch

    torch.set_num_threads(max(1, task_cores))
    from lightcycle.training.train import train

    return train(cfg)
