"""What every benchmark shares: the result it saves and prints, the environment of the processes
it starts, a server's start-up (start, wait for its health URL, stop), clients that load a server,
timing summaries, and the plain training loop.

Each benchmark's `main(argv)` returns `report(...)`: its figures and its tables, which
bench/dashboard.py prints as they are. The process machinery is the tests' (tests/processes.py).
"""

import argparse
import contextlib
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
VENV_BIN = str(Path(sys.executable).parent)

sys.path.insert(0, str(ROOT / "tests"))
from processes import free_port, stop_process  # noqa: E402,F401
from synthetic import synthetic_data_dir  # noqa: E402,F401


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {time.strftime('%Y-%m-%d %H:%M')}"


def report(name: str, figures: dict, *tables: tuple[list[str], list[list]]) -> dict:
    """A benchmark's result: its `figures` and its `tables` ((header, rows) each), saved as
    bench/results/<name>.json and printed as markdown; the dashboard prints the same tables."""
    result = {"machine": machine(), **figures,
              "tables": [{"header": header, "rows": rows} for header, rows in tables]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    print(result["machine"], *(markdown_table(t["header"], t["rows"]) for t in result["tables"]),
          sep="\n\n", flush=True)
    return result


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, dict) and set(value) == {"median", "min", "max"}:
        return f"{cell(value['median'])} ({cell(value['min'])}-{cell(value['max'])})"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """One markdown table; numbers with thousands separators, at most 4 significant digits
    below 1,000; a summary() as its median with the range in brackets."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def summary(values: list[float]) -> dict:
    """The median of rounds with their range: one round alone on a drifting machine says little."""
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def command_line(doc: str, rounds: int | None = None,
                 seconds: float | None = None) -> argparse.ArgumentParser:
    """A benchmark's command line, whose --help prints `doc` as it is written; with `--rounds`
    and `--seconds` (per figure) where their defaults are given."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if rounds is not None:
        parser.add_argument("--rounds", type=int, default=rounds)
    if seconds is not None:
        parser.add_argument("--seconds", type=float, default=seconds)
    return parser


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a process a benchmark starts: `mlflow run` and `mlflow models serve`
    exec `python` and `uvicorn` by name, so the venv's bin/ leads PATH; src/ is importable
    even where the package is not installed."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"],
            "PYTHONPATH": pythonpath, **extra}


def sqlite_store(directory, name: str = "mlflow.db") -> str:
    """A fresh sqlite tracking store in `directory` whose artifacts stay there too: left to
    itself, MLflow puts a sqlite store's artifacts in ./mlruns of whoever opens it first (the
    benchmarks run from the checkout)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = f"sqlite:///{Path(directory) / name}"
    SqlAlchemyStore(uri, str(Path(directory) / f"{Path(name).stem}-artifacts"))
    return uri


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """(seconds, what it returned) of `fn(*args, **kwargs)`."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def timed_run(cmd: list[str], env: dict | None = None, **kwargs) -> tuple[float, str]:
    """Runs `cmd` from the checkout to its end: (seconds, its stdout and stderr); fails with
    the end of its output."""
    seconds, out = timed(subprocess.run, cmd, cwd=ROOT, env=env or child_env(),
                         capture_output=True, text=True, **kwargs)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd} exited with {out.returncode}:\n{(out.stdout + out.stderr)[-3000:]}")
    return seconds, out.stdout + out.stderr


