"""Entry point `promote`: gate the challenger on held-out data and move `champion` if it earns it."""

import argparse

from lightcycle.tracking import run_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_name", default="lightcycle-fashion-scripted")
    parser.add_argument("--min_accuracy", type=float, default=0.5)
    parser.add_argument("--version", default="", help="version to gate (default: @challenger)")
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args(argv)

    import mlflow

    from lightcycle import data, tracking
    from lightcycle.promote import promote

    tracking.check_tracking_server()
    with mlflow.start_run():
        mlflow.set_tags(tracking.step_tags("promote"))
        result = promote(args.model_name, args.min_accuracy, args.version,
                         args.data_dir or data.default_data_dir())
    verdict = "PROMOTED to champion" if result.promoted else "NOT promoted"
    print(f"{result.candidate.uri}: {verdict}: {result.reason}")


if __name__ == "__main__":
    run_step(main)
