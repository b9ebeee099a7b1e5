"""Entry point `main`: train -> register -> torchscript -> promote, reusing finished steps."""

import argparse

from lightcycle import defaults
from lightcycle.cli import boolean, run_step, text

# The train parameters `main` passes on (num_nodes, width and depth keep their defaults).
CHAIN_TRAIN_PARAMS = ("model", "epochs", "batch_size", "learning_rate", "weight_decay", "seed",
                      "data_dir", "download", "data_mirror", "precision", "accelerator",
                      "devices", "strategy", "num_workers", "engine", "num_processes",
                      "spark_master", "spark_conf")


def main(argv=None):
    from lightcycle.lifecycle.tracking import canonical_param

    parser = argparse.ArgumentParser(description=__doc__)
    # Train params stay strings: they are passed on as MLflow stores them.
    for name in CHAIN_TRAIN_PARAMS:
        default = defaults.TRAIN[name]
        parser.add_argument(f"--{name}", type=text, default=canonical_param(default, default))
    parser.add_argument("--model_name", type=text, default=defaults.CHAIN["model_name"])
    parser.add_argument("--min_accuracy", type=float, default=defaults.CHAIN["min_accuracy"])
    parser.add_argument("--method", type=text, default=defaults.CHAIN["method"],
                        help="TorchScript conversion: script|trace")
    parser.add_argument("--deployable", type=text, default=defaults.CHAIN["deployable"],
                        help="torchscript|pt2|both")
    parser.add_argument("--force", type=boolean, default=defaults.CHAIN["force"])
    args = parser.parse_args(argv)

    import mlflow

    from lightcycle.lifecycle import connection, pipeline, tracking

    pipeline.parse_deployable(args.deployable)  # a typo fails before anything runs
    connection.check_tracking_server()
    with mlflow.start_run():
        tracking.label_step_run("main", f"{args.model}-{args.epochs}ep")
        result = pipeline.run_pipeline(
            str(tracking.PROJECT_ROOT),
            {name: getattr(args, name) for name in CHAIN_TRAIN_PARAMS},
            args.model_name, args.min_accuracy, args.method, args.force, args.deployable,
        )
    print(pipeline.summary(result))


if __name__ == "__main__":
    run_step(main)
