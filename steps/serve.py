"""Entry point `serve`: run `mlflow models serve` on the champion (or a named version)."""

import argparse

from lightcycle import defaults
from lightcycle.cli import integer, run_step, text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_uri", type=text, default=defaults.SERVE["model_uri"])
    parser.add_argument("--host", type=text, default=defaults.SERVE["host"])
    parser.add_argument("--port", type=integer, default=defaults.SERVE["port"])
    parser.add_argument("--workers", type=integer, default=defaults.SERVE["workers"])
    args = parser.parse_args(argv)

    from lightcycle.lifecycle import connection, tracking
    from lightcycle.serving import scoring_server

    connection.check_tracking_server()
    tracking.label_step_run("serve")
    scoring_server.exec_server(args.model_uri, args.host, args.port, args.workers)


if __name__ == "__main__":
    run_step(main)
