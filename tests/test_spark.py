"""`predict -P engine=spark`: mlflow.pyfunc.spark_udf on a registered champion, on local[2].

One Spark session for the in-process tests of this module; one `mlflow run . -e predict
-P engine=spark`, as a user types it, starts its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import PROJECT_ROOT, SAMPLE_DIR, VENV_BIN, check, mlflow_run
from lightcycle.model import data
from lightcycle.serving import spark_scoring
from lightcycle.errors import UserError

# The session's shared chain (conftest.sample_chain): read here, never changed.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sample-chain")]
PIXEL_COLUMNS = [f"px{i}" for i in range(784)]


@pytest.fixture(scope="module")
def champion(sample_chain, tracking_server):
    mlflow.set_tracking_uri(tracking_server.url)
    yield sample_chain["champion"]
    mlflow.set_tracking_uri(None)


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
