"""Entry point `serve`: run `mlflow models serve` on the champion (or a named version)."""

import argparse

from lightcycle.tracking import run_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_uri", default="models:/lightcycle-fashion-scripted@champion")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=lambda v: int(float(v)), default=5001)
    parser.add_argument("--workers", type=lambda v: int(float(v)), default=1)
    args = parser.parse_args(argv)

    from lightcycle import serve, tracking

    tracking.check_tracking_server()
    serve.exec_server(args.model_uri, args.host, args.port, args.workers)


if __name__ == "__main__":
    run_step(main)
