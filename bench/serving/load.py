"""Load on a running `serve`: N concurrent clients post a mix of good and bad requests.

    PATH=.venv/bin:$PATH python -m bench.serving.load --url http://127.0.0.1:5001 --clients 8 \
        --seconds 30 [--model_uri models:/lightcycle-fashion-scripted@champion] [--pid <pid>]

Good requests are batches of 1, 8 and 64 sample test images whose expected classes come from
the same model loaded in this process; bad requests break the input contract in different ways
and must get a 4xx. Prints JSON: throughput, latency percentiles, status counts, wrong answers
and (with --pid) the server's RSS after warm-up and at the end; writes
bench/results/load_serve.json. tests/test_faults.py runs the same `run_load` and asserts on its
counts, never on its timings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import requests

from bench.common import ROOT, markdown_table, save

SAMPLE_DIR = ROOT / "data" / "sample"


def _image(value: float) -> list:
    return [[[value] * 28 for _ in range(28)]]


# Each one breaks the contract differently; every one must be answered 4xx, never 5xx.
BAD_BODIES = [
    json.dumps({"inputs": [[0.0] * 784]}),                 # wrong rank
    json.dumps({"inputs": [_image(300.0)]}),               # pixel above 255
    json.dumps({"inputs": [[[["a"] * 28] * 28]]}),         # strings
    json.dumps({"inputs": []}),                            # empty batch
    json.dumps({"inputs": None}),                          # null
    json.dumps({"pixels": [_image(0.0)]}),                 # unknown key
    "this is {not json",                                   # not JSON
    '{"inputs": [[[' + ",".join(["[" + ",".join(["NaN"] * 28) + "]"] * 28) + "]]]}",
]


@dataclass
class Request:
    body: bytes
    expected: list[int] | None  # class ids for a good request; None for a bad one


def good_requests(images: np.ndarray, expected: np.ndarray, sizes=(1, 8, 64)) -> list[Request]:
    out = []
    for size in sizes:
        for start in range(0, len(images) - size + 1, max(size, 16)):
            batch = images[start:start + size]
            out.append(Request(json.dumps({"inputs": batch.tolist()}).encode(),
                               expected[start:start + size].tolist()))
    return out


def bad_requests() -> list[Request]:
    return [Request(body.encode(), None) for body in BAD_BODIES]


@dataclass
class LoadResult:
    clients: int
    seconds: float
    requests: int = 0
    good: int = 0
    bad: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    server_errors: int = 0
    wrong_answers: int = 0
    bad_not_4xx: int = 0
    transport_errors: int = 0
    throughput_rps: float = 0.0
    images_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    rss_after_warmup_kib: int | None = None
    rss_end_kib: int | None = None
    examples: list[str] = field(default_factory=list)


def _client(url: str, mix: list[Request], offset: int, stop: threading.Event, lock: threading.Lock,
            latencies: list[float], counts: Counter, result: LoadResult, images: Counter) -> None:
    i = offset
    with requests.Session() as session:
        while not stop.is_set():
            req = mix[i % len(mix)]
            i += 7  # co-prime with the mix length in practice: clients interleave good and bad
            start = time.perf_counter()
            try:
                response = session.post(url + "/invocations", data=req.body, timeout=60,
                                        headers={"Content-Type": "application/json"})
            except requests.RequestException as exc:
                with lock:
                    result.transport_errors += 1
                    result.examples.append(f"transport: {type(exc).__name__}")
                continue
            elapsed = time.perf_counter() - start
            status = response.status_code
            problem = None
            if status >= 500:
                problem = "server_errors"
            elif req.expected is not None:
                if status != 200 or [row["class_id"] for row in
                                     response.json()["predictions"]] != req.expected:
                    problem = "wrong_answers"
            elif status < 400:
                problem = "bad_not_4xx"
            with lock:
                latencies.append(elapsed)
                counts[str(status)] += 1
                if req.expected is not None:
                    result.good += 1
                    images["n"] += len(req.expected)
                else:
                    result.bad += 1
                if problem:
                    setattr(result, problem, getattr(result, problem) + 1)
                    if len(result.examples) < 10:
                        result.examples.append(f"{problem}: {status} {response.text[:200]}")


def _phase(url: str, mix: list[Request], clients: int, seconds: float):
    result = LoadResult(clients=clients, seconds=seconds)
    stop, lock = threading.Event(), threading.Lock()
    latencies: list[float] = []
    counts: Counter = Counter()
    images: Counter = Counter()
    threads = [threading.Thread(target=_client, args=(url, mix, k * 3, stop, lock, latencies,
                                                       counts, result, images), daemon=True)
               for k in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    # The phase is a fixed-length window of load by definition, not a wait for a condition.
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join(90)
    wall = time.perf_counter() - start
    result.statuses = dict(counts)
    result.requests = len(latencies)
    return result, latencies, images["n"], wall


def run_load(url: str, requests_mix: list[Request], clients: int = 8, seconds: float = 30,
             warmup_seconds: float = 5, rss=None) -> LoadResult:
    """Warm up, read RSS, run `clients` threads for `seconds`, read RSS again."""
    url = url.rstrip("/")
    _phase(url, requests_mix, clients, warmup_seconds)
    before = rss() if rss else None
    result, latencies, images, wall = _phase(url, requests_mix, clients, seconds)
    result.rss_after_warmup_kib = before
    result.rss_end_kib = rss() if rss else None
    if latencies:
        result.throughput_rps = round(result.requests / wall, 1)
        result.images_per_s = round(images / wall, 1)
        result.p50_ms = round(float(np.percentile(latencies, 50)) * 1000, 1)
        result.p99_ms = round(float(np.percentile(latencies, 99)) * 1000, 1)
    return result


def tree_rss_kib(pid: int) -> int:
    """RSS of a process and all its descendants (the scoring server runs under uvicorn)."""
    pids, frontier = [pid], [pid]
    while frontier:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(frontier.pop())],
                             capture_output=True, text=True)
        kids = [int(p) for p in out.stdout.split()]
        pids += kids
        frontier += kids
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        except (FileNotFoundError, StopIteration):
            pass
    return total


def standard_mix(model_uri: str) -> list[Request]:
    """Good requests (expected classes from the model itself) interleaved with bad ones."""
    import mlflow

    from lightcycle.model import data

    test = data.load_split(SAMPLE_DIR, "test")
    predicted = mlflow.pyfunc.load_model(model_uri).predict(test.images[:, None].astype(np.float32))
    good = good_requests(test.images, predicted["class_id"].to_numpy())
    bad = bad_requests()
    # About one bad request in four.
    mix = []
    for i, req in enumerate(good):
        mix.append(req)
        if i % 3 == 2:
            mix.append(bad[(i // 3) % len(bad)])
    return mix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model_uri", default="models:/lightcycle-fashion-scripted@champion")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--pid", type=int, default=None, help="server pid, for RSS")
    args = parser.parse_args(argv)
    result = run_load(args.url, standard_mix(args.model_uri), args.clients, args.seconds,
                      rss=(lambda: tree_rss_kib(args.pid)) if args.pid else None)
    save("load_serve", asdict(result))
    return 0


def table(figures: dict) -> str:
    return markdown_table(
        ["clients", "requests/s", "images/s", "p50 (ms)", "p99 (ms)", "5xx", "wrong answers",
         "bad requests not 4xx", "transport errors"],
        [[figures["clients"], figures["throughput_rps"], figures["images_per_s"],
          figures["p50_ms"], figures["p99_ms"], figures["server_errors"],
          figures["wrong_answers"], figures["bad_not_4xx"], figures["transport_errors"]]])


if __name__ == "__main__":
    sys.exit(main())
