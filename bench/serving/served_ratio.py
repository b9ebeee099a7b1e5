"""Served / in-process batch-64 images/s of the chain's deployables, each round measured side by
side so that the machine's drift (2x over a day on this VM) cancels out.

    PATH=.venv/bin:$PATH python -m bench.serving.served_ratio [--rounds 5] [--seconds 3]

One `cnn` (trained `--train-epochs` by bench.common's plain loop) is converted exactly as the
chain does (export.convert_and_check: `deployable=torchscript` and `deployable=int8`) and saved
as the chain's pyfunc. Each deployable gets one `mlflow models serve` (1 worker, torch's default
threads). Each round, per deployable, one after the other:
  * in process: the archive (`torch.jit.load`), batch 64, `--seconds`;
  * served, 1 client: sequential base64 batch-64 requests on one keep-alive connection
    (http.client), `--seconds`: a request waits for the one before, so the server idles while
    the client builds, sends and reads (about 1 ms of client work per request);
  * served, 2 clients: two such connections at once, so the server always has a request:
    the server's own throughput;
  * in process again; the round's reference is the mean of the two in-process figures.
Each round also serves both deployables through lightcycle's `serve` with `--workers 2` (one
torch thread per worker), 1 and 2 clients; the float one also with the wrapper at `--before-rev`
(before TCP_NODELAY was restored in uvicorn's workers).
Ratios are per round; the medians over rounds are reported. Writes bench/results/served_ratio.json.
"""

from __future__ import annotations

import http.client
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings

import torch

from bench.common import (child_env, free_port, markdown_table, rounds_parser, save, sqlite_store,
                          trained_cnn)
from bench.common import stop_process as stop
from bench.serving.served import (b64_body, chain_deployable, in_process, models_serve,
                                  with_wrapper_at)
from bench.serving.served import start as start_server

warnings.simplefilter("ignore")
GOAL = 0.6


def served(port: int, body: bytes, clients: int, seconds: float) -> float:
    counts = [0] * clients
    errors: list[str] = []

    def client(i: int, until: float) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            while time.perf_counter() < until:
                connection.request("POST", "/invocations", body,
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
                text = response.read()
                if response.status != 200:
                    errors.append(f"{response.status}: {text[:200]!r}")
                    return
                counts[i] += 1
        finally:
            connection.close()

    for i in range(clients):  # warm-up, one connection at a time
        client(i, time.perf_counter() + 0.5)
    counts = [0] * clients
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i, start + seconds)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(errors[0])
    return sum(counts) * 64 / (time.perf_counter() - start)


def main() -> None:
    parser = rounds_parser(__doc__, rounds=5, seconds=3.0)
    parser.add_argument("--train-epochs", type=int, default=3)
    parser.add_argument("--before-rev", default="33aa55c",
                        help="the revision whose serving_model.py is the workers=2 'before'")
    args = parser.parse_args()

    net = trained_cnn(args.train_epochs)
    env = child_env()
    body = b64_body(64)
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-served-ratio-") as tmp:
        env["MLFLOW_TRACKING_URI"] = sqlite_store(tmp)
        archives, servers = {}, {}

        def serve(name: str, command_on) -> None:
            port = free_port()
            servers[name] = (start_server(command_on(port), port, env)[0], port)

        def serve_two_workers(name: str, model_dir: str) -> None:
            serve(name, lambda port: [sys.executable, "steps/serve.py", "--model_uri", model_dir,
                                      "--port", str(port), "--workers", "2"])

        try:
            for name, method in (("torchscript", "script"), ("int8", "quantize")):
                archives[name], model_dir, _ = chain_deployable(net, method, tmp, name)
                serve(name, lambda port: models_serve(port, model_dir))
                serve_two_workers(f"{name}_workers2", model_dir)
                if name == "torchscript":  # and with the wrapper from before the fix
                    serve_two_workers(f"{name}_workers2_before", with_wrapper_at(
                        args.before_rev, archives[name], tmp, "before"))
            for r in range(args.rounds):
                for name, (_, port) in servers.items():
                    if "workers2" in name:
                        row = {"served_1_client": round(served(port, body, 1, args.seconds)),
                               "served_2_clients": round(served(port, body, 2, args.seconds))}
                    else:
                        before = in_process(archives[name], 64, args.seconds)
                        one = served(port, body, 1, args.seconds)
                        two = served(port, body, 2, args.seconds)
                        after = in_process(archives[name], 64, args.seconds)
                        own = (before + after) / 2
                        row = {"in_process": round(own),
                               "in_process_spread": round(abs(before - after) / own, 3),
                               "served_1_client": round(one), "served_2_clients": round(two),
                               "ratio_1_client": round(one / own, 3),
                               "ratio_2_clients": round(two / own, 3)}
                    rows.setdefault(name, []).append(row)
                    print(f"round {r + 1}/{args.rounds} {name}: {row}", file=sys.stderr, flush=True)
        finally:
            for proc, _ in servers.values():
                stop(proc)
    medians = {name: {k: statistics.median(row[k] for row in got) for k in got[0]}
               for name, got in rows.items()}
    for name in ("torchscript_workers2", "torchscript_workers2_before", "int8_workers2"):
        own = medians[name.split("_")[0]]["in_process"]  # the deployable's median in process
        for clients in ("1_client", "2_clients"):
            medians[name][f"ratio_{clients}"] = round(medians[name][f"served_{clients}"] / own, 3)
    save("served_ratio", {"rounds": args.rounds, "seconds": args.seconds,
                          "torch_threads_in_process": torch.get_num_threads(),
                          "load_average_at_end": os.getloadavg(), "goal": GOAL,
                          "medians": medians, "rounds_detail": rows})


def table(figures: dict) -> str:
    rows = [[name, row.get("in_process"), row["served_1_client"], row["served_2_clients"],
             row["ratio_1_client"], row["ratio_2_clients"]]
            for name, row in figures["medians"].items()]
    return markdown_table(["server", "in process images/s", "served, 1 client",
                           "served, 2 clients", "served / in process, 1 client",
                           f"served / in process, 2 clients (goal >= {figures['goal']})"], rows)


if __name__ == "__main__":
    main()
