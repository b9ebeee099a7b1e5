"""MLflow's whole request handler (`scoring_server.invocations`, no HTTP), today's wrapper beside
this checkout's, interleaved in one process: robust to a busy machine, unlike served figures.

    PATH=.venv/bin:$PATH python -m bench.serving.invocations [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import torch

from bench.common import markdown_table, save, untrained_cnn
from bench.serving.served import b64_body, images, json_body, save_models

warnings.simplefilter("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--reference-rev", default="1879355")
    args = parser.parse_args()
    import mlflow.pyfunc
    from mlflow.pyfunc import scoring_server

    net = untrained_cnn()
    os.environ["_MLFLOW_IS_IN_SERVING_ENVIRONMENT"] = "true"  # as scoring_server.init sets it
    with tempfile.TemporaryDirectory() as tmp:
        dirs = save_models(tmp, net, args.reference_rev)
        original = scoring_server.infer_and_parse_data
        reference = mlflow.pyfunc.load_model(dirs["reference"])
        new = mlflow.pyfunc.load_model(dirs["new"])  # installs its parser hook
        hooked = scoring_server.infer_and_parse_data
        module = torch.jit.load(dirs["archive"])
        x = torch.from_numpy(images(64)[:, None].astype("float32"))
        cases = {
            "reference_json": (reference, original, json_body(64)),
            "new_json": (new, hooked, json_body(64)),
            "new_b64": (new, hooked, b64_body(64)),
        }
        times = {name: [] for name in [*cases, "module_only"]}
        for _ in range(args.repeats):
            for name, (model, parser_fn, body) in cases.items():
                scoring_server.infer_and_parse_data = parser_fn
                t = time.perf_counter()
                result = scoring_server.invocations(body, "application/json", model, None)
                times[name].append((time.perf_counter() - t) * 1000)
                assert result.status == 200, result.response[:300]
            with torch.inference_mode():
                t = time.perf_counter()
                module(x)
                times["module_only"].append((time.perf_counter() - t) * 1000)
    figures = {f"{k}_ms_median": round(statistics.median(v), 2) for k, v in times.items()}
    figures["load_average_at_end"] = os.getloadavg()
    save("invocations", {"batch": 64, "repeats": args.repeats, **figures})


def table(figures: dict) -> str:
    rows = [[key.removesuffix("_ms_median").replace("_", " "), value]
            for key, value in figures.items() if key.endswith("_ms_median")]
    return markdown_table([f"batch-{figures['batch']} request, in process", "ms, median of "
                           f"{figures['repeats']}"], rows)


if __name__ == "__main__":
    main()
