"""The deployable against MLflow's own serving floor: a no-op pyfunc, side by side.

    PATH=.venv/bin:$PATH python -m bench.serving.served_floor [--rounds 3]
        [--seconds 3] [--latency-requests 400] [--clients 32] [--train-epochs 3]

The no-op is a models-from-code pyfunc that answers zeros and has no signature: what
`mlflow models serve` costs before any model does anything. The deployables are the chain's
(`deployable=torchscript`, the default, and `deployable=int8`), converted as
bench.serving.served_ratio converts them (a `cnn` trained `--train-epochs` by the plain loop of
bench.common). Every server is `mlflow models serve --env-manager local` with the same
workers (`--workers`, default MLflow's 1) and the caller's environment (torch's default threads
unless OMP_NUM_THREADS says otherwise).

Each round starts every server afresh (the order reversed every other round) and then measures,
server after server for each figure in turn:
  * cold start: process start to the first 200 on /ping;
  * batch-1 latency: `--latency-requests` sequential `{"inputs": [...]}` JSON requests of one
    image over one keep-alive connection (http.client), p50 and p99;
  * base64 batch 64, one client, `--seconds` (deployables): images/s, divided by the same
    archive's in-process batch-64 images/s measured right before and after in this process;
  * `--clients` concurrent batch-1 JSON clients for `--seconds`: requests/s and errors.
Ratios are per round; their medians (and min-max over rounds) are reported against the goals
of the serving floor (GOALS below). Then, in this process, one batch-1 JSON request through MLflow's own
`scoring_server.invocations` (the function the server runs in its thread for every request) is
profiled for the no-op and the deployable: time per request by function, each marked as the
project's code or not, and the rest of a served request (uvicorn, Starlette, asyncio), which is
the same code for both servers; and the base64 batch-64 request the same way (deployables).
Last, the floors each goal sits on, measured in this run beside the figure they limit:
  * the net's batch-1 forward pass alone (the archive, `torch.jit.load`, one thread as the
    deployable runs small batches, inference mode, median of `--profile-requests` calls),
    against the time the batch-1 goal allows on top of the no-op's p50 (15% of it) and the CPU
    the 32-client goal allows on top of the no-op's CPU per request (1/0.9 - 1 of it);
  * importing torch in a fresh process that has imported MLflow's scoring server (median of
    3, alternating with the scoring server alone), against the 15% of the no-op's cold start
    the cold-start goal allows.
Writes bench/results/served_floor.json.
"""

from __future__ import annotations

import cProfile
import http.client
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import mlflow.pyfunc

from bench.common import (child_env, free_port, markdown_table, rounds_parser, save, sqlite_store,
                          trained_cnn)
from bench.common import stop_process as stop
from bench.serving.served import (b64_body, chain_deployable, images, in_process, json_body,
                                  models_serve, with_wrapper_at)
from bench.serving.served import start as start_server
from bench.serving.served_ratio import served as served_images_per_s

warnings.simplefilter("ignore")
GOALS = {"batch1_p50_vs_noop": ("<=", 1.15), "cold_start_vs_noop": ("<=", 1.15),
         "served_b64_batch64_vs_in_process": (">=", 0.6),
         "concurrent_batch1_requests_vs_noop": (">=", 0.9)}
NOOP_CODE = '''
import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class NoOp(PythonModel):
    def predict(self, context, model_input, params=None):
        return np.zeros((len(model_input), 10), dtype=np.float32)


set_model(NoOp())
'''
DEPLOYABLES = (("torchscript", "script"), ("int8", "quantize"))
HEADERS = {"Content-Type": "application/json"}


