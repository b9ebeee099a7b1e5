"""The benchmarks that fit in 15 minutes on a 2-core machine, their tables under their areas
(`make bench`).

    PATH=.venv/bin:$PATH python -m bench.dashboard [--only serving,chain.chain]

Each benchmark runs as `python -m bench.<area>.<name>` with short settings, from the repository
root, under its own time limit; its output goes to bench/results/<results>.log. The dashboard
then prints the tables the benchmark returned (saved in bench/results/<results>.json) as they
are. A benchmark that fails or runs out of time is reported as such and the others still run.
Progress goes to stderr and the report to stdout, so `make bench > report.md` keeps the report
alone. The settings are short: the tables show where things stand, not figures to quote
(BENCHMARKS.md has those, with the settings they were measured with).
"""

import contextlib
import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from bench.common import RESULTS, ROOT, child_env, command_line, markdown_table

AREAS = {"training": "Training", "chain": "Chain", "serving": "Serving", "spark": "Spark",
         "scale": "Scale"}
# A benchmark asked to stop gets this long to stop the servers it started.
GRACE_S = 30


@dataclass(frozen=True)
class Benchmark:
    module: str  # below `bench.`: "<area>.<name>"
    args: tuple[str, ...]
    results: str  # the name it saves under bench/results/
    estimate_s: int  # on a quiet 2-core machine, from its settings and its code

    @property
    def area(self) -> str:
        return self.module.split(".")[0]

    @property
    def command(self) -> str:
        return shlex.join(["python", "-m", f"bench.{self.module}", *self.args])


# In the order of AREAS; together about 13.5 minutes. Each estimate, from the settings and what
# BENCHMARKS.md measured: imports and start-ups first, since on 2 cores they cost more than the
# short work itself.
BENCHMARKS = (
    # Lightning's import, then 2 rounds of 3 epochs a side (about 2 s each).
    Benchmark("training.epoch", ("--epochs", "3", "--rounds", "2"), "epoch", 60),
    # A tracking server start (about 15 s), then `mlflow run . -e train` at 3 epochs (about 30 s).
    Benchmark("training.checkpoint_retention", ("3", "cnn"), "checkpoint_retention_cnn_3", 60),
    # `main` at 3 epochs (40-50 s), its cached re-run (5-10 s), 7 step imports 3 times (50 s).
    Benchmark("chain.chain", (), "chain", 120),
    # Imports, then 6 models logged and 5 registered at about 0.2 s each.
    Benchmark("chain.log_model", (), "log_model", 30),
    # 4 tracking server starts: 15-20 s each, plus 3 s to count the processes.
    Benchmark("chain.server_start", ("--repeats", "2"), "server_start", 90),
    # 3 conversions, 4 server starts (no-op, torchscript, onnx, LitServe), 3 s of figures a
    # server, then the CLI and import timings (about 30 s) and the graphs alone.
    Benchmark("serving.served", ("--variant", "floor", "--rounds", "1", "--seconds", "1",
                                 "--train-epochs", "0", "--latency-requests", "200"),
              "served_floor", 150),
    # 2 epochs, 9 variants built and checked (most of it), 2 rounds of 18 x 0.5 s.
    Benchmark("serving.served", ("--variant", "deployables", "--epochs", "2", "--rounds", "2",
                                 "--seconds", "0.5"), "deployables", 120),
    # The Spark session (20-40 s), then 1,000 images (warm-up) and 5,000 by each engine.
    Benchmark("spark.predict", ("--sizes", "5000"), "spark", 120),
    # `main` at 1 epoch on the sample (about 40 s), a `serve` start, 2 x (3 + 3) s of load.
    Benchmark("scale.curve", ("--sizes", "720", "--clients", "1,8", "--seconds", "3"),
              "scale_curve", 90),
)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def run(benchmark: Benchmark) -> tuple[str | None, float]:
    """Runs one benchmark under twice its estimate and a minute: (None, or what went wrong in
    a line; seconds). Asked to stop, it gets Ctrl-C first, so that its `finally` blocks stop the
    servers it started in sessions of their own, and GRACE_S before the rest of its group dies."""
    RESULTS.mkdir(exist_ok=True)
    start, timeout = time.time(), 2 * benchmark.estimate_s + 60
    with (RESULTS / f"{benchmark.results}.log").open("w") as out:
        # A session of its own: stopping its group must not stop this process.
        proc = subprocess.Popen([sys.executable, "-m", f"bench.{benchmark.module}",
                                 *benchmark.args], cwd=ROOT, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code, problem = proc.wait(timeout), None
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as stopped:
            for sig, grace in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, None)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(grace)
            if isinstance(stopped, KeyboardInterrupt):
                raise
            code, problem = None, f"out of time: stopped after {timeout} s"
    saved = RESULTS / f"{benchmark.results}.json"
    if code not in (0, None):
        problem = f"failed with exit status {code}"
    elif code == 0 and (not saved.exists() or saved.stat().st_mtime < start):
        problem = f"exited 0 but wrote no {saved.relative_to(ROOT)}"
    return problem, time.time() - start


