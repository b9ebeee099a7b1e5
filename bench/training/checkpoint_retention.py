"""Artifact bytes of a train run's checkpoints before and after retention.

    PATH=.venv/bin:$PATH python -m bench.training.checkpoint_retention [EPOCHS (40)] [MODEL (cnn)]

Runs `mlflow run . -e train -P epochs=N -P model=M` against a fresh `mlflow server` with proxied
artifacts, then sums the bytes under checkpoints/ on the server's disk: what autolog logged
(the epoch count times one checkpoint, read from the run's output) and what is left.
Writes bench/results/checkpoint_retention_<model>_<epochs>.json.
"""

import os
import re
import tempfile
from pathlib import Path

from bench.common import ROOT, child_env, command_line, free_port, report, serving, timed_run
from lightcycle.operations.tracking_server import mlflow_server_command


def main(argv: list[str] | None = None) -> dict:
    parser = command_line(__doc__)
    parser.add_argument("epochs", type=int, nargs="?", default=40, help="default: 40")
    parser.add_argument("model", nargs="?", default="cnn", help="default: cnn")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-retention-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with serving(mlflow_server_command(f"sqlite:///{tmp}/mlflow.db", Path(tmp, "artifacts"),
                                           "127.0.0.1", port), url + "/health",
                     {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, timeout=120):
            _, out = timed_run(["mlflow", "run", str(ROOT), "-e", "train", "--env-manager", "local",
                                "-P", f"epochs={args.epochs}", "-P", f"model={args.model}"],
                               child_env(MLFLOW_TRACKING_URI=url))
        dirs = list(Path(tmp, "artifacts").rglob("checkpoints/epoch_*"))
        kept = sum(f.stat().st_size for d in dirs for f in d.iterdir())
    line = next(l for l in out.splitlines() if l.startswith("checkpoints: "))
    removed_mb = float(re.search(r"\(([\d.]+) MB\)", line).group(1))
    figures = {"epochs": args.epochs, "kept_checkpoints": len(dirs), "kept_mb": round(kept / 1e6, 2),
               "before_mb": round(kept / 1e6 + removed_mb, 2), "log_line": line}
    return report(f"checkpoint_retention_{args.model}_{args.epochs}", figures, (
        [f"checkpoints of one {args.epochs}-epoch `{args.model}` run", "count", "MB"],
        [["logged by autolog (one per epoch)", args.epochs, figures["before_mb"]],
         ["left once the run finished", len(dirs), figures["kept_mb"]]]))


if __name__ == "__main__":
    main()
