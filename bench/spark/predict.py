"""Batch scoring throughput: local `predict` vs `predict -P engine=spark` on local[2].

    PATH=.venv/bin:$PATH python -m bench.spark.predict [--sizes 10000,60000]

Both engines score the same parquet (784 float32 pixel columns; the 180 sample test images
tiled and shifted, written to a temp dir) with the same deployable (a scripted CNN saved exactly
as the chain logs it, lightcycle.lifecycle.export.deployable_model_kwargs), end to end as the entry point
runs them: read, check, score, write (CSV for local, parquet for Spark). The Spark session is
started once, before the timed runs; its start-up is reported on its own (`spark_session_s`),
since a cluster job pays it once per job. Each engine gets one untimed warm-up on 1,000 images.
"""

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.common import command_line, report, timed
from lightcycle.lifecycle import export
from lightcycle.model import data
from lightcycle.model.nets import build_net
from lightcycle.serving import spark_scoring
from lightcycle.serving.predict import batch_predict

warnings.simplefilter("ignore", FutureWarning)


def synthetic(n: int) -> pd.DataFrame:
    images = data.load_split(data.default_data_dir(), "test").images
    copies = [np.roll(images, (k % 7 - 3, (k // 7) % 7 - 3), axis=(1, 2))
              for k in range(-(-n // len(images)))]
    pixels = np.concatenate(copies)[:n].reshape(n, -1).astype(np.float32)
    return pd.DataFrame(pixels, columns=[f"px{i}" for i in range(784)])


def main(argv: list[str] | None = None) -> dict:
    parser = command_line(__doc__)
    parser.add_argument("--sizes", default="10000,60000")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    import mlflow.pyfunc

    figures: dict = {"load_average_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-spark-") as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        archive = str(tmp / "model.pt")
        export.save_archive(torch.jit.freeze(torch.jit.script(build_net("cnn").eval())), archive)
        model_dir = str(tmp / "model")
        mlflow.pyfunc.save_model(model_dir, **export.deployable_model_kwargs(archive, "torchscript"))
        for n in [1000, *sizes]:
            synthetic(n).to_parquet(tmp / f"{n}.parquet")

        seconds, spark = timed(spark_scoring.spark_session, "local[2]")
        figures["spark_session_s"] = round(seconds, 1)
        figures["spark"] = f"pyspark {spark.version}, {spark.sparkContext.master}"

        batch_predict(model_dir, tmp / "1000.parquet", tmp / "warm.csv")
        spark_scoring.score(spark, model_dir, str(tmp / "1000.parquet"), str(tmp / "warm"))
        for n in sizes:
            local_s = timed(batch_predict, model_dir, tmp / f"{n}.parquet", tmp / f"{n}.csv")[0]
            spark_s, result = timed(spark_scoring.score, spark, model_dir, str(tmp / f"{n}.parquet"),
                                    str(tmp / f"{n}-spark"))
            assert result.images == n
            figures[f"images_{n}"] = {
                "local_s": round(local_s, 2), "local_images_per_s": round(n / local_s),
                "spark_local2_s": round(spark_s, 2), "spark_local2_images_per_s": round(n / spark_s),
                "spark_partitions": result.partitions,
                "spark_vs_local": round(local_s / spark_s, 2),
            }
            print(n, figures[f"images_{n}"], flush=True)
        spark.stop()
    figures["load_average_at_end"] = os.getloadavg()
    rows = [[int(key.removeprefix("images_")), f"{row['local_s']} s, {row['local_images_per_s']} images/s",
             f"{row['spark_local2_s']} s, {row['spark_local2_images_per_s']} images/s", row["spark_vs_local"]]
            for key, row in figures.items() if key.startswith("images_")]
    return report("spark", figures, (["images", "local `predict`", "Spark `local[2]`",
                                      "local time / Spark time"],
                                     [*rows, ["Spark session start alone", "", f"{figures['spark_session_s']} s", ""]]))


if __name__ == "__main__":
    main()
