"""LIGHTCYCLE_STRICT=1 turns every skip into a failure but a `gpu` test's on a machine without CUDA."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SAMPLE = '''
import pytest

def test_passes():
    pass

def test_lost_a_backend():
    pytest.skip("PostgreSQL backend not tested: no initdb")

@pytest.mark.gpu
def test_needs_cuda():
    import torch
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_to_fail():
    assert False
'''


def _pytest(tmp_path: Path, strict: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k != "LIGHTCYCLE_STRICT"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    if strict is not None:
        env["LIGHTCYCLE_STRICT"] = strict
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "strict", "-p", "no:cacheprovider",
                           "-n", "0", "-rA", "test_sample.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def _counts(summary: str) -> dict[str, int]:
    last = summary.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", last)}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_without_strict_a_lost_backend_is_only_a_skip(tmp_path):
    result = _pytest(tmp_path, None)
    assert result.returncode == 0, result.stdout[-3000:]
    expected = {"passed": 1, "skipped": 1, "xfailed": 1} if _cuda() else \
        {"passed": 1, "skipped": 2, "xfailed": 1}
    assert _counts(result.stdout) == expected, result.stdout[-3000:]


def test_strict_fails_the_run_on_a_skip_but_a_gpu_test_without_cuda(tmp_path):
    result = _pytest(tmp_path, "1")
    assert result.returncode == 1, result.stdout[-3000:]
    assert re.search(r"FAILED test_sample.py::test_lost_a_backend", result.stdout), result.stdout
    assert "LIGHTCYCLE_STRICT=1: skipped tests fail the run" in result.stdout
    assert "PostgreSQL backend not tested: no initdb" in result.stdout
    counts = _counts(result.stdout)
    assert counts.get("failed") == 1 and counts.get("xfailed") == 1, result.stdout[-3000:]
    if not _cuda():
        assert counts.get("skipped") == 1 and "SKIPPED" in result.stdout
        assert "no CUDA GPU" in result.stdout


@pytest.mark.parametrize("value", ["0", ""])
def test_strict_is_off_unless_set(tmp_path, value):
    assert _pytest(tmp_path, value).returncode == 0
