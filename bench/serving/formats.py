"""Inference speed in-process (eager / scripted / frozen / optimize_for_inference / pt2) and served.

    PATH=.venv/bin:$PATH python -m bench.serving.formats [--seconds 3] [--skip-served]

In-process: every (variant, batch size) pair gets a freshly converted module, 20 warm-up calls
at that batch size and then `--seconds` of calls, so TorchScript's profiling executor never sees
a second shape (which would make it re-specialize and measure that instead).

Served: `mlflow models serve` on a deployable saved exactly as the chain logs it
(lightcycle.lifecycle.export.deployable_model_kwargs), one client with keep-alive, on this same machine,
once per format. Then the batch-64 request is split into its parts in-process (JSON parse,
list -> ndarray, predict, response JSON) to show where the served time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
import warnings

import numpy as np
import requests
import torch

from bench.common import (child_env, free_port, images_per_second, markdown_table, save,
                          stop_process, untrained_cnn)
from lightcycle.lifecycle import export
from lightcycle.model import data

warnings.simplefilter("ignore", FutureWarning)


def batch_of(size: int) -> torch.Tensor:
    images = data.load_split(data.default_data_dir(), "test").images
    images = np.concatenate([images] * (size // len(images) + 1))[:size]
    return torch.from_numpy(images[:, None].astype(np.float32))


def throughput(fn, batch: int, seconds: float) -> float:
    return images_per_second(fn, batch_of(batch), seconds)


def factories(net) -> dict:
    def program():
        return export.roundtrip_program(export.convert(net, "export", batch_of(2))).module()

    return {
        "eager": lambda: net,
        "scripted": lambda: export.roundtrip(torch.jit.script(net)),
        "frozen": lambda: export.roundtrip(torch.jit.freeze(torch.jit.script(net))),
        "optimize_for_inference": lambda: export.roundtrip(
            torch.jit.optimize_for_inference(torch.jit.script(net))),
        "pt2": program,
    }


def in_process(net, seconds: float) -> dict:
    figures = {}
    for name, make in factories(net).items():
        row = {}
        for batch in (1, 64):
            try:
                row[f"batch{batch}"] = round(throughput(make(), batch, seconds))
            except RuntimeError as exc:  # the chain's parity check drops such a stage the same way
                row = f"fails at run time: {str(exc).splitlines()[0][:160]}"
                break
        figures[name] = row
        print(name, row, flush=True)
    return figures


def bodies() -> tuple[str, str]:
    images = batch_of(64).numpy()
    return json.dumps({"inputs": images[:1].tolist()}), json.dumps({"inputs": images.tolist()})


def served(model_dir: str) -> dict:
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen(["mlflow", "models", "serve", "-m", model_dir, "--env-manager", "local",
                             "-p", str(port)], env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/invocations"
    one, many = bodies()
    headers = {"Content-Type": "application/json"}
    try:
        with requests.Session() as session:
            while True:
                try:
                    if session.post(url, data=one, headers=headers, timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    time.sleep(0.05)
            cold_start = time.perf_counter() - start
            latencies = []
            for _ in range(500):
                t = time.perf_counter()
                session.post(url, data=one, headers=headers).raise_for_status()
                latencies.append((time.perf_counter() - t) * 1000)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 5:
                session.post(url, data=many, headers=headers).raise_for_status()
                n += 1
            batch64 = n * 64 / (time.perf_counter() - t0)
    finally:
        stop_process(proc)
    latencies.sort()
    return {"cold_start_s": round(cold_start, 2), "batch1_p50_ms": round(latencies[249], 2),
            "batch1_p99_ms": round(latencies[494], 2), "batch64_images_per_s": round(batch64),
            "batch64_ms_per_request": round(64_000 / batch64, 2), "clients": 1}


def breakdown(model_dir: str, repeats: int = 50) -> dict:
    """Milliseconds per batch-64 request for each part the scoring server does in-process."""
    import io

    import mlflow.pyfunc
    from mlflow.pyfunc.scoring_server import invocations, predictions_to_json

    model = mlflow.pyfunc.load_model(model_dir)
    _, many = bodies()
    parts = {"json_parse": lambda: json.loads(many)}
    parsed = json.loads(many)
    parts["to_ndarray"] = lambda: np.asarray(parsed["inputs"], dtype=np.float32)
    array = np.asarray(parsed["inputs"], dtype=np.float32)
    parts["pyfunc_predict"] = lambda: model.predict(array)
    prediction = model.predict(array)
    parts["response_json"] = lambda: predictions_to_json(prediction, io.StringIO())
    # What the server's request handler runs, minus HTTP: the parts above plus MLflow's glue.
    parts["scoring_server_invocations"] = lambda: invocations(
        many.encode(), "application/json", model, model.metadata.get_input_schema())
    out = {}
    for name, fn in parts.items():
        for _ in range(5):
            fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = round((time.perf_counter() - start) / repeats * 1000, 2)
    out["sum_of_parts"] = round(sum(v for k, v in out.items() if k != "scoring_server_invocations"), 2)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--skip-served", action="store_true")
    args = parser.parse_args()
    import mlflow.pyfunc

    net = untrained_cnn()
    figures = {"in_process_images_per_s": in_process(net, args.seconds)}
    best = max(v["batch64"] for v in figures["in_process_images_per_s"].values()
               if isinstance(v, dict))
    if not args.skip_served:
        for fmt, converted in (("torchscript", torch.jit.freeze(torch.jit.script(net))),
                               ("pt2", export.convert(net, "export", batch_of(2)))):
            with tempfile.TemporaryDirectory() as tmp:
                archive = os.path.join(tmp, "model.pt2" if fmt == "pt2" else "model.pt")
                export.save_archive(converted, archive)
                model_dir = os.path.join(tmp, "model")
                mlflow.pyfunc.save_model(model_dir, **export.deployable_model_kwargs(archive, fmt))
                figures[f"served_{fmt}"] = served(model_dir)
                figures[f"served_{fmt}"]["vs_best_in_process_batch64"] = round(
                    figures[f"served_{fmt}"]["batch64_images_per_s"] / best, 3)
                figures[f"batch64_breakdown_ms_{fmt}"] = breakdown(model_dir)
                print(fmt, figures[f"served_{fmt}"], figures[f"batch64_breakdown_ms_{fmt}"],
                      flush=True)
    figures["goals"] = {"served_vs_best_in_process_batch64": 0.5, "batch1_p50_ms": 4,
                        "batch1_p99_ms": 15, "cold_start_s": 8}
    save("serve", figures)


def table(figures: dict) -> str:
    rows = [[f"in process, {name}", *([row["batch1"], row["batch64"]] if isinstance(row, dict)
                                      else [row, ""]), "", "", ""]
            for name, row in figures["in_process_images_per_s"].items()]
    for fmt in ("torchscript", "pt2"):
        if f"served_{fmt}" in figures:
            served = figures[f"served_{fmt}"]
            rows.append([f"served, {fmt}", "", served["batch64_images_per_s"],
                         served["cold_start_s"], served["batch1_p50_ms"], served["batch1_p99_ms"]])
    return markdown_table(["variant", "batch-1 images/s", "batch-64 images/s", "cold start (s)",
                           "batch-1 p50 (ms)", "batch-1 p99 (ms)"], rows)


if __name__ == "__main__":
    main()
