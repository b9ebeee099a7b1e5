"""`predict -P engine=spark` (mlflow.pyfunc.spark_udf on a registered champion) and
`train -P engine=spark` (TorchDistributor), on local[2] and on a real standalone cluster.

One Spark session for the in-process tests of this module; each `mlflow run . -e <step>
-P engine=spark`, as a user types it, starts its own. The `standalone` tests share one
cluster per session (tests/spark_cluster.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import test_faults as faults
from conftest import PROJECT_ROOT, SAMPLE_DIR, VENV_BIN, check, mlflow_run, runs_of
from lightcycle.model import data
from spark_cluster import spark_cluster  # noqa: F401 - the session's standalone cluster
from lightcycle.serving import spark_scoring
from lightcycle.errors import UserError

# The session's shared chain (conftest.sample_chain): read here, never changed.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sample-chain")]
PIXEL_COLUMNS = [f"px{i}" for i in range(784)]


@pytest.fixture(scope="module")
def champion(tracked_sample_chain):
    return tracked_sample_chain["champion"]


@pytest.fixture(scope="module")
def resolved(champion):
    from lightcycle.serving.scoring_server import resolve_servable

    return resolve_servable(champion)


@pytest.fixture(scope="module")
def spark():
    session = spark_scoring.spark_session("local[2]")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def images():
    return data.load_split(SAMPLE_DIR, "test").images  # (180, 28, 28) uint8


def pixel_frame(images: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(images.reshape(len(images), -1).astype(np.float32), columns=PIXEL_COLUMNS)


def synthetic(images: np.ndarray, n: int) -> np.ndarray:
    """n images: the sample tiled, each copy shifted by a different (dy, dx)."""
    copies = []
    for k in range(-(-n // len(images))):
        shift = (k % 7 - 3, (k // 7) % 7 - 3)
        copies.append(np.roll(images, shift, axis=(1, 2)))
    return np.concatenate(copies)[:n]


@pytest.fixture(scope="module")
def inputs(images, tmp_path_factory):
    root = tmp_path_factory.mktemp("spark-inputs")
    pixel_frame(images).to_parquet(root / "sample.parquet")
    pixel_frame(synthetic(images, 10_000)).to_parquet(root / "synthetic.parquet")
    return root


def test_parse_spark_conf():
    assert spark_scoring.parse_spark_conf("") == {}
    assert spark_scoring.parse_spark_conf(
        "spark.executor.memory=4g, spark.jars=a.jar,b.jar,spark.x.y=k=v\nspark.z=1") == {
        "spark.executor.memory": "4g", "spark.jars": "a.jar,b.jar", "spark.x.y": "k=v",
        "spark.z": "1"}
    with pytest.raises(UserError, match="key=value"):
        spark_scoring.parse_spark_conf("oops")


@pytest.mark.parametrize("name", ["sample.parquet", "synthetic.parquet"])
def test_spark_answers_equal_local_predict_for_every_row(name, champion, resolved, spark, inputs,
                                                         tracking_uri, tmp_path):
    from lightcycle.serving.predict import batch_predict

    local = batch_predict(champion, inputs / name, tmp_path / "local.csv")
    result = spark_scoring.score(spark, resolved, str(inputs / name), str(tmp_path / "spark"))
    remote = pd.read_parquet(tmp_path / "spark")
    assert result.images == len(remote) == len(local) == (180 if name == "sample.parquet" else 10_000)
    assert list(remote.columns) == list(local.columns)  # name, class_id, label, p_<class>...
    merged = local.merge(remote, on="name", suffixes=("_local", "_spark"), validate="1:1")
    assert len(merged) == len(local)
    assert (merged["class_id_local"] == merged["class_id_spark"]).all()
    assert (merged["label_local"] == merged["label_spark"]).all()
    probabilities = [c for c in local.columns if c.startswith("p_")]
    spark_p = merged[[f"{c}_spark" for c in probabilities]].to_numpy()
    assert np.isfinite(spark_p).all()
    # Same model, same float32 pixels; batches differ (256 vs up to 1,024), so allow the last bits.
    np.testing.assert_allclose(spark_p, merged[[f"{c}_local" for c in probabilities]].to_numpy(),
                               rtol=0, atol=1e-6)


def _bad_array_rows(tmp_path, images, rows):
    pixels = [list(map(float, images[i].reshape(-1))) for i in range(6)]
    names = [f"ok-{i}" for i in range(6)]
    for name, value in rows:
        pixels.append(value)
        names.append(name)
    path = tmp_path / "bad.parquet"
    # pyarrow directly: pandas would write NaN as null.
    pq.write_table(pa.table({"name": names,
                             "pixels": pa.array(pixels, type=pa.list_(pa.float64()))}), path)
    return path


def _good(images, i=0):
    return list(map(float, images[i].reshape(-1)))


@pytest.mark.parametrize("value, problem", [
    (lambda g: g[:783], "has 783 pixels; expected 784"),
    (lambda g: None, "pixels are null"),
    (lambda g: g[:10] + [None] + g[11:], "pixel 10 is null"),
    (lambda g: g[:20] + [float("nan")] + g[21:], "pixel 20 is NaN"),
    (lambda g: g[:30] + [256.0] + g[31:], "pixel 30 is 256.0, outside [0, 255]"),
    (lambda g: g[:40] + [-1.0] + g[41:], "pixel 40 is -1.0, outside [0, 255]"),
    (lambda g: g[:1] + [float("inf")] + g[2:], "pixel 1 is Infinity, outside [0, 255]"),
], ids=["783-pixels", "null-row", "null-pixel", "nan", "above-255", "negative", "infinity"])
def test_a_malformed_row_is_named_and_nothing_is_written(value, problem, spark, images, resolved,
                                                         tmp_path):
    path = _bad_array_rows(tmp_path, images, [("the-bad-one", value(_good(images)))])
    with pytest.raises(UserError) as caught:
        spark_scoring.score(spark, resolved, str(path), str(tmp_path / "out"))
    message = str(caught.value)
    assert "row the-bad-one: " + problem in message, message
    assert "ok-" not in message
    assert not (tmp_path / "out").exists()


def test_pixel_columns_layout_names_each_bad_row_by_file_and_index(spark, images, resolved,
                                                                    tmp_path):
    pixels = images[:12].reshape(12, -1).astype(np.float64)
    pixels[3, 7] = np.nan
    pixels[9, 783] = 300.0
    null = np.zeros(12, dtype=bool)
    null[5] = True
    columns = {c: pa.array(pixels[:, i], mask=null if i == 0 else None)  # NaN stays NaN
               for i, c in enumerate(PIXEL_COLUMNS)}
    pq.write_table(pa.table(columns), tmp_path / "cols.parquet")
    with pytest.raises(UserError) as caught:
        spark_scoring.score(spark, resolved, str(tmp_path / "cols.parquet"), str(tmp_path / "out"))
    message = str(caught.value)
    for expected in ("row cols.parquet[3]: pixel 7 is NaN",
                     "row cols.parquet[5]: pixel 0 is null",
                     "row cols.parquet[9]: pixel 783 is 300.0, outside [0, 255]"):
        assert expected in message, message


def test_wrong_columns_and_foreign_output_are_refused(spark, images, resolved, tmp_path):
    pixel_frame(images[:3]).iloc[:, :700].to_parquet(tmp_path / "narrow.parquet")
    with pytest.raises(UserError, match=r"has 700 pixel columns .*; expected 784"):
        spark_scoring.score(spark, resolved, str(tmp_path / "narrow.parquet"), str(tmp_path / "o"))
    pixel_frame(images[:3]).to_parquet(tmp_path / "ok.parquet")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an earlier Spark output"):
        spark_scoring.score(spark, resolved, str(tmp_path / "ok.parquet"), str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_mlflow_run_predict_engine_spark_on_a_folder(champion, tracking_uri, experiment, images,
                                                     tmp_path):
    from lightcycle.serving.predict import batch_predict

    folder = tmp_path / "in"
    folder.mkdir()
    pixel_frame(images[:90]).to_parquet(folder / "a.parquet")
    pixel_frame(images[90:]).to_parquet(folder / "b.parquet")
    out = tmp_path / "predictions.parquet"
    check(mlflow_run("predict", {"model_uri": champion, "input": folder, "output": out,
                                 "engine": "spark",
                                 "spark_conf": "spark.sql.shuffle.partitions=2,"
                                               "spark.driver.memory=1g"}, experiment))
    table = pd.read_parquet(out)
    assert len(table) == 180
    pixel_frame(images).to_parquet(tmp_path / "all.parquet")
    local = batch_predict(champion, tmp_path / "all.parquet", tmp_path / "local.csv")
    index = [int(n.split("[")[1][:-1]) + (90 if n.startswith("b.") else 0) for n in table["name"]]
    assert sorted(index) == list(range(180))
    assert (local["class_id"].to_numpy()[index] == table["class_id"].to_numpy()).all()
    probabilities = table[[c for c in table.columns if c.startswith("p_")]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    client = mlflow.MlflowClient()
    run = client.search_runs([experiment])[0]
    assert run.data.params["engine"] == "spark" and run.data.metrics["images"] == 180
    logged = [a.path for a in client.list_artifacts(run.info.run_id, "predictions")]
    assert "predictions/_SUCCESS" in logged and any(p.endswith(".parquet") for p in logged)
    assert not any(p.startswith("predictions/.") for p in logged)  # no .crc files


def test_java_unavailable_reason_says_what_to_install(tmp_path):
    assert spark_scoring.java_unavailable_reason() is None  # this machine has Java 17
    missing = spark_scoring.java_unavailable_reason({"PATH": str(tmp_path)})
    assert "no `java` on PATH" in missing and "openjdk-17-jre-headless" in missing
    wrong_home = spark_scoring.java_unavailable_reason({"PATH": "", "JAVA_HOME": str(tmp_path)})
    assert "has no bin/java" in wrong_home and "openjdk-17-jre-headless" in wrong_home


def test_without_java_predict_says_what_to_install(champion, tracking_uri, experiment, inputs,
                                                    tmp_path):
    """The step as a user starts it, with a PATH that has no java and no JAVA_HOME."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("git", "sh", "bash", "uname"):
        if shutil.which(tool):
            (tools / tool).symlink_to(shutil.which(tool))
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    env["PATH"] = os.pathsep.join([VENV_BIN, str(tools)])
    assert shutil.which("java", path=env["PATH"]) is None
    result = subprocess.run(
        [sys.executable, "steps/predict.py", "--engine", "spark", "--model_uri", champion,
         "--input", str(inputs / "sample.parquet"), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: engine=spark: Spark needs Java" in result.stderr
    assert "sudo apt-get install -y openjdk-17-jre-headless" in result.stderr
    assert "Traceback" not in result.stderr
    assert not Path(tmp_path / "out").exists()


# --- train -P engine=spark, and both steps on a standalone cluster ---------------------------

def assert_one_train_run_like_local(experiment: str, epochs: int, world_size: int = 2):
    """The step made one train run, FINISHED, logged by rank 0 as a local train logs."""
    client = mlflow.MlflowClient()
    (run,) = runs_of(experiment, "train")
    assert run.info.status == "FINISHED"
    assert run.data.params["engine"] == "spark"
    assert run.data.params["world_size"] == str(world_size)
    for metric in ("train_loss", "val_loss", "val_acc"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert len(steps) == epochs, (metric, steps)  # once per epoch: rank 0 alone logs
    assert faults.checkpoint_epochs(client, run.info.run_id) == list(range(epochs))
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "model_summary.txt", "plots", "tensorboard"} <= logged
    assert "test_accuracy" in run.data.metrics
    assert len(run.outputs.model_outputs) == 1
    assert run.data.tags["lightcycle.output_uri"].startswith("models:/m-")
    return run


def new_application(cluster, before: set[str], name: str) -> str:
    (app,) = [a["id"] for a in cluster.applications() if a["id"] not in before
              and a["name"] == name]
    return app


def test_standalone_train_runs_each_rank_on_its_own_worker(spark_cluster, tracking_uri,
                                                           experiment):
    before = {a["id"] for a in spark_cluster.applications()}
    token = "tok-" + os.urandom(8).hex()  # MLflow's own credential variable, never printed
    result = check(mlflow_run("train", {"engine": "spark", "spark_master": spark_cluster.url,
                                        "epochs": 1, "model": "mlp"}, experiment,
                              env={"MLFLOW_TRACKING_TOKEN": token}))
    assert token not in result.stdout + result.stderr
    run = assert_one_train_run_like_local(experiment, epochs=1)
    assert token not in str(run.data.params) + str(run.data.tags)
    assert len(runs_of(experiment)) == 1  # the other rank created none
    assert f"logging to run {run.info.run_id}" in result.stdout + result.stderr
    assert f"run_id={run.info.run_id} model_uri={run.data.tags['lightcycle.output_uri']}" \
        in result.stdout
    # Rank 0 and rank 1 ran in executors of two workers (one core each): a two-node job.
    app = new_application(spark_cluster, before, "lightcycle-train")
    assert len(spark_cluster.executor_logs(app)) == 2


def parquet_input(images, folder: Path) -> Path:
    folder.mkdir()
    pixel_frame(images[:90]).to_parquet(folder / "a.parquet")
    pixel_frame(images[90:]).to_parquet(folder / "b.parquet")
    return folder


def test_standalone_predict_auto_output_comes_back_through_the_driver(
        champion, spark_cluster, tracking_uri, experiment, images, tmp_path):
    from lightcycle.serving.predict import batch_predict

    before = {a["id"] for a in spark_cluster.applications()}
    folder = parquet_input(images, tmp_path / "in")
    check(mlflow_run("predict", {"model_uri": champion, "input": folder, "engine": "spark",
                                 "spark_master": spark_cluster.url}, experiment))
    client = mlflow.MlflowClient()
    (run,) = runs_of(experiment, "predict")
    assert run.data.metrics["images"] == 180
    # The driver wrote what the executors handed it: one part file, then the run's artifacts.
    logged = sorted(a.path for a in client.list_artifacts(run.info.run_id, "predictions"))
    assert logged == ["predictions/_SUCCESS", "predictions/part-00000.parquet"]
    table = pd.read_parquet(client.download_artifacts(run.info.run_id,
                                                      "predictions/part-00000.parquet", tmp_path))
    pixel_frame(images).to_parquet(tmp_path / "all.parquet")
    local = batch_predict(champion, tmp_path / "all.parquet", tmp_path / "local.csv")
    index = [int(n.split("[")[1][:-1]) + (90 if n.startswith("b.") else 0) for n in table["name"]]
    assert sorted(index) == list(range(180))
    assert (local["class_id"].to_numpy()[index] == table["class_id"].to_numpy()).all()
    # Each scoring task used one torch thread per task core (torch's own default on these
    # workers, which have no OMP_NUM_THREADS, is one per core of the machine).
    app = new_application(spark_cluster, before, "lightcycle-predict")
    logs = "".join(spark_cluster.executor_logs(app).values())
    lines = [line for line in logs.splitlines() if "lightcycle: scoring with" in line]
    assert lines, logs[-3000:]
    assert all(line.endswith("scoring with 1 torch thread(s) (1 task core(s))") for line in lines), lines


def test_standalone_predict_refuses_an_output_only_executors_would_see(
        champion, spark_cluster, tracking_uri, experiment, images, tmp_path):
    folder = parquet_input(images, tmp_path / "in")
    out = tmp_path / "predictions"
    result = mlflow_run("predict", {"model_uri": champion, "input": folder, "output": out,
                                    "engine": "spark", "spark_master": spark_cluster.url},
                        experiment)
    assert result.returncode != 0
    assert f"error: output={out} is a path on this machine, but master {spark_cluster.url}" \
        in result.stderr, result.stderr[-3000:]
    assert "file:///<path> for a folder every node mounts, or leave output=auto" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    (run,) = runs_of(experiment, "predict")
    assert run.info.status == "FAILED"


def test_engine_spark_train_resumes_when_main_reruns_after_the_step_is_killed(
        tracking_uri, experiment, model_name, tmp_path):
    """`-e train -P engine=spark` killed after a checkpoint; then `mlflow run . -P engine=spark`
    (`main`): its train step resumes on local[2] and the rest of the chain completes."""
    params = {"engine": "spark", "epochs": 3, "model": "mlp"}
    client = mlflow.MlflowClient()
    log = tmp_path / "first.log"
    first = faults.popen_main(params, experiment, log, entry_point="train")
    try:
        train = faults.poll(lambda: faults.step_run(experiment, "train", "RUNNING"), 300,
                            "the train run")
        # Found before the first checkpoint, so that the kill follows it within one poll and
        # lands before the last epoch: a kill after it would leave nothing to resume.
        (driver,) = faults.poll(lambda: [p for p in faults.descendants(first.pid)
                                         if faults.argv(p)[1:2] == ["steps/train.py"]],
                                30, "the step's process (the Spark driver)")
        faults.poll(lambda: faults.checkpoint_epochs(client, train.info.run_id), 600,
                    "the first checkpoint", interval=0.05)
        os.kill(driver, signal.SIGKILL)
    finally:
        returncode, output = faults.finish(first, log)
    assert returncode != 0, output[-3000:]
    killed = client.get_run(train.info.run_id)
    assert killed.info.status in ("FAILED", "KILLED")
    # No rank outlives the driver: none still holds the killed run.
    marker = f"MLFLOW_RUN_ID={killed.info.run_id}".encode()
    faults.poll(lambda: not [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                             if marker in faults.environ(p)], 60, "the ranks to exit")
    # Read once no rank is left to upload another one.
    saved = faults.checkpoint_epochs(client, killed.info.run_id)
    assert saved[-1] < 2, f"the kill came after the last epoch's checkpoint: {saved}"

    rerun = check(mlflow_run("main", {**params, "model_name": model_name, "min_accuracy": 0.1},
                             experiment))
    (resumed,) = runs_of(experiment, "train", "FINISHED")
    assert resumed.data.tags["lightcycle.resumed_from"] == killed.info.run_id
    assert int(resumed.data.tags["lightcycle.resumed_from_epoch"]) == saved[-1]
    # It trained only the epochs after the saved one (one epoch metric each) and, finished,
    # kept its latest checkpoint and its best by val_loss, both from those epochs.
    assert len(client.get_metric_history(resumed.info.run_id, "val_loss")) == 2 - saved[-1]
    kept = faults.checkpoint_epochs(client, resumed.info.run_id)
    assert max(kept) == 2 and min(kept) > saved[-1] and len(kept) <= 2, (kept, saved)
    out = rerun.stdout + rerun.stderr
    assert f"rank 0: resuming from run {killed.info.run_id}" in out
    assert f"rank 1: resuming from run {killed.info.run_id}" in out
    assert resumed.data.params["world_size"] == "2"
    for step in ("main", "register", "torchscript", "promote"):
        assert [r.info.status for r in runs_of(experiment, step)] == ["FINISHED"], step
    champion = client.get_model_version_by_alias(f"{model_name}-scripted", "champion")
    assert champion.status == "READY" and champion.run_id != resumed.info.run_id
    assert client.get_model_version(model_name, "1").run_id == resumed.info.run_id


def test_engine_spark_settings_are_checked_before_anything_starts():
    from lightcycle.training.config import TrainConfig

    with pytest.raises(UserError, match="Unknown engine 'sparkk': choose one of local, spark"):
        TrainConfig(engine="sparkk").validate()
    with pytest.raises(UserError, match="devices=2 and num_nodes=1 do not apply: leave them at 1"):
        TrainConfig(engine="spark", devices="2").validate()
    with pytest.raises(UserError, match="num_processes must be at least 1"):
        TrainConfig(engine="spark", num_processes=0).validate()


def test_a_spark_task_gives_the_trainer_its_torchrun_layout(monkeypatch):
    from lightcycle.training.config import TrainConfig
    from lightcycle.training.trainer import trainer_kwargs

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # a task holding 2 GPUs: 2 processes per node
    cfg = TrainConfig(engine="spark", num_processes=4)
    cfg.validate()  # WORLD_SIZE 4 with devices=1, num_nodes=1 is right on Spark
    kwargs = trainer_kwargs(cfg)
    assert (kwargs["devices"], kwargs["num_nodes"], kwargs["strategy"]) == (2, 2, "ddp")
    assert trainer_kwargs(TrainConfig())["devices"] == 1  # engine=local: as the user said


def test_executor_env_carries_the_run_tracking_uri_and_credentials(monkeypatch, tmp_path):
    from lightcycle.training.spark_train import executor_env

    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".mlflow" / "credentials").write_text(
        "[mlflow]\nmlflow_tracking_username = alice\nmlflow_tracking_password = s3cret\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "other")
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    mlflow.set_tracking_uri(None)
    env = executor_env("run-1", "7")
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert (env["MLFLOW_RUN_ID"], env["MLFLOW_EXPERIMENT_ID"]) == ("run-1", "7")
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "s3cret")
    assert env["MLFLOW_TRACKING_INSECURE_TLS"] == "true"
    assert "MLFLOW_EXPERIMENT_NAME" not in env


def test_cluster_output_problem_names_what_to_pass():
    problem = spark_scoring.cluster_output_problem("/data/out", "spark://host:7077")
    assert "output=/data/out is a path on this machine" in problem and "output=auto" in problem
    for shared in ("s3a://bucket/out", "dbfs:/out", "file:///mnt/shared/out"):
        assert spark_scoring.cluster_output_problem(shared, "spark://host:7077") is None
