"""Serving: the deployables in process and behind a server, one variant a measure.

    PATH=.venv/bin:$PATH python -m bench.serving.served --variant floor [--rounds 3] [--seconds 3]
        [--latency-requests 400] [--clients 32] [--train-epochs 0]
    PATH=.venv/bin:$PATH python -m bench.serving.served --variant batch64 [--rounds 3] [--seconds 3]
    PATH=.venv/bin:$PATH python -m bench.serving.served --variant deployables [--epochs 8]
        [--rounds 3] [--seconds 3]
    PATH=.venv/bin:$PATH python -m bench.serving.served --variant load --url http://127.0.0.1:5001
        [--clients 8] [--seconds 30] [--model-uri models:/lightcycle-fashion-scripted@champion]
        [--pid <server pid>]

One `cnn` (trained `--train-epochs` by bench.common's plain loop; 0: untrained, same shapes and
cost) is converted as the chain converts it (export.convert_and_check) into the deployables
torchscript (the default), int8 and onnx, each saved as the chain's pyfunc.

floor: side by side in each round, every server started afresh (the order reversed every other
round): MLflow's floor (a no-op pyfunc answering zeros, no signature), the torchscript and onnx
deployables under `mlflow models serve` (1 worker), and the torchscript archive under LitServe
(bench/requirements.txt) as the peer. Per server: cold start (process start to the first 200 on
/ping, LitServe's /health); then, all servers up, batch-1 JSON p50 over `--latency-requests`
sequential requests each, the servers taking turns request by request (one keep-alive connection
a server), so that every p50 comes from the same stretch of time, and each server's CPU over that
stretch per request; then one server after the other, `--clients` concurrent batch-1 clients
(requests/s, errors, CPU per request) and base64 batch-64 images/s from one client. Ratios are
per round; medians with their ranges against GOALS. Where the time goes, in the same run: the
`mlflow` CLI's own start, importing onnxruntime or torch after MLflow's scoring server, each
graph's batch-1 run alone in process (one thread, as the deployables run small batches).
batch64: batch-64 images/s by deployable, request form (JSON numbers or base64 uint8) and
workers, with 1 and 2 clients, against MLflow's plain `mlflow.pytorch` model and against the
same archive in process right before and after.
deployables: every variant of the net in process (batch 1 and 64, interleaved rounds), its
accuracy on the 180 held-out images and its argmax agreement with eager on shifted copies.
load: a running server under concurrent clients posting good requests (answers checked against
the model in this process) and bad ones (each must get a 4xx); tests/test_faults.py runs it.
"""

import base64
import copy
import http.client
import io
import json
import operator
import os
import statistics
import sys
import tempfile
import warnings
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import numpy as np

from bench.common import (VENV_BIN, Request, child_env, clients_load, command_line, free_port,
                          images_per_second, percentile, post, report, server_usage, serving,
                          sqlite_store, summary, timed, timed_run, trained_cnn)

warnings.simplefilter("ignore")
P50, B64 = "batch-1 p50 (ms)", "base64 batch 64, images/s"  # the floor's figures, by label
DEPLOYABLES = {"torchscript": "script", "int8": "quantize", "onnx": "onnx"}
# (ratio, sense, bound): the onnx deployable against MLflow's floor and its peers.
GOALS = {"onnx batch-1 p50 / no-op": ("<=", 1.10), "onnx cold start / no-op": ("<=", 1.10),
         "onnx 32 clients requests/s / no-op, no errors": (">=", 0.9),
         "onnx base64 batch-64 images/s / torchscript": (">=", 1.0),
         "onnx cold start / LitServe": ("<", 1.0), "onnx batch-1 p50 / LitServe": ("<", 1.0),
         "onnx 32 clients requests/s / LitServe": (">", 1.0)}
