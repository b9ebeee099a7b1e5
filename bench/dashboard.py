"""The benchmarks that fit in 15 minutes on a 2-core machine, their tables under their areas
(`make bench`).

    PATH=.venv/bin:$PATH python -m bench.dashboard [--only serving,chain.chain] [--list]

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

    @property
    def log(self) -> str:
        return f"bench/results/{self.results}.log"


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
                                 "--seconds", "0.5", "--no-onnx"), "deployables", 120),
    # The Spark session (20-40 s), then 1,000 images (warm-up) and 5,000 by each engine.
    Benchmark("spark.predict", ("--sizes", "5000"), "spark", 120),
    # `main` at 1 epoch on the sample (about 40 s), a `serve` start, 2 x (3 + 3) s of load.
    Benchmark("scale.curve", ("--sizes", "720", "--clients", "1,8", "--seconds", "3"),
              "scale_curve", 90),
)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def progress(line: str) -> None:
    print(f"[bench] {line}", file=sys.stderr, flush=True)


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C the benchmark's process group, so that its `finally` blocks stop the servers it
    started in sessions of their own; then kill what is left of the group, after GRACE_S at most."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run(benchmark: Benchmark) -> tuple[str | None, float]:
    """Runs one benchmark under twice its estimate and a minute: (None, or what went wrong in
    a line; seconds)."""
    RESULTS.mkdir(exist_ok=True)
    start, timeout = time.time(), 2 * benchmark.estimate_s + 60
    with (ROOT / benchmark.log).open("w") as out:
        # A session of its own: stopping its group must not stop this process.
        proc = subprocess.Popen([sys.executable, "-m", f"bench.{benchmark.module}",
                                 *benchmark.args], cwd=ROOT, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            return f"out of time: stopped after {timeout} s", time.time() - start
        except KeyboardInterrupt:
            stop(proc)
            raise
    seconds = time.time() - start
    if code != 0:
        return f"failed with exit status {code}", seconds
    saved = RESULTS / f"{benchmark.results}.json"
    if not saved.exists() or saved.stat().st_mtime < start:
        return f"exited 0 but wrote no {saved.relative_to(ROOT)}", seconds
    return None, seconds


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
                                   f"{benchmark.log}:", "", *(f"    {line}" for line in log_tail)])
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
    parser.add_argument("--list", action="store_true", help="print what would run, run nothing")
    args = parser.parse_args(argv)
    benchmarks = chosen(args.only)
    total = sum(b.estimate_s for b in benchmarks)
    count = f"{len(benchmarks)} benchmark{'s' if len(benchmarks) != 1 else ''}"
    if args.list:
        for b in benchmarks:
            print(f"{b.module:32} est. {minutes(b.estimate_s):>8}   {b.command}")
        print(f"{count}, about {minutes(total)} on a quiet 2-core machine")
        return 0

    progress(f"{count}, about {minutes(total)} on a quiet 2-core machine; "
             "logs in bench/results/")
    print(f"# Benchmarks ({time.strftime('%Y-%m-%d %H:%M')}, `make bench`)")
    failed, area, started = [], None, time.time()
    for i, benchmark in enumerate(benchmarks, 1):
        progress(f"{i}/{len(benchmarks)} {benchmark.module} "
                 f"(est. {minutes(benchmark.estimate_s)}) ...")
        problem, seconds = run(benchmark)
        progress(f"{i}/{len(benchmarks)} {benchmark.module}: "
                 + (f"{problem} ({minutes(seconds)})" if problem
                    else f"done in {minutes(seconds)}"))
        if problem:
            failed.append(benchmark.module)
            tail = (ROOT / benchmark.log).read_text().rstrip().splitlines()[-5:]
            text = section(benchmark, seconds, problem=problem, log_tail=tail)
        else:
            text = section(benchmark, seconds,
                           json.loads((RESULTS / f"{benchmark.results}.json").read_text()))
        if benchmark.area != area:
            area = benchmark.area
            print(f"\n## {AREAS[area]}")
        print(f"\n{text}", flush=True)
    summary = (f"{count} in {minutes(time.time() - started)}"
               + (f"; failed or out of time: {', '.join(failed)}" if failed else ""))
    progress(summary)
    print(f"\n{summary}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