def server_cpu_s(proc) -> float:
    """User + system CPU seconds of every process in the server's group (the `mlflow` CLI and
    uvicorn's processes): robust to the other jobs on the machine, where wall time is not."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == proc.pid:  # fields[2]: the process group
            total += int(fields[11]) + int(fields[12])
    return total / tick


def post(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    connection.request("POST", "/invocations", body, HEADERS)
    response = connection.getresponse()
    return response.status, response.read()


def latency_ms(port: int, body: bytes, n: int) -> tuple[float, float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for _ in range(20):
            post(connection, body)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            status, text = post(connection, body)
            times.append((time.perf_counter() - t) * 1000)
            if status != 200:
                raise RuntimeError(f"{status}: {text[:200]!r}")
    finally:
        connection.close()
    times.sort()
    return times[len(times) // 2], times[min(n - 1, int(n * 0.99))]


def concurrent(port: int, body: bytes, clients: int, seconds: float) -> tuple[float, int, int]:
    """`clients` threads, each a keep-alive connection posting `body` in a loop: (requests/s
    answered 200, errors: any other status or a failed connection, requests answered 200)."""
    counts, errors = [0] * clients, [0] * clients
    start = time.perf_counter() + 0.2  # every thread connected before the clock starts
    until = start + seconds

    def client(i: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            connection.connect()
            while time.perf_counter() < start:
                time.sleep(0.005)
            while time.perf_counter() < until:
                try:
                    status, _ = post(connection, body)
                except (OSError, http.client.HTTPException):
                    errors[i] += 1
                    connection.close()
                    continue
                if status == 200:
                    counts[i] += 1
                else:
                    errors[i] += 1
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - start), sum(errors), sum(counts)


def save_models(tmp: str, net, before_rev: str) -> dict[str, str]:
    dirs = {}
    noop_code = Path(tmp) / "noop_model.py"
    noop_code.write_text(NOOP_CODE)
    dirs["noop"] = os.path.join(tmp, "noop")
    mlflow.pyfunc.save_model(dirs["noop"], python_model=str(noop_code),
                             pip_requirements=[f"mlflow=={mlflow.__version__}"])
    for name, method in DEPLOYABLES:
        dirs[f"{name}_archive"], dirs[name], _ = chain_deployable(net, method, tmp, name)
    if before_rev:  # the default deployable with the wrapper as it was at `before_rev`
        dirs["torchscript_before"] = with_wrapper_at(before_rev, dirs["torchscript_archive"], tmp,
                                                     "torchscript_before")
        dirs["torchscript_before_archive"] = dirs["torchscript_archive"]
    return dirs


def profile_invocations(dirs: dict[str, str], body: bytes, n: int,
                        names: list[str] | None = None) -> dict:
    """One batch-1 JSON request through MLflow's `invocations`, in this process, per model:
    median microseconds per request (and with MLflow's own response writer put back, requests
    alternating), and cProfile's own time per function (microseconds per request; `project`:
    the function is in the deployable's serving_model.py)."""
    import torch
    from mlflow.pyfunc import scoring_server

    # The deployable runs a small batch on one thread and sets that process-wide; each model
    # loads, as in its own server, with torch's default count.
    threads = torch.get_num_threads()
    out = {}
    for name in names or ["noop"] + [n for n, _ in DEPLOYABLES]:
        torch.set_num_threads(threads)
        t = time.perf_counter()
        model = scoring_server.load_model_with_mlflow_config(dirs[name])
        load_s = time.perf_counter() - t
        scoring_server.init(model)
        schema = model.metadata.get_input_schema()

        def once():
            result = scoring_server.invocations(body, "application/json", model, schema)
            assert result.status == 200, result.response[:300]

        for _ in range(50):
            once()
        # The deployable has the server write its answer with the C JSON encoder; MLflow's own
        # writer (pure Python) is timed beside it, request by request, as the reference.
        writers = {"own": scoring_server.predictions_to_json}
        writers["mlflow"] = getattr(writers["own"], "__wrapped__", writers["own"])
        times: dict[str, list[float]] = {"own": [], "mlflow": []}
        for i in range(2 * n):
            writer = "own" if i % 2 == 0 else "mlflow"
            scoring_server.predictions_to_json = writers[writer]
            t = time.perf_counter()
            once()
            times[writer].append(time.perf_counter() - t)
        scoring_server.predictions_to_json = writers["own"]
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(n):
            once()
        profile.disable()
        stats = pstats.Stats(profile).stats
        rows = []
        for (file, line, function), (_, calls, own, _cumulative, _) in stats.items():
            where = ("project" if file.endswith("serving_model.py")
                     else "torch" if "/torch/" in file or function.startswith("<built-in method torch")
                     else "mlflow" if "/mlflow/" in file else "python/numpy/other")
            rows.append({"function": f"{Path(file).name}:{line}({function})", "where": where,
                         "us_per_request": round(own / n * 1e6, 1)})
        rows.sort(key=lambda r: -r["us_per_request"])
        by_where: dict[str, float] = {}
        for row in rows:
            by_where[row["where"]] = round(by_where.get(row["where"], 0) + row["us_per_request"], 1)
        out[name] = {"median_us": round(statistics.median(times["own"]) * 1e6),
                     "median_us_with_mlflows_writer": round(statistics.median(times["mlflow"]) * 1e6),
                     "load_s": round(load_s, 3),
                     "profiled_us_by_where": by_where,
                     "top_functions": [r for r in rows if r["us_per_request"] >= 5][:25]}
    torch.set_num_threads(threads)
    return out