NOOP_CODE = '''
import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class NoOp(PythonModel):
    def predict(self, context, model_input, params=None):
        return np.zeros((len(model_input), 10), dtype=np.float32)


set_model(NoOp())
'''
# LitServe serving the TorchScript archive with the deployable's input forms and answers: JSON
# numbers or base64 uint8 in, class ids and probabilities out, one thread for small batches.
# Its HTTP process runs beside its inference worker, so a large batch leaves it one core.
LITSERVE_APP = '''
import base64, os, sys
import numpy as np, torch, litserve as ls


class Archive(ls.LitAPI):
    def setup(self, device):
        self.module = torch.jit.load(sys.argv[1], map_location="cpu").eval()
        self.threads = max(1, (os.cpu_count() or 2) - 1)

    def decode_request(self, request):
        inputs = request["inputs"]
        if isinstance(inputs, dict):
            pixels = np.frombuffer(base64.b64decode(inputs["pixels_uint8_b64"]), np.uint8)
            return torch.from_numpy(pixels.reshape(-1, 1, 28, 28).astype(np.float32))
        return torch.tensor(inputs, dtype=torch.float32).reshape(-1, 1, 28, 28)

    def predict(self, x):
        torch.set_num_threads(1 if len(x) <= 8 else self.threads)
        with torch.inference_mode(), torch.jit.optimized_execution(False):  # as the deployable
            return torch.softmax(self.module(x), 1)

    def encode_response(self, probabilities):
        return {"predictions": [{"class_id": int(p.argmax()), "probabilities": p.tolist()}
                                for p in probabilities]}


if __name__ == "__main__":  # LitServe's worker processes import this file again
    ls.LitServer(Archive(), accelerator="cpu", workers_per_device=1, timeout=60).run(
        port=int(sys.argv[2]), generate_client_file=False)
'''


