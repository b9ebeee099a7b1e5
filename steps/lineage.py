"""Entry point `lineage`: print the chain behind a model version or alias."""

import argparse

from lightcycle.tracking import run_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_uri", default="models:/lightcycle-fashion-scripted@champion")
    args = parser.parse_args(argv)

    from lightcycle import lineage, tracking

    tracking.check_tracking_server()
    print(lineage.describe(args.model_uri))


if __name__ == "__main__":
    run_step(main)
