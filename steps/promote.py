"""Entry point `promote`: gate the challenger on held-out data and move `champion` if it earns it."""

import argparse

from lightcycle import defaults
from lightcycle.cli import run_step, text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_name", type=text, default=defaults.CHAIN["model_name"] + "-scripted")
    parser.add_argument("--min_accuracy", type=float, default=defaults.CHAIN["min_accuracy"])
    parser.add_argument("--version", type=text, default=defaults.PROMOTE_VERSION,
                        help="a version number, or an alias (default: the challenger)")
    parser.add_argument("--data_dir", type=text, default=defaults.DATA_DIR)
    args = parser.parse_args(argv)

    import mlflow

    from lightcycle.lifecycle import connection, tracking
    from lightcycle.lifecycle.promote import promote
    from lightcycle.model import data

    connection.check_tracking_server()
    with mlflow.start_run():
        tracking.label_step_run("promote", args.model_name,
                                {tracking.TAG_DATA_DIGEST: data.dataset_digest(args.data_dir)})
        result = promote(args.model_name, args.min_accuracy, args.version, args.data_dir)
    verdict = "PROMOTED to champion" if result.promoted else "NOT promoted"
    print(f"{result.candidate.uri}: {verdict}: {result.reason}")


if __name__ == "__main__":
    run_step(main)
