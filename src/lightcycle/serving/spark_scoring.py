"""Batch scoring on Spark: `predict -P engine=spark`, `mlflow.pyfunc.spark_udf` over parquet.

Input: a parquet file or a folder of parquet files (any Spark-readable URI: s3a://, dbfs:/,
abfss://...), one image per row, either as 784 numeric pixel columns (row-major 28x28, the
layout the local engine reads) or as one array column `pixels` of 784 numbers; an optional
`name` column names the rows (otherwise `<file name>[<row index in that file>]`, which for one
file is the local engine's naming). `label` and `id` columns are ignored.

Output: parquet (a folder of part files) with `name`, `class_id`, `label` and one `p_<class>`
column per class: the local engine's CSV columns.

Every row is checked in Spark before any scoring: a row with the wrong number of pixels, a null,
NaN, Infinity or a value outside [0, 255] fails the job with the names of the first bad rows and
what is wrong with each, so no NaN ever reaches the output.

The deployable's pyfunc takes an (N, 1, 28, 28) array, at most 1,024 images per call, while
`spark_udf` hands a model a pandas DataFrame of up to 10,000 rows. So the UDF runs a thin
pyfunc (PixelRows, below) that holds the deployable as an artifact, turns the array column into
the tensor and calls the deployable in chunks: the champion's own code, weights and input
checks do the scoring. PixelRows is pickled by value, so executors need mlflow, torch, numpy and
pandas but not this package.

This module imports no lightcycle module that predict.py and serve.py import from: it takes
an already resolved model URI (see lightcycle.serving.predict.spark_predict).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from lightcycle.model.data import CLASS_NAMES
from lightcycle.errors import UserError
from lightcycle.model.evaluate import metric_safe
from lightcycle.spark import (  # noqa: F401 - the session code predict and train share
    java_unavailable_reason, parse_spark_conf, require_spark, spark_session)

PIXELS = 28 * 28
IGNORED_COLUMNS = ("label", "name", "id")
RESULT_TYPE = "class_id long, label string, probabilities array<double>"
MAX_BAD_ROWS_SHOWN = 5


# ---------------------------------------------------------------------------------------------
# The pyfunc the UDF runs: pixel rows -> the deployable, in chunks


class PixelRows(PythonModel):
    """A pandas frame with one array column of 784 pixels -> the deployable's predictions."""

    def load_context(self, context):
        import mlflow.pyfunc

        import torch
        from pyspark import TaskContext

        # One torch thread per core the task holds: torch's default (every core of the machine)
        # in each of an executor's concurrent tasks would oversubscribe its cores.
        task = TaskContext.get()
        if task is not None:
            torch.set_num_threads(max(1, task.cpus()))
            print(f"lightcycle: scoring with {torch.get_num_threads()} torch thread(s) "
                  f"({task.cpus()} task core(s))", file=sys.stderr, flush=True)
        self.deployable = mlflow.pyfunc.load_model(context.artifacts["deployable"])
        config = getattr(self.deployable, "model_config", None) or {}
        self.max_batch = int(config.get("max_batch", 1024))

    def predict(self, context, model_input, params=None):
        column = model_input.iloc[:, 0]
        pixels = np.stack(column.to_numpy()).astype(np.float32, copy=False)
        pixels = pixels.reshape(len(column), 1, 28, 28)
        parts = [self.deployable.predict(pixels[start:start + self.max_batch])
                 for start in range(0, len(pixels), self.max_batch)]
        return pd.concat(parts, ignore_index=True)


def save_udf_model(model_uri: str, path: str | os.PathLike) -> str:
    """Save PixelRows around `model_uri` (resolved: models:/<name>/<version> or a local dir)."""
    import cloudpickle
    import mlflow.pyfunc

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        mlflow.pyfunc.save_model(str(path), python_model=PixelRows(),
                                 artifacts={"deployable": model_uri},
                                 pip_requirements=["mlflow", "torch", "numpy", "pandas"])
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Reading, checking, scoring, writing


@dataclass
class SparkPrediction:
    images: int
    output: str
    partitions: int


def _is_local(uri: str) -> bool:
    return "://" not in uri and not re.match(r"^[a-z][a-z0-9+.-]*:/", uri)