def forward_alone_us(archive: str, n: int) -> float:
    """Median microseconds of the archive's batch-1 forward pass, as the deployable runs it."""
    import torch

    module = torch.jit.load(archive, map_location="cpu").eval()
    x = torch.from_numpy(images(1)[:, None].astype("float32"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(50):
                module(x)
            times = []
            for _ in range(n):
                t = time.perf_counter()
                module(x)
                times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times) * 1e6


def torch_import_s(env: dict, rounds: int = 3) -> dict:
    """Seconds to import MLflow's scoring server in a fresh process, and it plus torch: the
    difference is what a torch model's server imports beyond a no-op's."""
    base = "import mlflow.pyfunc.scoring_server"
    times: dict[str, list[float]] = {"scoring_server": [], "scoring_server_and_torch": []}
    for _ in range(rounds):
        for key, code in (("scoring_server", base), ("scoring_server_and_torch", base + ", torch")):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], env=env, check=True)
            times[key].append(time.perf_counter() - t)
    medians = {k: round(statistics.median(v), 3) for k, v in times.items()}
    medians["torch_beyond_scoring_server"] = round(
        medians["scoring_server_and_torch"] - medians["scoring_server"], 3)
    return medians


def without_project_code(figures: dict, profile: dict, profile_b64: dict, name: str) -> dict:
    """Each goal's ratio as if the project's own code (serving_model.py: its time under cProfile,
    which overstates it, and its model load beyond the no-op's) took no time at all: a goal
    missed here is missed whatever the wrapper does."""
    noop, served = figures["noop"], figures[name]
    own_us = profile[name]["profiled_us_by_where"].get("project", 0)
    own_b64_us = profile_b64[name]["profiled_us_by_where"].get("project", 0)
    own_load_s = max(profile[name]["load_s"] - profile["noop"]["load_s"], 0)
    b64_request_us = 64 / served["served_b64_batch64"]["median"] * 1e6
    return {
        "project_us_per_batch1_request": own_us,
        "project_us_per_b64_batch64_request": own_b64_us,
        "project_load_s": round(own_load_s, 3),
        "batch1_p50_vs_noop": round(
            (served["batch1_p50_ms"]["median"] - own_us / 1000) / noop["batch1_p50_ms"]["median"], 3),
        "cold_start_vs_noop": round(
            (served["cold_start_s"]["median"] - own_load_s) / noop["cold_start_s"]["median"], 3),
        "served_b64_batch64_vs_in_process": round(
            64 / (b64_request_us - own_b64_us) * 1e6 / served["in_process_batch64"]["median"], 3),
        # the 32 clients keep the one worker busy: requests/s goes as 1 / CPU per request
        "concurrent_batch1_requests_vs_noop": round(
            noop["concurrent_server_cpu_ms"]["median"]
            / (served["concurrent_server_cpu_ms"]["median"] - own_us / 1000), 3),
    }