def images(n: int) -> np.ndarray:
    from lightcycle.model import data

    pixels = data.load_split(data.default_data_dir(), "test").images
    return np.concatenate([pixels] * (n // len(pixels) + 1))[:n]


def json_body(n: int) -> bytes:  # as the README's client sends: float JSON, (N, 1, 28, 28)
    return json.dumps({"inputs": images(n)[:, None].astype(np.float32).tolist()}).encode()


def b64_body(n: int) -> bytes:
    encoded = base64.b64encode(images(n).astype(np.uint8).tobytes()).decode()
    return json.dumps({"inputs": {"pixels_uint8_b64": encoded}}).encode()


def in_process(archive: str, batch: int, seconds: float) -> float:
    import torch

    module = torch.jit.load(archive, map_location="cpu").eval()
    return images_per_second(module, torch.from_numpy(images(batch)[:, None].astype(np.float32)),
                             seconds)


def save_models(tmp: str, net, names) -> dict[str, str]:
    """The named models under `tmp`: the no-op, MLflow's plain `mlflow.pytorch` model, and the
    deployables as the chain converts and saves them (`<name>_archive` beside each)."""
    import mlflow.pyfunc
    import mlflow.pytorch

    from lightcycle.lifecycle import export, model_io
    from lightcycle.model import data

    dirs = {name: os.path.join(tmp, name) for name in names}
    for name in names:
        if name == "noop":
            Path(tmp, "noop.py").write_text(NOOP_CODE)
            mlflow.pyfunc.save_model(dirs[name], python_model=str(Path(tmp, "noop.py")),
                                     pip_requirements=[f"mlflow=={mlflow.__version__}"])
        elif name == "plain_pytorch":  # MLflow's defaults: pt2, tensor signature; requirements
            # given only to skip 10 s of inference at save time (no effect on serving)
            mlflow.pytorch.save_model(net, dirs[name], input_example=model_io.input_example(),
                                      pip_requirements=model_io.torch_requirements())
        else:
            conversion = export.convert_and_check(net, DEPLOYABLES[name], data.default_data_dir())
            fmt = export.FORMATS[DEPLOYABLES[name]]
            dirs[f"{name}_archive"] = os.path.join(tmp, f"{name}.{'onnx' if fmt == 'onnx' else 'pt'}")
            export.save_archive(conversion.module, dirs[f"{name}_archive"])
            mlflow.pyfunc.save_model(dirs[name], **export.deployable_model_kwargs(
                dirs[f"{name}_archive"], fmt))
    return dirs


def server(name: str, dirs: dict, port: int, tmp: str) -> tuple[list[str], str, str]:
    """(command, health URL, request URL) of server `name` on `port`."""
    url = f"http://127.0.0.1:{port}"
    if name == "litserve":
        Path(tmp, "litserve_app.py").write_text(LITSERVE_APP)
        return ([sys.executable, str(Path(tmp, "litserve_app.py")), dirs["torchscript_archive"],
                 str(port)], url + "/health", url + "/predict")
    if name.endswith("_workers2"):  # the serve step: one torch thread per worker
        return ([sys.executable, "steps/serve.py", "--model_uri", dirs[name.split("_")[0]],
                 "--port", str(port), "--workers", "2"], url + "/ping", url + "/invocations")
    return ([os.path.join(VENV_BIN, "mlflow"), "models", "serve", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-m", dirs[name]], url + "/ping", url + "/invocations")


def seconds_to_run(code: list[str], rounds: int = 3) -> dict[str, float]:
    """Median seconds of each shell command in a fresh process, the commands alternating."""
    times = [[timed_run(command, shell=True)[0] for command in code] for _ in range(rounds)]
    return {command: round(statistics.median(t), 3) for command, t in zip(code, zip(*times))}


def onnx_session(path: str, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def batch1_alone_us(dirs: dict, n: int = 2000) -> dict[str, float]:
    """Median microseconds of one batch-1 run of each graph in process, one thread."""
    import torch

    from lightcycle.lifecycle.export import ONNX_INPUT

    session, x = onnx_session(dirs["onnx_archive"], 1), images(1)[:, None].astype(np.float32)
    module = torch.jit.load(dirs["torchscript_archive"]).eval()
    runs = {"onnx": lambda: session.run(None, {ONNX_INPUT: x}),
            "torchscript": lambda: module(torch.from_numpy(x))}
    threads, out = torch.get_num_threads(), {}
    torch.set_num_threads(1)
    with torch.inference_mode():
        for name, run in runs.items():
            times = [timed(run)[0] for _ in range(n + 50)]  # the first 50 warm up
            out[name] = round(statistics.median(times[50:]) * 1e6)
    torch.set_num_threads(threads)
    return out


def interleaved_batch1(started: dict, body: bytes, count: int, warmup: int = 20) -> dict:
    """name -> batch-1 p50 (ms), errors and server CPU per request (ms) of every server in
    `started` (name -> (process, URL)), all up at once: `count` sequential requests each on one
    keep-alive connection a server, the servers taking turns request by request (each turn led
    by the next server), so that drift in the machine's speed hits every server alike."""
    names, latencies, errors = list(started), {name: [] for name in started}, Counter()
    connections = {name: (urlsplit(url), http.client.HTTPConnection(
        urlsplit(url).hostname, urlsplit(url).port, timeout=60)) for name, (_, url) in started.items()}

    def send(name: str) -> bool:
        parts, connection = connections[name]
        try:
            return post(connection, parts.path, body)[0] == 200
        except (OSError, http.client.HTTPException):
            connection.close()  # opened again by the next request
            return False

    for _ in range(warmup):
        for name in names:
            send(name)
    cpu = {name: server_usage(proc)[0] for name, (proc, _) in started.items()}
    for i in range(count):
        for name in names[i % len(names):] + names[:i % len(names)]:
            seconds, ok = timed(send, name)
            errors[name] += not ok
            latencies[name].append(seconds)
    for _, connection in connections.values():
        connection.close()
    return {name: {P50: round(percentile(latencies[name], 0.5) * 1000, 3),
                   f"{P50}: errors": errors[name],
                   "server CPU per batch-1 request (ms)":
                       (server_usage(proc)[0] - cpu[name]) / count * 1000}
            for name, (proc, _) in started.items()}


def floor(args, net, tmp: str) -> dict:
    names = ["noop", "torchscript", "onnx", "litserve"]
    dirs = save_models(tmp, net, names[:-1])
    env = child_env(MLFLOW_TRACKING_URI=sqlite_store(tmp))
    one_json, many_b64 = Request(json_body(1)), Request(b64_body(64), images=64)
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    rate = f"{args.clients} clients, requests/s"
    for r in range(args.rounds):
        with ExitStack() as servers:
            started = {}
            for name in names if r % 2 == 0 else names[::-1]:
                cmd, health, url = server(name, dirs, free_port(), tmp)
                proc, seconds = servers.enter_context(serving(cmd, health, env))
                started[name] = proc, url
                rounds[name].append({"cold start (s)": seconds})

            for name, got in interleaved_batch1(started, one_json.body,
                                                args.latency_requests).items():
                rounds[name][-1].update(got)
            for name, (proc, url) in started.items():  # the rest: one server after the other
                cpu = server_usage(proc)[0]
                got = clients_load(url, [one_json], args.clients, args.seconds)
                cpu = (server_usage(proc)[0] - cpu) / max(got["requests"], 1) * 1000
                rounds[name][-1].update({rate: got["requests_per_s"], f"{rate}: errors": got["errors"],
                                         f"{args.clients} clients, server CPU per request (ms)": cpu})
            for name, (_, url) in started.items():
                got = clients_load(url, [many_b64], seconds=args.seconds)
                rounds[name][-1].update({B64: got["images_per_s"], f"{B64}: errors": got["errors"]})
        print(f"round {r + 1}/{args.rounds}:", json.dumps({k: v[-1] for k, v in rounds.items()}),
              file=sys.stderr, flush=True)

    cold = "cold start (s)"
    ratios = {goal: summary([a[key] / b[key] for a, b in zip(rounds["onnx"], rounds[over])])
              for goal, (key, over) in zip(GOALS, [  # in the order of GOALS
                  (P50, "noop"), (cold, "noop"), (rate, "noop"), (B64, "torchscript"),
                  (cold, "litserve"), (P50, "litserve"), (rate, "litserve")])}
    errors = sum(row[f"{rate}: errors"] for row in rounds["onnx"])
    senses = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}
    verdicts = {goal: "met" if senses[GOALS[goal][0]](got["median"], GOALS[goal][1])
                and not (goal.endswith("no errors") and errors) else "missed"
                for goal, got in ratios.items()}
    figures = {name: {key: summary([row[key] for row in got]) for key in got[0]}
               for name, got in rounds.items()}
    startup = seconds_to_run(["mlflow --version", "python -c 'import mlflow.pyfunc.scoring_server'",
                              "python -c 'import mlflow.pyfunc.scoring_server, onnxruntime'",
                              "python -c 'import mlflow.pyfunc.scoring_server, torch'"])
    cli, scoring, ort, torch_ = startup.values()
    alone = batch1_alone_us(dirs)
    return report("served_floor", {
        "rounds": args.rounds, "seconds": args.seconds, "clients": args.clients,
        "load_average_at_end": os.getloadavg(), "figures": figures, "ratios": ratios,
        "goals": verdicts, "startup_s": startup, "batch1_alone_us": alone, "rounds_detail": rounds},
        (["measure (median of rounds, range)", "no-op", "torchscript", "onnx", "LitServe"],
         [[key, *(figures[name][key] for name in names)] for key in figures["onnx"]]),
        (["goal", "ratio (median of rounds, range)", "bound", ""],
         [[goal, got, " ".join(map(str, GOALS[goal])), verdicts[goal]] for goal, got in ratios.items()]),
        (["where the time goes, same run", "seconds or us"],
         [["`mlflow --version`: the CLI's own start (s)", cli],
          ["importing onnxruntime after MLflow's scoring server (s)", round(ort - scoring, 3)],
          ["importing torch after MLflow's scoring server (s)", round(torch_ - scoring, 3)],
          ["the onnx graph's batch-1 run alone, one thread (us)", alone["onnx"]],
          ["the TorchScript archive's batch-1 run alone, one thread (us)", alone["torchscript"]]]))


def batch64(args, net, tmp: str) -> dict:
    names = ["plain_pytorch", "torchscript", "int8", "onnx", "torchscript_workers2"]
    dirs = save_models(tmp, net, names[:-1])
    env = child_env(MLFLOW_TRACKING_URI=sqlite_store(tmp))
    forms = {"JSON": Request(json_body(64), images=64), "base64": Request(b64_body(64), images=64)}
    rows: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for name in names:
            cmd, health, url = server(name, dirs, free_port(), tmp)
            archive = dirs.get(f"{name.split('_')[0]}_archive", "")
            with serving(cmd, health, env):
                for form in ["JSON"] if name == "plain_pytorch" else forms:
                    reference = in_process(archive, 64, args.seconds) if archive.endswith(".pt") else None
                    got = {f"{n} clients": clients_load(url, [forms[form]], n, args.seconds, warmup=5)
                           ["images_per_s"] for n in (1, 2)}
                    if reference:
                        reference = (reference + in_process(archive, 64, args.seconds)) / 2
                        got.update({f"{k} / in process": v / reference for k, v in list(got.items())})
                    rows.setdefault((name, form), []).append(got)
    plain = rows[("plain_pytorch", "JSON")]
    table = [[name, form, *(summary([r[k] for r in got]) if k in got[0] else "" for k in
                            ("1 clients", "2 clients", "1 clients / in process",
                             "2 clients / in process")),
              summary([a["1 clients"] / b["1 clients"] for a, b in zip(got, plain)])]
             for (name, form), got in rows.items()]
    return report("served_batch64", {"rounds": args.rounds, "seconds": args.seconds,
                                     "rounds_detail": {f"{n}, {f}": v for (n, f), v in rows.items()}},
                  (["server", "request", "images/s, 1 client", "images/s, 2 clients",
                    "1 client / in process", "2 clients / in process", "1 client / plain `mlflow.pytorch`"],
                   table))


def deployable_loaders(net, images_t, calibration, reference) -> dict:
    """name -> a function that loads the variant afresh, for every variant that builds."""
    import torch

    from lightcycle.lifecycle import export

    def saved(module, save, load):  # what is served is the saved file: load it afresh
        buffer = io.BytesIO()
        save(module, buffer)
        return lambda: load(io.BytesIO(buffer.getvalue()))

    def jit(module):
        return saved(module, torch.jit.save, lambda f: torch.jit.load(f, map_location="cpu").eval())

    def pt2(program):
        return saved(program, torch.export.save, lambda f: torch.export.load(f).module())

    def chain(method):  # convert + the chain's passes that keep parity
        converted = export.convert(net, method, images_t[:64] if method == "quantize" else example,
                                   calibration)
        if method == "export":
            return pt2(export.check_program(converted, None, reference)[0])
        return jit(export.optimize(converted, None, reference, method == "quantize")[0])

    def optimized_live():
        # AdaptiveAvgPool2d(3) on 7x7 maps is exactly AvgPool2d(3, 2), which oneDNN accepts;
        # its constants cannot be saved, so this is what a server could get optimizing on load
        fixed = copy.deepcopy(net)
        fixed.head[0] = torch.nn.AvgPool2d(3, 2)
        return lambda: torch.jit.optimize_for_inference(torch.jit.script(fixed))

    example = images_t[:2]
    makers = {"eager": lambda: lambda: net, "scripted": lambda: jit(torch.jit.script(net)),
              "frozen": lambda: jit(torch.jit.freeze(torch.jit.script(net))),
              "frozen_channels_last": lambda: chain("script"), "optimized_live": optimized_live,
              "pt2": lambda: pt2(export.roundtrip_program(torch.export.export(net, (example,),
                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=export.MAX_BATCH)},)))),
              "pt2_channels_last": lambda: chain("export"), "int8": lambda: chain("quantize")}
    loaders = {}
    for name, make in makers.items():
        try:
            loaders[name] = make()
        except Exception as exc:  # a variant that cannot be built is reported, not fatal
            print(name, f"build fails: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    return loaders


def deployables(args, net, tmp: str) -> dict:
    import torch

    from lightcycle.lifecycle import export
    from lightcycle.model import data
    from lightcycle.model.evaluate import images_tensor, predict_logits

    test = data.load_split(data.default_data_dir(), "test")
    images_t = images_tensor(test)
    calibration = images_tensor(data.load_split(data.default_data_dir(), "train"))
    synthetic = export.synthetic_images(images_t)
    reference = export.Reference(images_t, predict_logits(net, images_t), test.labels, synthetic,
                                 predict_logits(net, synthetic))
    loaders = deployable_loaders(net, images_t, calibration[:export.CALIBRATION_IMAGES], reference)
    results, timed = {}, {}
    for name, load in loaders.items():
        try:
            with torch.inference_mode():
                logits = predict_logits(load(), images_t, batch_size=64)
                shifted = predict_logits(load(), synthetic, batch_size=64)
        except Exception as exc:
            results[name] = {"fails at run time": str(exc).strip().splitlines()[-1][:200]}
            continue
        results[name] = {"accuracy": round(float((logits.argmax(1).numpy() == test.labels).mean()), 4),
                         "agreement, shifted copies": round(float(
                             (shifted.argmax(1) == reference.synthetic_logits.argmax(1)).float().mean()), 4)}
        for batch in (1, 64):  # a fresh module per batch size: TorchScript specializes on shapes
            timed[(name, batch)] = (load(), images_t[:batch].clone(), [])
    for round_ in range(args.rounds):  # interleaved rounds: load from elsewhere hits all alike
        for module, x, rates in timed.values():
            rates.append(images_per_second(module, x, args.seconds, warmup=0 if round_ else 20))
    for (name, batch), (_, _, rates) in timed.items():
        results[name][f"batch-{batch} images/s"] = round(statistics.median(rates))
        if batch == 64 and ("frozen", 64) in timed:
            results[name]["batch 64 vs frozen"] = round(statistics.median(
                r / f for r, f in zip(rates, timed[("frozen", 64)][2])), 2)
    columns = ["batch-1 images/s", "batch-64 images/s", "batch 64 vs frozen", "accuracy",
               "agreement, shifted copies"]
    return report("deployables", {"epochs": args.epochs, "rounds": args.rounds,
                                  "seconds": args.seconds, "threads": torch.get_num_threads(),
                                  "variants": results},
                  (["variant", *columns], [[name, *(row.get(c, row.get("fails at run time", "")
                                                              if c == "accuracy" else "")
                                                    for c in columns)]
                                           for name, row in results.items()]))


# Each breaks the input contract differently; every one must be answered 4xx, never 5xx.
BAD_BODIES = [json.dumps({"inputs": [[0.0] * 784]}), json.dumps({"inputs": [[[[300.0] * 28] * 28]]}),
              json.dumps({"inputs": [[[["a"] * 28] * 28]]}), json.dumps({"inputs": []}),
              json.dumps({"inputs": None}), json.dumps({"pixels": [[[[0.0] * 28] * 28]]}),
              "this is {not json", '{"inputs": [[[' + ",".join(["[" + ",".join(["NaN"] * 28) + "]"] * 28) + "]]]}"]


def standard_mix(model_uri: str) -> list[Request]:
    """Batches of 1, 8 and 64 sample test images whose answers must be the classes the model
    gives in this process, with a bad request after every third good one."""
    import mlflow

    from lightcycle.model import data

    test = data.load_split(data.default_data_dir(), "test")
    expected = mlflow.pyfunc.load_model(model_uri).predict(
        test.images[:, None].astype(np.float32))["class_id"].to_numpy()

    def answers(classes):
        def check(status, body):
            if status >= 500:
                return f"server_errors: {status}"
            if status != 200 or [r["class_id"] for r in json.loads(body)["predictions"]] != classes:
                return f"wrong_answers: {status}"
        return check

    def refused(status, body):
        return f"server_errors: {status}" if status >= 500 else (
            None if status >= 400 else f"bad_not_4xx: {status}")

    mix = []
    for size in (1, 8, 64):
        for start in range(0, len(test.images) - size + 1, max(size, 16)):
            mix.append(Request(json.dumps({"inputs": test.images[start:start + size].tolist()}).encode(),
                               "good", size, answers(expected[start:start + size].tolist())))
            if len(mix) % 4 == 3:
                mix.append(Request(BAD_BODIES[len(mix) // 4 % len(BAD_BODIES)].encode(), "bad", 0,
                                   refused))
    return mix


def run_load(url: str, mix: list[Request], clients: int = 8, seconds: float = 30,
             warmup_seconds: float = 5, rss=None) -> dict:
    """Warm up, read the server's RSS, load it with `clients` for `seconds`, read RSS again."""
    clients_load(url.rstrip("/") + "/invocations", mix, clients, warmup_seconds, warmup=0)
    before = rss() if rss else None
    result = clients_load(url.rstrip("/") + "/invocations", mix, clients, seconds, warmup=0)
    return {**result, "rss_after_warmup_kib": before, "rss_end_kib": rss() if rss else None}


def load(args) -> dict:
    # server_usage reads a process group: the server's own, started in a session of its own
    group = SimpleNamespace(pid=args.pid)
    got = run_load(args.url, standard_mix(args.model_uri), args.clients, args.seconds,
                   rss=(lambda: server_usage(group)[1]) if args.pid else None)
    return report("load_serve", got, (
        ["clients", "requests/s", "images/s", "p50 (ms)", "p99 (ms)", "good", "bad", "problems",
         "RSS after warm-up / at the end (KiB)"],
        [[got["clients"], got["requests_per_s"], got["images_per_s"], got["p50_ms"], got["p99_ms"],
          got["kinds"]["good"], got["kinds"]["bad"], dict(got["problems"]) or "none",
          [got["rss_after_warmup_kib"], got["rss_end_kib"]]]]))


VARIANTS = {"floor": floor, "batch64": batch64, "deployables": deployables}


def main(argv: list[str] | None = None) -> dict:
    parser = command_line(__doc__, rounds=3)
    parser.add_argument("--variant", choices=[*VARIANTS, "load"], required=True)
    parser.add_argument("--seconds", type=float, help="a figure's (default 3); load: in all (30)")
    parser.add_argument("--train-epochs", type=int, default=3, help="the cnn's (0: untrained)")
    parser.add_argument("--epochs", type=int, default=8, help="deployables: train epochs")
    parser.add_argument("--latency-requests", type=int, default=400)
    parser.add_argument("--clients", type=int, help="floor: 32; load: 8")
    parser.add_argument("--url", help="load: the running server")
    parser.add_argument("--model-uri", default="models:/lightcycle-fashion-scripted@champion")
    parser.add_argument("--pid", type=int, help="load: the server's pid (a session leader), for RSS")
    args = parser.parse_args(argv)
    is_load = args.variant == "load"
    args.clients, args.seconds = args.clients or (8 if is_load else 32), args.seconds or (30 if is_load else 3)
    if is_load:
        return load(args)
    net = (trained_cnn(args.epochs, seed=42) if args.variant == "deployables"
           else trained_cnn(args.train_epochs))
    with tempfile.TemporaryDirectory(prefix=f"bench-served-{args.variant}-") as tmp:
        return VARIANTS[args.variant](args, net, tmp)


if __name__ == "__main__":
    main()
