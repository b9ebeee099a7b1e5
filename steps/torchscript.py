"""Entry point `torchscript`: script/trace (or torch.export, int8, ONNX) the eager net, prove parity, log and
register the deployable."""

import argparse

from lightcycle import defaults
from lightcycle.cli import run_step, text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_uri", type=text, required=True,
                        help="models:/<name>/<version> or @<alias>")
    parser.add_argument("--method", type=text, default=defaults.CHAIN["method"],
                        help="script|trace (TorchScript), export (pt2), quantize (int8) or onnx")
    parser.add_argument("--data_dir", type=text, default=defaults.DATA_DIR)
    parser.add_argument("--deployable_name", type=text, default=defaults.AUTO,
                        help="registered name; auto: <name>-scripted, -pt2 (export), -int8 (quantize) or -onnx")
    args = parser.parse_args(argv)

    import mlflow

    from lightcycle.lifecycle import connection, export, tracking
    from lightcycle.model import data

    connection.check_tracking_server()
    with mlflow.start_run():
        tracking.label_step_run("torchscript", args.method,
                                {tracking.TAG_DATA_DIGEST: data.dataset_digest(args.data_dir)})
        name = None if args.deployable_name == defaults.AUTO else args.deployable_name
        result = export.publish(args.model_uri, args.method, args.data_dir, name)
    print(f"parity: {result.parity.describe()} ({result.stage})")
    print(f"registered {result.version.uri} from {result.source.uri} with alias challenger")


if __name__ == "__main__":
    run_step(main)