def read_pixels(spark, input_uri: str):
    """(name, pixels array<double>) per row, or UserError saying what the input should be."""
    from pyspark.errors import AnalysisException
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    if _is_local(input_uri) and not Path(input_uri).exists():
        raise UserError(f"Input {input_uri} does not exist; engine=spark expects a parquet file or "
                        "a folder of parquet files.")
    try:
        frame = spark.read.parquet(input_uri)
    except AnalysisException as exc:
        raise UserError(f"Cannot read {input_uri} as parquet ({str(exc).splitlines()[0]}); "
                        "engine=spark expects a parquet file or a folder of parquet files.") from None
    fields = {f.name: f.dataType for f in frame.schema.fields}
    numeric = (T.NumericType,)
    arrays = [n for n, t in fields.items() if isinstance(t, T.ArrayType)]
    if "pixels" in fields and isinstance(fields["pixels"], T.ArrayType):
        element = fields["pixels"].elementType
        if not isinstance(element, numeric):
            raise UserError(f"{input_uri}: column pixels holds {element.simpleString()}; "
                            "expected numbers 0-255.")
        pixels = F.col("pixels").cast("array<double>")
    else:
        columns = [n for n in fields if n not in IGNORED_COLUMNS]
        if arrays or len(columns) != PIXELS:
            raise UserError(
                f"{input_uri} has {len(columns)} pixel columns ({', '.join(columns[:3])}"
                f"{', ...' if len(columns) > 3 else ''}); expected {PIXELS} numeric columns "
                "(28x28, row-major) or one array column `pixels` of 784 numbers, plus optional "
                "name/label/id columns.")
        wrong = [n for n in columns if not isinstance(fields[n], numeric)]
        if wrong:
            raise UserError(f"{input_uri}: pixel column {wrong[0]} is {fields[wrong[0]].simpleString()};"
                            " expected numbers 0-255.")
        pixels = F.array(*[F.col(f"`{n}`").cast("double") for n in columns])
    if "name" in fields:
        name = F.col("name").cast("string")
    else:
        try:
            frame = frame.select("*", F.col("_metadata.file_name").alias("_file"),
                                 F.col("_metadata.row_index").alias("_row"))
            name = F.concat(F.col("_file"), F.lit("["), F.col("_row").cast("string"), F.lit("]"))
        except AnalysisException:  # a source without _metadata.row_index
            name = F.concat(F.lit("row "), F.monotonically_increasing_id().cast("string"))
    return frame.select(name.alias("name"), pixels.alias("pixels"))


def problem_column():
    """Per row: null if the pixels are fine, else what is wrong (first problem only)."""
    from pyspark.sql import functions as F

    px = F.col("pixels")
    n = F.size(px)

    def first(predicate):
        # 0-based index of the first pixel matching `predicate`
        return (F.array_position(F.transform(px, predicate), True) - 1).cast("string")

    def value_at(index):
        return F.element_at(px, index.cast("int") + 1).cast("string")

    bad_null = first(lambda x: x.isNull())
    bad_nan = first(lambda x: F.isnan(x))
    bad_range = first(lambda x: (x < 0) | (x > 255))
    return (F.when(px.isNull(), F.lit("pixels are null"))
            .when(n != PIXELS, F.concat(F.lit("has "), n.cast("string"),
                                        F.lit(f" pixels; expected {PIXELS} (28x28)")))
            .when(F.exists(px, lambda x: x.isNull()),
                  F.concat(F.lit("pixel "), bad_null, F.lit(" is null")))
            .when(F.exists(px, lambda x: F.isnan(x)),
                  F.concat(F.lit("pixel "), bad_nan, F.lit(" is NaN")))
            .when(F.exists(px, lambda x: (x < 0) | (x > 255)),
                  F.concat(F.lit("pixel "), bad_range, F.lit(" is "), value_at(bad_range),
                           F.lit(", outside [0, 255]"))))


def check_rows(rows, input_uri: str) -> None:
    from pyspark.sql import functions as F

    bad = rows.select("name", problem_column().alias("problem")).where(F.col("problem").isNotNull())
    shown = bad.take(MAX_BAD_ROWS_SHOWN)
    if shown:
        listing = "; ".join(f"row {r['name']}: {r['problem']}" for r in shown)
        more = " (first ones shown)" if len(shown) == MAX_BAD_ROWS_SHOWN else ""
        raise UserError(f"{input_uri} has malformed rows{more}: {listing}. Every row needs "
                        f"{PIXELS} pixel values in [0, 255], no null or NaN; nothing was written.")


def _check_output(output: str) -> None:
    """Overwrite only an earlier Spark output (or nothing): never a folder of other files."""
    if not _is_local(output):
        return  # the writer refuses to overwrite an existing remote path (mode errorifexists)
    path = Path(output)
    if path.is_file() or (path.is_dir() and any(path.iterdir()) and not (path / "_SUCCESS").exists()):
        raise UserError(f"Output {output} exists and is not an earlier Spark output (a folder "
                        "with _SUCCESS); engine=spark writes a folder of parquet part files: "
                        "name a new path.")