def floors(figures: dict, dirs: dict[str, str], env: dict, n: int, profile: dict,
           profile_b64: dict) -> dict:
    """Each goal's allowance beside the part of it no wrapper code can remove."""
    noop = figures["noop"]
    p50_us = noop["batch1_p50_ms"]["median"] * 1000
    cpu_us = noop["concurrent_server_cpu_ms"]["median"] * 1000
    imports = torch_import_s(env)
    out = {"torch_import_s": imports,
           "cold_start_allowance_s": round(0.15 * noop["cold_start_s"]["median"], 3)}
    for name, _ in DEPLOYABLES:
        forward = forward_alone_us(dirs[f"{name}_archive"], n)
        out[name] = {"batch1_forward_alone_us": round(forward),
                     "batch1_p50_allowance_us": round(0.15 * p50_us),
                     "concurrent_cpu_allowance_us": round((1 / 0.9 - 1) * cpu_us),
                     "served_extra_p50_us": round(
                         (figures[name]["batch1_p50_ms"]["median"] - noop["batch1_p50_ms"]["median"])
                         * 1000),
                     "served_extra_cpu_per_request_us": round(
                         (figures[name]["concurrent_server_cpu_ms"]["median"]
                          - noop["concurrent_server_cpu_ms"]["median"]) * 1000),
                     "without_project_code": without_project_code(figures, profile, profile_b64,
                                                                  name)}
    return out


