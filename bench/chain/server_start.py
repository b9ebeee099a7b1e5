"""`mlflow server` start-up with and without MLflow's job runner (the test suite starts
a dozen servers).

    PATH=.venv/bin:$PATH python -m bench.chain.server_start [--repeats 3]

Each start: `mlflow server --workers 1` on a fresh sqlite store, timed to the first 200 on
/health, then the number of processes in its group and their total RSS. Alternates the two
settings so load from other processes hits both alike; medians of the starts.
"""

import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import command_line, free_port, report, serving
from lightcycle.operations.tracking_server import mlflow_server_command


def start_once(jobs: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true" if jobs else "false"}
        with serving(mlflow_server_command(f"sqlite:///{tmp}/mlflow.db", Path(tmp, "artifacts"),
                                           "127.0.0.1", port),
                     f"http://127.0.0.1:{port}/health", env, timeout=180) as (proc, seconds):
            time.sleep(3)  # let the job runner's consumers finish starting before counting them
            out = subprocess.run(["ps", "-o", "rss=", "-g", str(proc.pid)], capture_output=True,
                                 text=True).stdout.split()
            return {"seconds": seconds, "processes": len(out),
                    "rss_mib": sum(int(x) for x in out) / 1024}


def main(argv: list[str] | None = None) -> dict:
    parser = command_line(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows: dict[bool, list[dict]] = {True: [], False: []}
    for _ in range(args.repeats):  # alternating, so load from elsewhere hits both alike
        for jobs in (True, False):
            rows[jobs].append(start_once(jobs))
    figures = {("job runner on" if jobs else "job runner off"): {
        k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
        for jobs, runs in rows.items()}
    return report("server_start", figures, (
        ["`mlflow server --workers 1`, fresh sqlite", "to first 200 on /health (s)", "processes",
         "RSS (MiB)"], [[setting, *row.values()] for setting, row in figures.items()]))


if __name__ == "__main__":
    main()
