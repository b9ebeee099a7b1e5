"""Served figures in one run, each beside its reference (medians over rounds).

    PATH=.venv/bin:$PATH python -m bench.serving.served [--rounds 3] [--seconds 4]
        [--reference-rev 1879355] [--eager-uri models:/lightcycle-fashion/1]

One net (`--eager-uri`, or a `cnn` trained `--train-epochs` epochs on the sample by the plain
loop of bench.common; 0: untrained, same shapes and cost) gives:
  * a frozen TorchScript archive (`torch.jit.freeze(torch.jit.script(net))`) behind
    `deployable_model_kwargs`, with this checkout's `serving_model.py` ("new") and with the one
    at `--reference-rev` ("reference", an older wrapper);
  * the deployables exactly as the chain builds them now (export.convert_and_check):
    `deployable=torchscript` ("chain_torchscript": channels_last, frozen) and
    `deployable=int8` ("int8": FX static int8, calibrated on the sample's training images);
  * a plain `mlflow.pytorch.save_model(net)` with MLflow's defaults ("plain_pytorch");
  * "no_model": a pyfunc with the deployable's signature that answers zeros without a model:
    the floor `mlflow models serve` itself puts under batch-1 latency and cold start.
Each round measures, one after the other on this machine:
  * in-process images/s of the deployable's archive (`torch.jit.load`, fresh per batch size,
    20 warm-up calls, then `--seconds` of calls), batch 64 and batch 1;
  * each server: cold start (process start to the first 200 on /ping), batch-1 latency over
    `--latency-requests` sequential requests, batch-64 images/s for `--seconds`; one client with
    keep-alive. Servers: `mlflow models serve` on reference / new / plain, and lightcycle's
    `serve` (steps/serve.py) on new, with torch's default threads and with
    LIGHTCYCLE_TORCH_THREADS=1. The new servers are measured with both request forms:
    JSON numbers `{"inputs": [...]}` and `{"inputs": {"pixels_uint8_b64": ...}}`.
Prints JSON (and writes bench/results/served.json).
"""

from __future__ import annotations

import base64
import json
import os
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

from bench.common import (ROOT, VENV_BIN, child_env, file_at, free_port, images_per_second,
                          sqlite_store,
                          markdown_table, rounds_parser, save, trained_cnn)
from bench.common import stop_process as stop
from lightcycle.lifecycle import export, model_io
from lightcycle.model import data

warnings.simplefilter("ignore")
GOALS = {"served_vs_in_process_batch64": 0.6, "served_vs_plain_pytorch_batch64": 3.0,
         "batch1_p50_ms": 3.0, "batch1_p99_ms": 8.0, "serve_cold_start_s": 3.0}


