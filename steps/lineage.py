"""Entry point `lineage`: print the chain behind a model version or alias."""

import argparse

from lightcycle import defaults
from lightcycle.cli import run_step, text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_uri", type=text, default=defaults.SERVE["model_uri"])
    args = parser.parse_args(argv)

    from lightcycle.lifecycle import connection, lineage, tracking

    connection.check_tracking_server()
    tracking.label_step_run("lineage")
    print(lineage.describe(args.model_uri))


if __name__ == "__main__":
    run_step(main)
