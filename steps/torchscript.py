"""Entry point `torchscript`: script/trace (or torch.export) the eager net, prove parity, log and
register the deployable."""

import argparse

from lightcycle.tracking import run_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_uri", required=True, help="models:/<name>/<version> or @<alias>")
    parser.add_argument("--method", default="script", help="script|trace (TorchScript) or export (pt2)")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--deployable_name", default="")
    args = parser.parse_args(argv)

    import mlflow

    from lightcycle import data, export, tracking

    tracking.check_tracking_server()
    with mlflow.start_run():
        mlflow.set_tags(tracking.step_tags("torchscript"))
        result = export.publish(args.model_uri, args.method,
                                args.data_dir or data.default_data_dir(),
                                args.deployable_name or None)
    print(f"parity: {result.parity.describe()} ({result.stage})")
    print(f"registered {result.version.uri} from {result.source.uri} with alias challenger")


if __name__ == "__main__":
    run_step(main)
