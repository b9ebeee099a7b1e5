"""Entry point `main`: train -> register -> torchscript -> promote, reusing finished steps."""

import argparse

from lightcycle.tracking import run_step

TRAIN_DEFAULTS = {
    "model": "cnn", "epochs": "40", "batch_size": "32", "learning_rate": "0.005",
    "weight_decay": "0.0001", "seed": "42", "data_dir": "data/sample", "download": "false",
    "precision": "32", "accelerator": "cpu", "devices": "1", "strategy": "auto",
    "num_workers": "0",
}


def main(argv=None):
    from lightcycle.cli import boolean

    parser = argparse.ArgumentParser(description=__doc__)
    # Train params stay strings: they are passed on and compared exactly as MLflow stores them.
    for name, default in TRAIN_DEFAULTS.items():
        parser.add_argument(f"--{name}", default=default)
    parser.add_argument("--model_name", default="lightcycle-fashion")
    parser.add_argument("--min_accuracy", default="0.5")
    parser.add_argument("--method", default="script", help="TorchScript conversion: script|trace")
    parser.add_argument("--deployable", default="torchscript", help="torchscript|pt2|both")
    parser.add_argument("--force", type=boolean, default=False)
    args = parser.parse_args(argv)

    import mlflow

    from lightcycle import pipeline, tracking

    pipeline.parse_deployable(args.deployable)  # a typo fails before anything runs
    tracking.check_tracking_server()
    with mlflow.start_run():
        mlflow.set_tags(tracking.step_tags("main"))
        result = pipeline.run_pipeline(
            str(tracking.PROJECT_ROOT),
            {name: getattr(args, name) for name in TRAIN_DEFAULTS},
            args.model_name, args.min_accuracy, args.method, args.force, args.deployable,
        )
    print(pipeline.summary(result))


if __name__ == "__main__":
    run_step(main)