def start_server(cmd: list[str], health_url: str, env: dict | None = None,
                 timeout: float = 300) -> tuple[subprocess.Popen, float]:
    """Starts a server in a session of its own and polls `health_url` every 20 ms (fine enough
    for a cold start of seconds): (the process, seconds from its start to the first 200)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env or child_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited with {proc.returncode} before {health_url} answered")
        with contextlib.suppress(requests.RequestException):
            if requests.get(health_url, timeout=2).status_code == 200:
                return proc, time.perf_counter() - start
        time.sleep(0.02)
    stop_process(proc)
    raise TimeoutError(f"{health_url} did not answer 200 within {timeout} s")


@contextlib.contextmanager
def serving(cmd: list[str], health_url: str, env: dict | None = None, timeout: float = 300):
    """start_server as a context: yields (process, cold start seconds); stops its group after."""
    proc, seconds = start_server(cmd, health_url, env, timeout)
    try:
        yield proc, seconds
    finally:
        stop_process(proc)


def server_usage(proc: subprocess.Popen) -> tuple[float, int]:
    """(user + system CPU seconds, RSS KiB) of every process in the server's group (a CLI, its
    workers): CPU is robust to the other jobs on the machine, where wall time is not."""
    tick, page_kib, cpu, rss = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE") // 1024, 0, 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == proc.pid:  # fields[2]: the process group
            cpu += int(fields[11]) + int(fields[12])
            rss += int(fields[21]) * page_kib
    return cpu / tick, rss


@dataclass(frozen=True)
class Request:
    body: bytes
    kind: str = "good"  # counted apart in the result, e.g. "good" and "bad"
    images: int = 1
    # the problem with an answer, or None; by default any status but 200
    check: Callable[[int, bytes], str | None] = lambda status, body: (
        None if status == 200 else f"status {status}")


def post(connection: http.client.HTTPConnection, path: str, body: bytes) -> tuple[int, bytes]:
    connection.request("POST", path, body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, response.read()


def clients_load(url: str, mix: list[Request], clients: int = 1, seconds: float = 0,
                 count: int = 0, warmup: int = 20) -> dict:
    """`clients` threads, each on one keep-alive connection, posting `mix` in turn (from
    different offsets) for `seconds`, or `count` requests each, after `warmup` untimed ones;
    a failed connection is counted and opened again. Returns requests/s, images/s, latency
    p50/p99 (ms), answers by status, the requests of each kind, problems and a few examples."""
    parts = urlsplit(url)
    lock, latencies = threading.Lock(), []
    result = {"statuses": Counter(), "kinds": Counter(), "problems": Counter(), "examples": [],
              "images": 0}
    clock: dict[str, float] = {}
    # The clock starts once every client has warmed up; the barrier's action runs before any
    # client is released, so all of them see it.
    ready = threading.Barrier(clients + 1, action=lambda: clock.update(
        start=time.perf_counter(), until=time.perf_counter() + seconds))

    def client(offset: int) -> None:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        for i in range(warmup):
            with contextlib.suppress(OSError, http.client.HTTPException):
                post(connection, parts.path, mix[(offset + i) % len(mix)].body)
        ready.wait()
        sent = 0
        while (time.perf_counter() < clock["until"]) if seconds else (sent < count):
            # a stride of 7, co-prime with most mixes' lengths: the clients interleave the kinds
            request = mix[(offset + 7 * sent) % len(mix)]
            sent += 1
            t = time.perf_counter()
            try:
                status, body = post(connection, parts.path, request.body)
                problem = request.check(status, body)
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                status, body, problem = "transport", b"", f"transport: {type(exc).__name__}"
            with lock:
                latencies.append(time.perf_counter() - t)
                result["statuses"][str(status)] += 1
                result["kinds"][request.kind] += 1
                result["images"] += request.images if problem is None else 0
                if problem:
                    result["problems"][problem.split(":")[0]] += 1
                    if len(result["examples"]) < 10:
                        result["examples"].append(f"{problem}: {body[:200]!r}")
        connection.close()

    threads = [threading.Thread(target=client, args=(3 * k,), daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - clock["start"]
    n = len(latencies)
    return {**result, "clients": clients, "requests": n, "seconds": round(wall, 2),
            "errors": sum(result["problems"].values()),
            "requests_per_s": round(n / wall, 1), "images_per_s": round(result["images"] / wall, 1),
            "p50_ms": round(percentile(latencies, 0.5) * 1000, 3) if n else None,
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 3) if n else None}


def images_per_second(fn, x, seconds: float, warmup: int = 20) -> float:
    """`fn(x)` called for `seconds` after `warmup` calls, in inference mode: images per second."""
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn(x)
            n += 1
    return n * len(x) / (time.perf_counter() - start)


def plain_cnn_epochs(epochs: int, seed: int = 0, net=None):
    """The project's training recipe as a plain PyTorch loop (same net, data, augmentation,
    AdamW + OneCycle, label smoothing). Yields once per epoch, after its training pass:
    (net, validation loader). `net`: another untrained net to train the same way."""
    import torch
    import torch.nn.functional as F

    from lightcycle.model import data
    from lightcycle.model.datamodule import FashionMNISTDataModule, augment
    from lightcycle.model.nets import build_net

    torch.manual_seed(seed)
    dm = FashionMNISTDataModule(str(data.default_data_dir()), batch_size=32, seed=seed)
    dm.setup()
    train = dm.train_dataloader()
    net = build_net("cnn") if net is None else net
    opt = torch.optim.AdamW(net.parameters(), lr=0.005, weight_decay=0.0001)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.005, total_steps=epochs * len(train))
    for _ in range(epochs):
        net.train()
        for images, labels in train:
            loss = F.cross_entropy(net(augment(images)), labels, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        yield net, dm.val_dataloader()


def trained_cnn(epochs: int, seed: int = 0, make=None):
    """The net `make()` builds (the `cnn` by default) right after torch is seeded with `seed`,
    after `epochs` of the plain loop, in eval mode; 0 epochs: the untrained net, which costs the
    same to run."""
    import torch

    from lightcycle.model.nets import build_net

    torch.manual_seed(seed)
    net = make() if make else build_net("cnn")
    for net, _ in plain_cnn_epochs(epochs, seed, net=net) if epochs else ():
        pass
    return net.eval()
