"""Test and benchmark machinery for real processes: free ports, waiting for HTTP, stopping groups."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen | None, timeout: float, log: Path | None = None,
                  exited: Callable[[], str | None] | None = None):
    """Poll `url` until it answers 200. Fail early, with the log's tail, if `proc` exits, or
    with what `exited()` returns once it returns something (a container's logs, say)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            detail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process for {url} exited with {proc.returncode}:\n{detail}")
        detail = exited() if exited else None
        if detail is not None:
            raise RuntimeError(f"the server for {url} exited:\n{detail}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s")


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a process started with start_new_session=True, and its children, by process id."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
