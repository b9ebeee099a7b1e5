"""LIGHTCYCLE_STRICT=1 (set by .ci/run): a skipped test fails the run.

A CI machine that lost PostgreSQL, Java or the container engine would otherwise go green with a
backend silently untested. The one skip allowed is a test marked `gpu` on a machine without
CUDA. Loaded by tests/conftest.py (`pytest_plugins`); also usable alone with `-p strict`.
"""

from __future__ import annotations

import os

import pytest

STRICT_VAR = "LIGHTCYCLE_STRICT"


def strict() -> bool:
    return os.environ.get(STRICT_VAR, "").strip().lower() in ("1", "true", "yes")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (the one skip LIGHTCYCLE_STRICT=1 allows)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (strict() and report.skipped) or hasattr(report, "wasxfail"):
        return
    if item.get_closest_marker("gpu") is not None and not _cuda():
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"{STRICT_VAR}=1: skipped tests fail the run ({reason}). Install what it "
                       f"needs (README: Tests), or run without {STRICT_VAR} on a machine that lacks it.")
