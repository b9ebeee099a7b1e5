"""How lightcycle grows with data and with clients: the scale curve.

    PATH=.venv/bin:$PATH python -m bench.scale.curve [--sizes 720,7200,60000] [--clients 1,8,32]
        [--seconds 15]

For each train-set size (the sample, then synthetic sets tiled and shifted from it: 7,200 and
60,000 images, with a test set one sixth of that; built in a temp dir, never committed):
`mlflow run . -e main -P epochs=1` on a fresh sqlite store, its wall time, the train step's
epoch time (from its progress line) and the peak RSS of the largest step process. Then the
sample champion behind `mlflow run . -e serve`, under 1, 8 and 32 concurrent clients sending
batch-1 requests: throughput and p50/p99 latency.
"""

import os
import re
import resource
import tempfile
from pathlib import Path

from bench.common import (ROOT, child_env, clients_load, command_line, free_port, report, serving,
                          sqlite_store, synthetic_data_dir, timed_run)
from bench.serving.served import standard_mix


def run_main(data_dir: Path, env: dict, name: str) -> dict:
    wall, out = timed_run(["mlflow", "run", str(ROOT), "-e", "main", "--env-manager", "local",
                           "-P", "epochs=1", "-P", f"data_dir={data_dir}", "-P", f"model_name={name}",
                           "-P", "min_accuracy=0.0"], env)
    epoch = re.search(r"epoch 1/1 .*\(([\d.]+)s\)", out)
    return {"main_seconds": round(wall, 1), "epoch_seconds": float(epoch[1]) if epoch else None,
            # ru_maxrss of children: the largest step process this run waited for (KiB).
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def serve_curve(env: dict, model_uri: str, clients: list[int], seconds: float) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serving(["mlflow", "run", str(ROOT), "-e", "serve", "--env-manager", "local",
                  "-P", f"model_uri={model_uri}", "-P", f"port={port}"], url + "/ping", env):
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        mix = [r for r in standard_mix(model_uri) if r.kind == "good" and r.images == 1]
        clients_load(url + "/invocations", mix, 1, 3, warmup=0)
        return {n: clients_load(url + "/invocations", mix, n, seconds) for n in clients}


def main(argv: list[str] | None = None) -> dict:
    parser = command_line(__doc__, seconds=15)
    parser.add_argument("--sizes", default="720,7200,60000")
    parser.add_argument("--clients", default="1,8,32")
    args = parser.parse_args(argv)
    sizes: dict = {}
    with tempfile.TemporaryDirectory(prefix="lightcycle-scale-") as tmp:
        env = child_env(MLFLOW_TRACKING_URI=sqlite_store(tmp))
        for size in (int(s) for s in args.sizes.split(",")):
            data_dir = (ROOT / "data" / "sample" if size == 720 else
                        synthetic_data_dir(Path(tmp) / f"data-{size}", size, size // 6))
            sizes[size] = run_main(data_dir, env, f"scale-{size}")
            print(size, sizes[size], flush=True)
        curve = serve_curve(env, "models:/scale-720-scripted@champion",
                            [int(c) for c in args.clients.split(",")], args.seconds)
    return report("scale_curve", {"sizes": sizes, "serving": curve}, (
        ["train images (test)", "epoch (s)", "`main`, 1 epoch, end to end (s)", "peak RSS (MiB)"],
        [[f"{size:,} ({size // 6 if size != 720 else 180})", row["epoch_seconds"], row["main_seconds"],
          row["peak_rss_mib"]] for size, row in sizes.items()]), (
        ["concurrent clients", "requests/s", "p50 (ms)", "p99 (ms)", "errors"],
        [[n, got["requests_per_s"], got["p50_ms"], got["p99_ms"], got["errors"]]
         for n, got in curve.items()]))


if __name__ == "__main__":
    main()
