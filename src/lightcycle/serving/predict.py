"""Batch prediction: a registered (or named local) model over a file of images, to CSV;
or, with engine=spark, over parquet on Spark, to parquet (lightcycle.serving.spark_scoring)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from lightcycle.lifecycle import model_io
from lightcycle.model.data import CLASS_NAMES
from lightcycle.model.evaluate import metric_safe
from lightcycle.serving.inputs import load_images
from lightcycle.serving.scoring_server import resolve_servable


def batch_predict(model_uri: str, input_path: str | os.PathLike, output_path: str | os.PathLike,
                  batch_size: int = 256) -> pd.DataFrame:
    model = model_io.load_pyfunc(resolve_servable(model_uri))
    names, pixels = load_images(input_path)
    starts = range(0, len(pixels), batch_size)
    parts = []
    # A bar only where it helps: long inputs, and sparse updates when stderr is a log file.
    for start in tqdm(starts, desc="predict", unit="batch", disable=len(starts) < 4,
                      mininterval=0.5 if sys.stderr.isatty() else 10):
        parts.append(model.predict(pixels[start : start + batch_size]))
    predictions = pd.concat(parts, ignore_index=True)
    probabilities = np.stack(predictions["probabilities"].to_numpy())
    table = pd.DataFrame({"name": names, "class_id": predictions["class_id"],
                          "label": predictions["label"]})
    for i, class_name in enumerate(CLASS_NAMES):
        table[f"p_{metric_safe(class_name)}"] = probabilities[:, i]
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(output_path, index=False)
    return table


def spark_predict(model_uri: str, input_uri: str, output: str | None, master: str = "",
                  conf: str = "", scratch: str | None = None):
    """engine=spark: same URI rules as batch_predict; returns a spark_scoring.SparkPrediction."""
    from lightcycle.serving import spark_scoring

    spark_scoring.require_spark()  # before resolving anything: fail fast with the fix
    return spark_scoring.spark_predict(resolve_servable(model_uri), input_uri, output, master, conf,
                                       scratch)
