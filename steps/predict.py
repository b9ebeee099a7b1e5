"""Entry point `predict`: classify an IDX file, a PNG directory or a parquet/CSV; write a CSV.
With engine=spark: score a parquet file or folder on Spark (mlflow.pyfunc.spark_udf); write
parquet."""

import argparse
import os
import tempfile
from pathlib import Path

from lightcycle import defaults
from lightcycle.cli import integer, run_step, text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_uri", type=text, default=defaults.SERVE["model_uri"])
    parser.add_argument("--input", type=text, required=True)
    parser.add_argument("--output", type=text, default=defaults.PREDICT["output"],
                        help="a CSV path (local) or parquet folder (spark); auto: only the run's "
                             "artifacts under predictions/")
    parser.add_argument("--batch_size", type=integer, default=defaults.PREDICT["batch_size"])
    parser.add_argument("--engine", type=text, choices=("local", "spark"),
                        default=defaults.PREDICT["engine"])
    parser.add_argument("--spark_master", type=text, default=defaults.PREDICT["spark_master"],
                        help="auto: the master spark-submit or a notebook set up, else local[2]")
    parser.add_argument("--spark_conf", type=text, default=defaults.PREDICT["spark_conf"],
                        help="key=value,key=value; none: Spark's defaults")
    args = parser.parse_args(argv)
    spark = args.engine == "spark"

    import mlflow

    from lightcycle.lifecycle import connection, tracking
    from lightcycle.serving.predict import batch_predict, spark_predict

    connection.check_tracking_server()
    with mlflow.start_run() as run, tempfile.TemporaryDirectory() as tmp:
        tracking.label_step_run("predict")
        output = None if args.output == defaults.AUTO else args.output
        if spark:
            master = "" if args.spark_master == defaults.AUTO else args.spark_master
            conf = "" if args.spark_conf == "none" else args.spark_conf
            result = spark_predict(args.model_uri, args.input, output, master, conf, tmp)
            images, output = result.images, result.output
            if "://" in output or output.startswith(("dbfs:", "file:")):
                mlflow.set_tag("lightcycle.predictions_uri", output)
            else:  # the part files and _SUCCESS, not Hadoop's hidden .crc files
                for part in sorted(Path(output).iterdir()):
                    if not part.name.startswith("."):
                        mlflow.log_artifact(str(part), "predictions")
        else:
            output = output or os.path.join(tmp, "predictions.csv")
            images = len(batch_predict(args.model_uri, args.input, output, args.batch_size))
            mlflow.log_artifact(output, "predictions")
        mlflow.log_metric("images", images)
    where = "" if args.output == defaults.AUTO else f" to {args.output} and"
    print(f"wrote {images} predictions{where} to run {run.info.run_id}'s artifacts "
          f"predictions/; fetch them with: mlflow artifacts download -r {run.info.run_id} "
          "-a predictions")


if __name__ == "__main__":
    run_step(main)
