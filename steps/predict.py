"""Entry point `predict`: classify an IDX file, a PNG directory or a parquet/CSV; write a CSV."""

import argparse

from lightcycle.tracking import run_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_uri", default="models:/lightcycle-fashion-scripted@champion")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", default="predictions.csv")
    parser.add_argument("--batch_size", type=lambda v: int(float(v)), default=256)
    args = parser.parse_args(argv)

    import mlflow

    from lightcycle import tracking
    from lightcycle.predict import batch_predict

    tracking.check_tracking_server()
    with mlflow.start_run():
        mlflow.set_tags(tracking.step_tags("predict"))
        table = batch_predict(args.model_uri, args.input, args.output, args.batch_size)
        mlflow.log_artifact(args.output, "predictions")
        mlflow.log_metric("images", len(table))
    print(f"wrote {len(table)} predictions to {args.output} (also logged under predictions/)")


if __name__ == "__main__":
    run_step(main)
