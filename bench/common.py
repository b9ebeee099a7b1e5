"""Shared bits for the benchmarks: machine description, a results writer, and the tests' process
machinery (tests/processes.py: free ports, waiting for HTTP, stopping process groups)."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from processes import free_port, stop_process, wait_for_http  # noqa: E402,F401

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    import torch

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return (f"{platform.node()}: {os.cpu_count()} cores ({cpu}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")


def save(name: str, figures: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    figures = {"machine": machine(), **figures}
    (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
