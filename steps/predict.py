"""Entry point `predict`: classify an IDX file, a PNG directory or a parquet/CSV; write a CSV.
With --engine spark: score a parquet file or folder on Spark (mlflow.pyfunc.spark_udf); write
parquet."""

import argparse
from pathlib import Path

from lightcycle.tracking import run_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_uri", default="models:/lightcycle-fashion-scripted@champion")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", default="",
                        help="default: predictions.csv (local), predictions.parquet (spark)")
    parser.add_argument("--batch_size", type=lambda v: int(float(v)), default=256)
    parser.add_argument("--engine", choices=("local", "spark"), default="local")
    parser.add_argument("--spark_master", default="",
                        help="empty: spark-submit's master, else local[2]")
    parser.add_argument("--spark_conf", default="", help="key=value,key=value")
    args = parser.parse_args(argv)
    spark = args.engine == "spark"
    output = args.output or ("predictions.parquet" if spark else "predictions.csv")

    import mlflow

    from lightcycle import tracking
    from lightcycle.predict import batch_predict, spark_predict

    tracking.check_tracking_server()
    with mlflow.start_run():
        mlflow.set_tags(tracking.step_tags("predict"))
        if spark:
            images = spark_predict(args.model_uri, args.input, output, args.spark_master,
                                   args.spark_conf).images
            if "://" in output or output.startswith(("dbfs:", "file:")):
                mlflow.set_tag("lightcycle.predictions_uri", output)
            else:  # the part files and _SUCCESS, not Hadoop's hidden .crc files
                for part in sorted(Path(output).iterdir()):
                    if not part.name.startswith("."):
                        mlflow.log_artifact(str(part), "predictions")
        else:
            images = len(batch_predict(args.model_uri, args.input, output, args.batch_size))
            mlflow.log_artifact(output, "predictions")
        mlflow.log_metric("images", images)
    print(f"wrote {images} predictions to {output} (also logged under predictions/)")


if __name__ == "__main__":
    run_step(main)
