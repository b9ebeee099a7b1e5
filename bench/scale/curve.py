"""How lightcycle grows with data and with clients: the scale curve.

    PATH=.venv/bin:$PATH python -m bench.scale.curve [--sizes 720,7200,60000] [--clients 1,8,32]
        [--seconds 15]

For each train-set size (the sample, then synthetic sets tiled and shifted from it: 7,200 and
60,000 images, with a test set one sixth of that; built in a temp dir, never committed):
`mlflow run . -e main -P epochs=1` on a fresh sqlite store, its wall time, the train step's
epoch time (from its progress line) and the peak RSS of the largest step process. Then the
sample champion behind `mlflow run . -e serve`, under 1, 8 and 32 concurrent clients sending
batch-1 requests: throughput and p50/p99 latency. Prints JSON, saved to bench/results/.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import (ROOT, child_env, free_port, markdown_table, save, sqlite_store,
                          stop_process, synthetic_data_dir, wait_for_http)
from bench.serving import load as load_generator


def run_main(data_dir: Path, env: dict, name: str) -> dict:
    start = time.perf_counter()
    result = subprocess.run(
        ["mlflow", "run", str(ROOT), "-e", "main", "--env-manager", "local", "-P", "epochs=1",
         "-P", f"data_dir={data_dir}", "-P", f"model_name={name}", "-P", "min_accuracy=0.0"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-3000:] + result.stderr[-3000:])
    epoch = re.search(r"epoch 1/1 .*\(([\d.]+)s\)", result.stdout + result.stderr)
    return {"main_seconds": round(wall, 1),
            "epoch_seconds": float(epoch[1]) if epoch else None,
            # ru_maxrss of children: the largest step process this run waited for (KiB).
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def serve_curve(env: dict, model_uri: str, clients: list[int], seconds: float) -> dict:
    port = free_port()
    proc = subprocess.Popen(["mlflow", "run", str(ROOT), "-e", "serve", "--env-manager", "local",
                             "-P", f"model_uri={model_uri}", "-P", f"port={port}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/ping", proc, timeout=300)
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        mix = [r for r in load_generator.standard_mix(model_uri)
               if r.expected is not None and len(r.expected) == 1]
        curve = {}
        for n in clients:
            result = load_generator.run_load(url, mix, clients=n, seconds=seconds, warmup_seconds=3)
            curve[f"{n}_clients"] = {"requests_per_s": result.throughput_rps,
                                     "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                                     "errors": sum(v for k, v in result.statuses.items()
                                                   if str(k) != "200")}
            print(n, "clients", curve[f"{n}_clients"], flush=True)
        return curve
    finally:
        stop_process(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="720,7200,60000")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    figures: dict = {"sizes": {}}
    with tempfile.TemporaryDirectory(prefix="lightcycle-scale-") as tmp:
        env = child_env(MLFLOW_TRACKING_URI=sqlite_store(tmp))
        for size in (int(s) for s in args.sizes.split(",")):
            data_dir = (ROOT / "data" / "sample" if size == 720 else
                        synthetic_data_dir(Path(tmp) / f"data-{size}", size, size // 6))
            row = run_main(data_dir, env, f"scale-{size}")
            figures["sizes"][size] = row
            print(size, row, flush=True)
        figures["serving"] = serve_curve(env, "models:/scale-720-scripted@champion",
                                         [int(c) for c in args.clients.split(",")], args.seconds)
    save("scale_curve", figures)


def table(figures: dict) -> str:
    rows = [[f"{size} train images", row["main_seconds"], row["epoch_seconds"],
             row["peak_rss_mib"], "", "", "", ""] for size, row in figures["sizes"].items()]
    rows += [[clients.replace("_", " "), "", "", "", row["requests_per_s"], row["p50_ms"],
              row["p99_ms"], row["errors"]] for clients, row in figures["serving"].items()]
    return markdown_table(["load", "`main`, 1 epoch (s)", "epoch (s)", "peak RSS (MiB)",
                           "batch-1 requests/s", "p50 (ms)", "p99 (ms)", "errors"], rows)


if __name__ == "__main__":
    main()
