"""The test suite's cost: wall time and the CPU time of every process it started.

    PATH=.venv/bin:$PATH python -m bench.suite_time [--tier fast|full] [--pytest-args ARGS]

Runs `make test` (`--tier fast`: `make test PYTEST_ARGS='-m "not slow"'`) from the repository
root. CPU time is read from a cgroup of its own (cgroup v1 cpuacct or cgroup v2, where this
process may create one), so servers, Spark JVMs and containers that outlive their parents still
count; without one it falls back to the CPU time of reaped children, which misses those.
Writes bench/results/suite_<tier>.json and the suite's output beside it (suite_<tier>.log).
"""

import contextlib
import os
import re
import resource
import subprocess
import sys
import uuid
from pathlib import Path

from bench.common import RESULTS, ROOT, command_line, report, timed

TIERS = {"fast": '-m "not slow"', "full": ""}
CGROUP_ROOTS = (Path("/sys/fs/cgroup/cpuacct"), Path("/sys/fs/cgroup/unified"),
                Path("/sys/fs/cgroup"))


def _own_cgroup() -> Path | None:
    for root in CGROUP_ROOTS:
        if (root / "cpuacct.usage").exists() or (root / "cgroup.procs").exists():
            group = root / f"lightcycle-suite-{uuid.uuid4().hex[:8]}"
            try:
                group.mkdir()
            except OSError:
                continue
            if (group / "cpuacct.usage").exists() or (group / "cpu.stat").exists():
                return group
            group.rmdir()
    return None


def _cpu_seconds(group: Path) -> float:
    if (group / "cpuacct.usage").exists():
        return int((group / "cpuacct.usage").read_text()) / 1e9
    usage = re.search(r"usage_usec (\d+)", (group / "cpu.stat").read_text())
    return int(usage[1]) / 1e6


def command(tier: str, extra: str = "") -> list[str]:
    args = " ".join(a for a in (TIERS[tier], extra) if a)
    return ["make", "test"] + ([f"PYTEST_ARGS={args}"] if args else [])


def measure(tier: str, extra: str = "") -> dict:
    group = _own_cgroup()
    # runs in the child before exec: make and all it starts stay in the group
    enter = (lambda: (group / "cgroup.procs").write_text(str(os.getpid()))) if group else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, result = timed(subprocess.run, command(tier, extra), cwd=ROOT, preexec_fn=enter,
                         capture_output=True, text=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"suite_{tier}.log").write_text(result.stdout + result.stderr)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    reaped = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary = [line for line in result.stdout.splitlines() if re.match(r"^=+ .* in [\d.]+s", line)]
    pytest_s = re.search(r" in ([\d.]+)s", summary[-1]) if summary else None
    figures = {"tier": tier, "command": " ".join(command(tier, extra)), "exit_code": result.returncode,
               "wall_s": round(wall, 1), "pytest_wall_s": float(pytest_s[1]) if pytest_s else None,
               "summary": summary[-1].strip("= ") if summary else result.stdout[-500:],
               "cpu_s": round(_cpu_seconds(group), 1) if group else None,
               "cpu_s_reaped_children": round(reaped, 1),
               "cpu_source": f"cgroup {group}" if group else "reaped children only"}
    if group is not None:
        with contextlib.suppress(OSError):  # a process the suite left behind holds it; the figure stands
            group.rmdir()
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = command_line(__doc__)
    parser.add_argument("--tier", choices=sorted(TIERS), default="fast")
    parser.add_argument("--pytest-args", default="", help="more pytest arguments, e.g. --durations=40")
    args = parser.parse_args(argv)
    figures = measure(args.tier, args.pytest_args)
    return report(f"suite_{args.tier}", figures, (
        ["tier", "command", "pytest wall (s)", "CPU, everything it started (s)", "result"],
        [[figures["tier"], f"`{figures['command']}`", figures["pytest_wall_s"],
          figures["cpu_s"] or figures["cpu_s_reaped_children"], figures["summary"]]]))


if __name__ == "__main__":
    sys.exit(main()["exit_code"])