def section(benchmark: Benchmark, seconds: float, result: dict | None = None,
            problem: str | None = None, log_tail: list[str] = ()) -> str:
    """The report on one benchmark: what it measures, the command, then the machine and the
    tables it returned, or the `problem` and the end of its log."""
    module = importlib.import_module(f"bench.{benchmark.module}")
    what = " ".join(module.__doc__.strip().split("\n\n")[0].split())
    lines = [f"### {benchmark.module} ({benchmark.results})", "", what, "",
             f"    {benchmark.command}", ""]
    if problem:
        return "\n".join([*lines, f"**{problem}** ({minutes(seconds)}); the end of "
                                   f"bench/results/{benchmark.results}.log:", "",
                          *(f"    {line}" for line in log_tail)])
    tables = [markdown_table(t["header"], t["rows"]) for t in result["tables"]]
    return "\n".join(lines + [f"{result['machine']}; took {minutes(seconds)}", "",
                               "\n\n".join(tables)])


def chosen(only: str | None) -> list[Benchmark]:
    if not only:
        return list(BENCHMARKS)
    names = {name.strip().removeprefix("bench.") for name in only.split(",") if name.strip()}
    known = set(AREAS) | {b.module for b in BENCHMARKS} | {b.results for b in BENCHMARKS}
    if names - known:
        sys.exit(f"--only: no area or benchmark {sorted(names - known)}; "
                 f"choose from {sorted(known)}")
    return [b for b in BENCHMARKS if names & {b.area, b.module, b.results}]


def main(argv: list[str] | None = None) -> int:
    parser = command_line(__doc__)
    parser.add_argument("--only", help="comma-separated areas or benchmarks, e.g. "
                                       "serving,chain.chain")
    benchmarks = chosen(parser.parse_args(argv).only)
    print(f"[bench] {len(benchmarks)} benchmark(s), about "
          f"{minutes(sum(b.estimate_s for b in benchmarks))} on a quiet 2-core machine; logs in "
          "bench/results/", file=sys.stderr, flush=True)
    print(f"# Benchmarks ({time.strftime('%Y-%m-%d %H:%M')}, `make bench`)")
    failed, area, started = [], None, time.time()
    for i, benchmark in enumerate(benchmarks, 1):
        problem, seconds = run(benchmark)
        print(f"[bench] {i}/{len(benchmarks)} {benchmark.module}: {problem or 'done'} "
              f"({minutes(seconds)})", file=sys.stderr, flush=True)
        if problem:
            failed.append(benchmark.module)
            tail = (RESULTS / f"{benchmark.results}.log").read_text().rstrip().splitlines()[-5:]
            text = section(benchmark, seconds, problem=problem, log_tail=tail)
        else:
            text = section(benchmark, seconds,
                           json.loads((RESULTS / f"{benchmark.results}.json").read_text()))
        if benchmark.area != area:
            area = benchmark.area
            print(f"\n## {AREAS[area]}")
        print(f"\n{text}", flush=True)
    summary = (f"{len(benchmarks)} benchmark(s) in {minutes(time.time() - started)}"
               + (f"; failed or out of time: {', '.join(failed)}" if failed else ""))
    print(f"\n{summary}")
    print(f"[bench] {summary}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
