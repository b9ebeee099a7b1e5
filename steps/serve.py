"""Entry point `serve`: run `mlflow models serve` on the champion (or a named version); with
follow=true, serve the alias and move to each version it comes to name."""

import argparse

from lightcycle import defaults
from lightcycle.cli import boolean, integer, run_step, text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_uri", type=text, default=defaults.SERVE["model_uri"])
    parser.add_argument("--host", type=text, default=defaults.SERVE["host"])
    parser.add_argument("--port", type=integer, default=defaults.SERVE["port"])
    parser.add_argument("--workers", type=integer, default=defaults.SERVE["workers"])
    parser.add_argument("--follow", type=boolean, default=defaults.SERVE["follow"])
    parser.add_argument("--poll_seconds", type=integer, default=defaults.SERVE["poll_seconds"])
    parser.add_argument("--webhook_port", type=integer, default=defaults.SERVE["webhook_port"])
    parser.add_argument("--webhook_url", type=text, default=defaults.SERVE["webhook_url"])
    args = parser.parse_args(argv)

    from lightcycle.lifecycle import connection, tracking
    from lightcycle.serving import scoring_server

    connection.check_tracking_server()
    tracking.label_step_run("serve")
    if args.follow:
        from lightcycle.serving.follow import Follower

        Follower(args.model_uri, args.host, args.port, args.workers, args.poll_seconds,
                 args.webhook_port, webhook_url=args.webhook_url).run()
    else:
        scoring_server.exec_server(args.model_uri, args.host, args.port, args.workers)


if __name__ == "__main__":
    run_step(main)
