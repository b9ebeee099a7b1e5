"""Torch processes side by side on one machine: torch's default threads vs a share of the cores.

    PATH=.venv/bin:$PATH python -m bench.training.threads [--processes 2] [--epochs 3]

Runs `--processes` copies of `steps/train.py` (the `train` step's code, each with its own sqlite
tracking store) at the same time, first with torch's default intra-op threads (one per core in
every process), then with OMP_NUM_THREADS = cores / processes. Reports the median epoch time
(the step's own "epoch k/N ... (s)" line) alone and side by side. This is the situation of
`make test`'s two workers, of several `tune` workers on one machine and of a multi-worker
scoring server.
"""

import os
import re
import statistics
import subprocess
import sys
import tempfile

from bench.common import ROOT, child_env, command_line, report, sqlite_store

EPOCH_LINE = re.compile(r"^epoch \d+/\d+ .*\(([\d.]+)s\)$", re.M)


def epoch_seconds(processes: int, epochs: int, threads: int | None) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        env = child_env()
        env.pop("OMP_NUM_THREADS", None)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        procs = [subprocess.Popen(
            [sys.executable, str(ROOT / "steps" / "train.py"), "--epochs", str(epochs),
             "--data_dir", str(ROOT / "data" / "sample")],
            env={**env, "MLFLOW_TRACKING_URI": sqlite_store(tmp, f"mlflow{i}.db")}, cwd=tmp,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(processes)]
        outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("\n".join(o[-2000:] for o in outputs))
    # The first epoch of each process also pays for warm-up: leave it out.
    return [float(s) for out in outputs for s in EPOCH_LINE.findall(out)[1:]]


def main(argv: list[str] | None = None) -> dict:
    parser = command_line(__doc__)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    share = max(1, cores // args.processes)
    figures = {"cores": cores, "processes": args.processes, "epochs": args.epochs}
    for label, processes, threads in (
            ("one process alone, torch's default threads", 1, None),
            (f"{args.processes} at once, torch's default threads", args.processes, None),
            (f"{args.processes} at once, `OMP_NUM_THREADS={share}` each", args.processes, share)):
        figures[label] = epoch_seconds(processes, args.epochs, threads)
        print(label, figures[label], flush=True)
    return report("threads", figures, (["", "epoch (median, first epoch left out)"], [
        [label, statistics.median(seconds)] for label, seconds in list(figures.items())[3:]]))


if __name__ == "__main__":
    main()
