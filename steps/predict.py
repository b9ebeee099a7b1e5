"""Entry point `predict`: classify an IDX file, a PNG directory or a parquet/CSV; write a CSV."""

import argparse
import os
import tempfile

from lightcycle import defaults
from lightcycle.cli import integer, run_step, text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_uri", type=text, default=defaults.SERVE["model_uri"])
    parser.add_argument("--input", type=text, required=True)
    parser.add_argument("--output", type=text, default=defaults.AUTO,
                        help="a CSV path; auto: only the run's artifact predictions/predictions.csv")
    parser.add_argument("--batch_size", type=integer, default=defaults.PREDICT_BATCH_SIZE)
    args = parser.parse_args(argv)

    import mlflow

    from lightcycle.lifecycle import connection, tracking
    from lightcycle.serving.predict import batch_predict

    connection.check_tracking_server()
    with mlflow.start_run() as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tags(tracking.step_tags("predict"))
        output = os.path.join(tmp, "predictions.csv") if args.output == defaults.AUTO else args.output
        table = batch_predict(args.model_uri, args.input, output, args.batch_size)
        mlflow.log_artifact(output, "predictions")
        mlflow.log_metric("images", len(table))
    where = "" if args.output == defaults.AUTO else f" to {args.output} and"
    print(f"wrote {len(table)} predictions{where} to run {run.info.run_id}'s artifact "
          f"predictions/{os.path.basename(output)}; fetch it with: mlflow artifacts download "
          f"-r {run.info.run_id} -a predictions")


if __name__ == "__main__":
    run_step(main)
