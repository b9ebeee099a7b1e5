"""Inference speed in-process (eager / scripted / frozen / optimize_for_inference) and served.

    PATH=.venv/bin:$PATH .venv/bin/python bench/bench_serve.py

Served figures use `mlflow models serve` on a deployable saved exactly as the chain logs it
(TorchScript archive + serving_model.py), one client with keep-alive, on this same machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import requests
import torch

from common import save
from lightcycle import data, export
from lightcycle.nets import build_net

warnings.simplefilter("ignore", FutureWarning)


def throughput(fn, batch: int, seconds: float = 3.0) -> float:
    x = torch.from_numpy(data.load_split(data.default_data_dir(), "test").images[:batch, None]
                         .astype(np.float32))
    if len(x) < batch:
        x = x.repeat(batch // len(x) + 1, 1, 1, 1)[:batch]
    with torch.inference_mode():
        for _ in range(10):
            fn(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn(x)
            n += 1
    return n * batch / (time.perf_counter() - start)


def variants(net):
    scripted = torch.jit.script(net)
    frozen = torch.jit.freeze(torch.jit.script(net))
    out = {"eager": net, "scripted": scripted, "frozen": frozen}
    try:
        out["optimize_for_inference"] = torch.jit.optimize_for_inference(torch.jit.script(net))
    except RuntimeError as exc:
        print("optimize_for_inference failed:", exc)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(model_dir: str) -> dict:
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    proc = subprocess.Popen(["mlflow", "models", "serve", "-m", model_dir, "--env-manager", "local",
                             "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/invocations"
    images = data.load_split(data.default_data_dir(), "test").images.astype(np.float32)
    one = json.dumps({"inputs": images[:1, None].tolist()})
    many = json.dumps({"inputs": np.concatenate([images, images])[:64, None].tolist()})
    headers = {"Content-Type": "application/json"}
    try:
        with requests.Session() as session:
            while True:
                try:
                    if session.post(url, data=one, headers=headers, timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    time.sleep(0.1)
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
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    latencies.sort()
    return {"cold_start_s": round(cold_start, 2), "batch1_p50_ms": round(latencies[249], 2),
            "batch1_p99_ms": round(latencies[494], 2), "batch64_images_per_s": round(batch64),
            "clients": 1}


def main():
    torch.manual_seed(0)
    net = build_net("cnn").eval()
    figures = {"in_process_images_per_s": {}}
    for name, module in variants(net).items():
        try:
            figures["in_process_images_per_s"][name] = {
                "batch1": round(throughput(module, 1)), "batch64": round(throughput(module, 64))}
        except RuntimeError as exc:  # the chain's parity check drops such a stage the same way
            figures["in_process_images_per_s"][name] = f"fails at run time: {str(exc)[-120:]}"
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        archive = os.path.join(tmp, "model.pt")
        torch.jit.save(torch.jit.freeze(torch.jit.script(net)), archive)
        model_dir = os.path.join(tmp, "model")
        mlflow.pyfunc.save_model(model_dir, python_model=str(export.SERVING_MODEL_CODE),
                                 artifacts={"torchscript": archive},
                                 model_config={"class_names": list(data.CLASS_NAMES),
                                               "max_batch": export.MAX_BATCH},
                                 pip_requirements=["torch", "numpy", "pandas"])
        figures["served"] = served(model_dir)
    best = max(v["batch64"] for v in figures["in_process_images_per_s"].values()
               if isinstance(v, dict))
    figures["served_vs_best_in_process_batch64"] = round(figures["served"]["batch64_images_per_s"] / best, 3)
    figures["goals"] = {"served_vs_best_in_process_batch64": 0.5, "batch1_p50_ms": 4,
                        "batch1_p99_ms": 15, "cold_start_s": 8}
    save("serve", figures)


if __name__ == "__main__":
    main()