def images(n: int) -> np.ndarray:
    pixels = data.load_split(data.default_data_dir(), "test").images
    return np.concatenate([pixels] * (n // len(pixels) + 1))[:n]


def json_body(n: int) -> bytes:  # as serving.formats and the README: float JSON, (N, 1, 28, 28)
    return json.dumps({"inputs": images(n)[:, None].astype(np.float32).tolist()}).encode()


def b64_body(n: int) -> bytes:
    encoded = base64.b64encode(images(n).astype(np.uint8).tobytes()).decode()
    return json.dumps({"inputs": {"pixels_uint8_b64": encoded}}).encode()


def in_process(archive: str, batch: int, seconds: float) -> float:
    module = torch.jit.load(archive, map_location="cpu").eval()
    return images_per_second(module, torch.from_numpy(images(batch)[:, None].astype(np.float32)),
                             seconds)


def start(cmd: list[str], port: int, env: dict) -> tuple[subprocess.Popen, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited with {proc.returncode}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return proc, time.perf_counter() - t0
        except requests.RequestException:
            pass
        time.sleep(0.02)


def models_serve(port: int, model_dir: str, *options: str) -> list[str]:
    """`mlflow models serve` on `model_dir`, in this environment, on 127.0.0.1:`port`."""
    return [os.path.join(VENV_BIN, "mlflow"), "models", "serve", "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(port), *options, "-m", model_dir]


def chain_deployable(net, method: str, tmp: str, name: str) -> tuple[str, str, str]:
    """`net` converted as the chain converts it (export.convert_and_check) and saved as the
    chain's pyfunc, under `tmp`: (archive, model dir, the conversion's stage and parity)."""
    import mlflow.pyfunc

    conversion = export.convert_and_check(net, method, data.default_data_dir())
    archive = os.path.join(tmp, f"{name}.pt")
    export.save_archive(conversion.module, archive)
    model_dir = os.path.join(tmp, name)
    mlflow.pyfunc.save_model(model_dir, **export.deployable_model_kwargs(archive, "torchscript"))
    return archive, model_dir, f"{conversion.stage}, {conversion.parity.describe()}"


def with_wrapper_at(rev: str, archive: str, tmp: str, name: str,
                    path: str = "src/lightcycle/serving/serving_model.py") -> str:
    """`archive` saved as the chain's pyfunc with the wrapper (`path`) as it was at `rev`, under
    `tmp`: before and after a change to the wrapper, in one run. Returns the model dir."""
    import mlflow.pyfunc

    code = os.path.join(tmp, f"{name}_serving_model.py")
    Path(code).write_text(file_at(rev, path))
    model_dir = os.path.join(tmp, name)
    mlflow.pyfunc.save_model(model_dir, **{**export.deployable_model_kwargs(archive, "torchscript"),
                                           "python_model": code})
    return model_dir


def measure(url: str, one: bytes, many: bytes, requests_n: int, seconds: float) -> dict:
    headers = {"Content-Type": "application/json"}
    with requests.Session() as session:
        def post(body):
            response = session.post(url, data=body, headers=headers, timeout=60)
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
        for _ in range(20):
            post(one)
        for _ in range(5):
            post(many)
        latencies = []
        for _ in range(requests_n):
            t = time.perf_counter()
            post(one)
            latencies.append((time.perf_counter() - t) * 1000)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            post(many)
            n += 1
        batch64 = n * 64 / (time.perf_counter() - t0)
    latencies.sort()
    return {"batch1_p50_ms": latencies[len(latencies) // 2],
            "batch1_p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "batch64_images_per_s": batch64}


def save_models(tmp: str, net, reference_rev: str) -> dict[str, str]:
    import mlflow.pyfunc
    import mlflow.pytorch

    archive = os.path.join(tmp, "model.pt")
    export.save_archive(torch.jit.freeze(torch.jit.script(net)), archive)
    dirs = {"archive": archive}
    kwargs = export.deployable_model_kwargs(archive, "torchscript")
    dirs["new"] = os.path.join(tmp, "new")
    mlflow.pyfunc.save_model(dirs["new"], **kwargs)
    dirs["reference"] = with_wrapper_at(reference_rev, archive, tmp, "reference",
                                        "src/lightcycle/serving_model.py")
    # The chain's own conversions (export.publish without the run and registry).
    for name, method in (("chain_torchscript", "script"), ("int8", "quantize")):
        dirs[f"{name}_archive"], dirs[name], dirs[f"{name}_stage"] = chain_deployable(
            net, method, tmp, name)
    # No model at all: the deployable's signature and wrapper contract, answered with zeros.
    # Its batch-1 latency and cold start are what `mlflow models serve` costs before any model.
    class NoModel(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return np.zeros((len(model_input), 10), dtype=np.float32)

    dirs["no_model"] = os.path.join(tmp, "no_model")
    mlflow.pyfunc.save_model(dirs["no_model"], python_model=NoModel(),
                             signature=kwargs["signature"], input_example=kwargs["input_example"],
                             pip_requirements=[f"mlflow=={mlflow.__version__}"])
    dirs["plain_pytorch"] = os.path.join(tmp, "plain_pytorch")
    # MLflow's defaults (pt2 serialization, tensor signature from the example); explicit
    # requirements only to skip 10 s of inference at save time (no effect on serving).
    mlflow.pytorch.save_model(net, dirs["plain_pytorch"], input_example=model_io.input_example(),
                              pip_requirements=model_io.torch_requirements())
    return dirs


def median_of(rows: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in rows), 3 if k.endswith("_s") else 2)
            for k in rows[0]}


def main() -> None:
    parser = rounds_parser(__doc__, rounds=3, seconds=4.0)
    parser.add_argument("--latency-requests", type=int, default=300)
    parser.add_argument("--reference-rev", default="1879355")
    parser.add_argument("--eager-uri", default="", help="a trained eager model to use")
    parser.add_argument("--train-epochs", type=int, default=3,
                        help="without --eager-uri: train a cnn this long (0: untrained)")
    args = parser.parse_args()

    if args.eager_uri:
        net = model_io.load_eager_net(args.eager_uri)
    else:
        net = trained_cnn(args.train_epochs)
    env = child_env()
    bodies = {"json": (json_body(1), json_body(64)), "b64": (b64_body(1), b64_body(64))}
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-served-") as tmp:
        dirs = save_models(tmp, net, args.reference_rev)
        env["MLFLOW_TRACKING_URI"] = sqlite_store(tmp)

        def servers(port):
            return {
                "reference": (models_serve(port, dirs["reference"]), ["json"]),
                "new": (models_serve(port, dirs["new"]), ["json", "b64"]),
                "new_lightcycle_serve": ([sys.executable, "steps/serve.py", "--model_uri",
                                          dirs["new"], "--port", str(port)], ["json", "b64"]),
                "new_lightcycle_serve_1_thread": (
                    [sys.executable, "steps/serve.py", "--model_uri", dirs["new"], "--port",
                     str(port)], ["json", "b64"]),
                "chain_torchscript": (models_serve(port, dirs["chain_torchscript"]),
                                      ["json", "b64"]),
                "int8": (models_serve(port, dirs["int8"]), ["json", "b64"]),
                "plain_pytorch": (models_serve(port, dirs["plain_pytorch"]), ["json"]),
                "no_model": (models_serve(port, dirs["no_model"]), ["json"]),
            }

        for r in range(args.rounds):
            for batch in (64, 1):
                for prefix, archive in (("", "archive"),
                                        ("chain_torchscript_", "chain_torchscript_archive"),
                                        ("int8_", "int8_archive")):
                    rows.setdefault(f"{prefix}in_process_batch{batch}", []).append(
                        {"images_per_s": in_process(dirs[archive], batch, args.seconds)})
            for name in servers(0):
                port = free_port()  # a fresh port: a server being stopped may still answer
                cmd, forms = servers(port)[name]
                threads = {"LIGHTCYCLE_TORCH_THREADS": "1"} if name.endswith("_1_thread") else {}
                proc, cold = start(cmd, port, {**env, **threads})
                try:
                    rows.setdefault(f"{name}_cold_start", []).append({"seconds_s": cold})
                    for form in forms:
                        one, many = bodies[form]
                        rows.setdefault(f"{name}_{form}", []).append(
                            measure(f"http://127.0.0.1:{port}/invocations", one, many,
                                    args.latency_requests, args.seconds))
                finally:
                    stop(proc)
            print(f"round {r + 1}/{args.rounds}:",
                  json.dumps({k: v[-1] for k, v in rows.items()}), file=sys.stderr, flush=True)

    figures = {k: median_of(v) for k, v in rows.items()}
    in_proc = figures["in_process_batch64"]["images_per_s"]
    plain = figures["plain_pytorch_json"]["batch64_images_per_s"]
    ratios = {}
    for key, row in figures.items():
        if "batch64_images_per_s" in row:
            ratios[f"{key}_vs_in_process_batch64"] = round(row["batch64_images_per_s"] / in_proc, 3)
            ratios[f"{key}_vs_plain_pytorch_batch64"] = round(row["batch64_images_per_s"] / plain, 2)
    for name in ("chain_torchscript", "int8"):
        own = figures[f"{name}_in_process_batch64"]["images_per_s"]
        for form in ("json", "b64"):
            served = figures[f"{name}_{form}"]["batch64_images_per_s"]
            ratios[f"{name}_{form}_vs_own_in_process_batch64"] = round(served / own, 3)
    save("served", {"rounds": args.rounds, "seconds": args.seconds,
                    "reference_rev": args.reference_rev,
                    "net": args.eager_uri or (f"cnn, {args.train_epochs} epochs of the plain loop"
                                              if args.train_epochs else "untrained cnn, seed 0"),
                    "conversions": {k: dirs[f"{k}_stage"] for k in ("chain_torchscript", "int8")},
                    "load_average_at_end": os.getloadavg(),
                    "medians": figures, "ratios": ratios, "goals": GOALS})


def table(figures: dict) -> str:
    medians, ratios = figures["medians"], figures["ratios"]
    rows = [[f"in process, the {prefix.rstrip('_') or 'frozen'} archive", "", "", "", "",
             medians[f"{prefix}in_process_batch64"]["images_per_s"], ""]
            for prefix in ("", "chain_torchscript_", "int8_")]
    for key, row in medians.items():
        server, _, form = key.rpartition("_")
        if form in ("json", "b64"):
            rows.append([server, form, medians[f"{server}_cold_start"]["seconds_s"],
                         row["batch1_p50_ms"], row["batch1_p99_ms"], row["batch64_images_per_s"],
                         ratios[f"{key}_vs_in_process_batch64"]])
    return markdown_table(["server", "request", "cold start (s)", "batch-1 p50 (ms)",
                           "batch-1 p99 (ms)", "batch-64 images/s", "vs in process (frozen)"],
                          rows)


if __name__ == "__main__":
    main()