def score(spark, model_uri: str, input_uri: str, output: str,
          through_driver: bool = False) -> SparkPrediction:
    """Score `input_uri` with the deployable at `model_uri` (resolved) into parquet `output`.

    `through_driver`: the executors hand their rows to the driver, which writes `output` (a
    folder on its own disk) as one part file; for a cluster whose executors cannot see it."""
    import mlflow.pyfunc
    from pyspark.sql import functions as F

    _check_output(output)
    rows = read_pixels(spark, input_uri)
    check_rows(rows, input_uri)
    parallelism = spark.sparkContext.defaultParallelism
    partitions = rows.rdd.getNumPartitions()
    if partitions < parallelism:  # e.g. one parquet row group: give every core a share
        rows = rows.repartition(parallelism)
        partitions = parallelism
    with tempfile.TemporaryDirectory(prefix="lightcycle-spark-udf-") as tmp:
        udf_model = save_udf_model(model_uri, Path(tmp) / "model")
        predict = mlflow.pyfunc.spark_udf(spark, udf_model, result_type=RESULT_TYPE,
                                          env_manager="local")
        scored = rows.select("name", predict(F.col("pixels").cast("array<float>")).alias("p"))
        columns = [F.col("name"), F.col("p.class_id").alias("class_id"),
                   F.col("p.label").alias("label")]
        columns += [F.col("p.probabilities")[i].alias(f"p_{metric_safe(c)}")
                    for i, c in enumerate(CLASS_NAMES)]
        if through_driver:
            return _write_on_driver(scored.select(*columns), output, partitions)
        writer = scored.select(*columns).write
        if _is_local(output):
            writer = writer.mode("overwrite")
        try:
            writer.parquet(output)
        except Exception as exc:
            if "already exists" in str(exc).split("\n")[0]:
                raise UserError(f"Output {output} already exists; engine=spark never overwrites "
                                "a remote path: name a new one.") from None
            raise _explain(exc) from None
    images = spark.read.parquet(output).count()
    return SparkPrediction(images, output, partitions)


def _write_on_driver(frame, output: str, partitions: int) -> SparkPrediction:
    import pyarrow.parquet as pq

    try:
        table = frame.toArrow()
    except Exception as exc:
        raise _explain(exc) from None
    Path(output).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, Path(output) / "part-00000.parquet")
    (Path(output) / "_SUCCESS").touch()
    return SparkPrediction(table.num_rows, output, partitions)


def cluster_output_problem(output: str, master: str) -> str | None:
    """Why executors that run away from the driver cannot write `output`, or None."""
    if not _is_local(output):
        return None
    return (f"output={output} is a path on this machine, but master {master} runs the executors "
            "on other machines: each would write its part files to its own disk. Pass a URI "
            "that every node reaches (s3a://..., abfss://..., dbfs:/..., hdfs://...), "
            "file:///<path> for a folder every node mounts, or leave output=auto: the "
            "predictions then reach the run's artifacts through the driver.")


def _explain(exc: Exception) -> Exception:
    """A deployable's InputError raised on an executor, as one clear line; anything else as is."""
    text = str(exc)
    match = re.search(r"(?:InputError|MlflowException): (.+)", text)
    if match:
        return UserError(f"The model refused a batch: {match[1].strip()}")
    return exc


def spark_predict(model_uri: str, input_uri: str, output: str | None, master: str = "",
                  conf: str = "", scratch: str | None = None) -> SparkPrediction:
    """Start (or join) a Spark session and score. `output` None (auto): parquet in `scratch` on
    the driver, written by the executors on local[N], through the driver on a cluster."""
    from lightcycle.spark import is_local_master, spark_job

    # A cluster master named here is refused before the session starts; spark-submit's after.
    problem = None if output is None or master.startswith("local") or not master else \
        cluster_output_problem(output, master)
    if problem:
        raise UserError(problem)
    with spark_job(master, conf, "lightcycle-predict") as spark:
        local = is_local_master(spark)
        if output is None:
            return score(spark, model_uri, input_uri, os.path.join(scratch, "predictions.parquet"),
                         through_driver=not local)
        problem = None if local else cluster_output_problem(output, spark.sparkContext.master)
        if problem:
            raise UserError(problem)
        return score(spark, model_uri, input_uri, output)
