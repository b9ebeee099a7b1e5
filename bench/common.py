"""Shared bits for the benchmarks: machine description, a results writer and its markdown table,
the environment of the processes they start, the plain training loop, and the tests' process
machinery (tests/processes.py: free ports, waiting for HTTP, stopping process groups)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
VENV_BIN = str(Path(sys.executable).parent)

sys.path.insert(0, str(ROOT / "tests"))
from processes import free_port, stop_process, wait_for_http  # noqa: E402,F401
from synthetic import synthetic_data_dir  # noqa: E402,F401


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


def rounds_parser(doc: str, rounds: int, seconds: float) -> argparse.ArgumentParser:
    """The command line of a benchmark that measures in `--rounds` of `--seconds` per figure;
    --help prints `doc` as it is written."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=rounds)
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


def file_at(rev: str, path: str) -> str:
    """`path` as it was at git revision `rev`: the code a benchmark compares against."""
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """One markdown table; numbers with thousands separators, at most 4 significant digits
    below 1,000."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


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


def untrained_cnn():
    """The project's `cnn`, seeded, in eval mode: shapes and speed of a trained one."""
    import torch

    from lightcycle.model.nets import build_net

    torch.manual_seed(0)
    return build_net("cnn").eval()


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


def trained_cnn(epochs: int, seed: int = 0, net=None):
    """`net` (a `cnn` by default) after `epochs` of the plain loop, in eval mode; 0 epochs: the
    seeded untrained `cnn`, which costs the same to run."""
    if not epochs:
        return untrained_cnn() if net is None else net.eval()
    for net, _ in plain_cnn_epochs(epochs, seed, net=net):
        pass
    return net.eval()
