"""Entry point `register`: register a training run's model in the registry (idempotent)."""

import argparse

from lightcycle import defaults
from lightcycle.cli import run_step, text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run_id", type=text, required=True)
    parser.add_argument("--model_name", type=text, default=defaults.MODEL_NAME)
    args = parser.parse_args(argv)

    import mlflow

    from lightcycle.lifecycle import connection, registry, tracking

    connection.check_tracking_server()
    with mlflow.start_run():
        tracking.label_step_run("register", args.model_name)
        mv, created = registry.register_training_run(args.run_id, args.model_name)
        uri = f"models:/{mv.name}/{mv.version}"
        mlflow.set_tags({tracking.TAG_OUTPUT_URI: uri, "lightcycle.created": str(created).lower()})
    print(f"{'registered' if created else 'already registered'}: {uri} (run {args.run_id})")


if __name__ == "__main__":
    run_step(main)