def summarize(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def main() -> None:
    parser = rounds_parser(__doc__, rounds=3, seconds=3.0)
    parser.add_argument("--latency-requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--train-epochs", type=int, default=3,
                        help="train the cnn this long by the plain loop (0: untrained)")
    parser.add_argument("--profile-requests", type=int, default=2000)
    parser.add_argument("--before-rev", default="c33ec22",
                        help="also serve the default deployable with the wrapper at this "
                             "revision ('' to skip): before and after in the same run")
    args = parser.parse_args()

    net = trained_cnn(args.train_epochs)
    env = child_env()
    one_json, many_b64 = json_body(1), b64_body(64)
    names = ["noop"] + [name for name, _ in DEPLOYABLES] + (
        ["torchscript_before"] if args.before_rev else [])
    rows: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench-served-floor-") as tmp:
        dirs = save_models(tmp, net, args.before_rev)
        env["MLFLOW_TRACKING_URI"] = sqlite_store(tmp)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            servers = {}
            try:
                for name in order:
                    port = free_port()
                    proc, cold = start_server(
                        models_serve(port, dirs[name], "-w", str(args.workers)), port, env)
                    servers[name] = (proc, port)
                    rows[name].append({"cold_start_s": round(cold, 3)})
                for name in order:
                    proc, port = servers[name]
                    cpu = server_cpu_s(proc)
                    p50, p99 = latency_ms(port, one_json, args.latency_requests)
                    cpu = (server_cpu_s(proc) - cpu) / (args.latency_requests + 20) * 1000
                    rows[name][-1].update(batch1_p50_ms=round(p50, 3), batch1_p99_ms=round(p99, 3),
                                          batch1_server_cpu_ms=round(cpu, 3))
                for name in order:
                    if name == "noop":
                        continue
                    archive = dirs[f"{name}_archive"]
                    before = in_process(archive, 64, args.seconds)
                    got = served_images_per_s(servers[name][1], many_b64, 1, args.seconds)
                    after = in_process(archive, 64, args.seconds)
                    rows[name][-1].update(in_process_batch64=round((before + after) / 2),
                                          served_b64_batch64=round(got))
                for name in order:
                    proc, port = servers[name]
                    cpu = server_cpu_s(proc)
                    rate, errors, answered = concurrent(port, one_json, args.clients, args.seconds)
                    cpu = (server_cpu_s(proc) - cpu) / max(answered, 1) * 1000
                    rows[name][-1].update(concurrent_requests_per_s=round(rate, 1),
                                          concurrent_errors=errors,
                                          concurrent_server_cpu_ms=round(cpu, 3))
            finally:
                for proc, _ in servers.values():
                    stop(proc)
            noop = rows["noop"][-1]
            for name in names[1:]:
                row = rows[name][-1]
                row["ratios"] = {
                    "batch1_p50_vs_noop": round(row["batch1_p50_ms"] / noop["batch1_p50_ms"], 3),
                    "cold_start_vs_noop": round(row["cold_start_s"] / noop["cold_start_s"], 3),
                    "served_b64_batch64_vs_in_process":
                        round(row["served_b64_batch64"] / row["in_process_batch64"], 3),
                    "concurrent_batch1_requests_vs_noop":
                        round(row["concurrent_requests_per_s"] / noop["concurrent_requests_per_s"], 3),
                }
            print(f"round {r + 1}/{args.rounds}:", json.dumps({k: v[-1] for k, v in rows.items()}),
                  file=sys.stderr, flush=True)
        profile = profile_invocations(dirs, one_json, args.profile_requests)
        profile_b64 = profile_invocations(dirs, many_b64, max(args.profile_requests // 20, 20),
                                          [name for name, _ in DEPLOYABLES])
        figures = {name: {k: summarize([row[k] for row in got])
                          for k in got[0] if k != "ratios"} for name, got in rows.items()}
        floor = floors(figures, dirs, env, args.profile_requests, profile, profile_b64)

    verdicts = {}
    for name in names[1:]:
        figures[name]["ratios"] = {}
        for goal, (sense, bound) in GOALS.items():
            got = summarize([row["ratios"][goal] for row in rows[name]])
            figures[name]["ratios"][goal] = got
            met = got["median"] <= bound if sense == "<=" else got["median"] >= bound
            if goal == "concurrent_batch1_requests_vs_noop":
                met = met and figures[name]["concurrent_errors"]["max"] == 0
            verdicts[f"{name}: {goal} {sense} {bound}"] = "met" if met else "missed"
    save("served_floor", {"rounds": args.rounds, "seconds": args.seconds,
                          "latency_requests": args.latency_requests, "clients": args.clients,
                          "workers": args.workers,
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
                          "load_average_at_end": os.getloadavg(), "goals": verdicts,
                          "figures": figures, "floors": floor, "in_process_invocations_profile": profile,
                          "in_process_b64_batch64_profile": profile_b64,
                          "rounds_detail": rows})


def table(figures: dict) -> str:
    """Medians over the rounds; each ratio beside its verdict against the goal."""
    servers = figures["figures"]

    def medians(key: str) -> list:
        return [row[key]["median"] for row in servers.values()]

    rows = [["cold start (s)", *medians("cold_start_s")],
            ["batch-1 p50 (ms)", *medians("batch1_p50_ms")],
            ["server CPU per batch-1 request (ms)", *medians("batch1_server_cpu_ms")],
            [f"{figures['clients']} clients, requests/s", *medians("concurrent_requests_per_s")],
            [f"{figures['clients']} clients, errors (most in a round)",
             *[row["concurrent_errors"]["max"] for row in servers.values()]]]
    for goal, (sense, bound) in GOALS.items():
        rows.append([f"{goal.replace('_', ' ')} (goal {sense} {bound})"] + [
            f"{row['ratios'][goal]['median']} {figures['goals'][f'{name}: {goal} {sense} {bound}']}"
            if "ratios" in row else "" for name, row in servers.items()])
    floor = figures.get("floors")
    if floor:  # each goal's allowance beside what no wrapper code can remove, same run

        def per_deployable(label: str, value) -> list:
            return [label] + [value(floor[name]) if name in floor else "" for name in servers]

        torch_import = floor["torch_import_s"]["torch_beyond_scoring_server"]
        rows += [
            per_deployable("batch-1 p50 beyond the no-op's (us)",
                           lambda f: f["served_extra_p50_us"]),
            per_deployable("batch-1: the goal's allowance, 15% of the no-op's p50 (us)",
                           lambda f: f["batch1_p50_allowance_us"]),
            per_deployable("batch-1: the net's forward pass alone, in process (us)",
                           lambda f: f["batch1_forward_alone_us"]),
            per_deployable("32 clients: server CPU per request beyond the no-op's (us)",
                           lambda f: f["served_extra_cpu_per_request_us"]),
            per_deployable("32 clients: the goal's allowance (us)",
                           lambda f: f["concurrent_cpu_allowance_us"]),
            per_deployable("cold start: the goal's allowance, 15% of the no-op's (s)",
                           lambda f: floor["cold_start_allowance_s"]),
            per_deployable("cold start: importing torch after MLflow's scoring server (s)",
                           lambda f: torch_import),
        ]
        for goal, (sense, bound) in GOALS.items():
            rows.append(per_deployable(
                f"{goal.replace('_', ' ')} if the project's code took no time (goal {sense} {bound})",
                lambda f, goal=goal: f["without_project_code"][goal]))
    return markdown_table(["measure", *servers], rows)


if __name__ == "__main__":
    main()
