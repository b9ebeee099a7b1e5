"""Serve a registered deployable with the real `mlflow models serve` scoring server."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lightcycle.lifecycle import registry
from lightcycle.errors import UserError


def resolve_servable(model_uri: str) -> str:
    """Accept registry URIs, or a local model directory the user names; nothing else.

    Loading a model runs its code (pickled or models-from-code), so arbitrary remote URIs
    (runs:/ of someone else's run, http://...) are refused. An alias is resolved once, now,
    to a version: the server keeps serving that version until it is restarted.
    """
    if model_uri.startswith("models:/"):
        return registry.resolve(model_uri).uri
    path = Path(model_uri)
    if path.is_dir() and (path / "MLmodel").is_file():
        return str(path.resolve())
    raise UserError(
        f"Refusing to serve {model_uri!r}: give a registry URI (models:/<name>@<alias> or "
        "models:/<name>/<version>) or a local directory that holds an MLmodel file. Loading a "
        "model runs its code, so only the registry or a path you name are accepted."
    )


def serve_command(model_uri: str, host: str, port: int, workers: int) -> list[str]:
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    return [mlflow_bin, "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", host, "-p", str(port), "-w", str(workers)]


def server_environment(workers: int, environ: dict[str, str]) -> dict[str, str]:
    """The scoring server's environment. With several workers and no thread setting of the
    user's, each worker gets an equal share of the cores: torch would start one thread per
    core in every worker, and oversubscribed OpenMP threads spin (on 2 cores, two 2-thread
    torch processes ran 5x slower than two 1-thread ones)."""
    env = dict(environ)
    # `mlflow models serve` execs uvicorn by name: this interpreter's bin/ must lead PATH.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if workers > 1 and not {"LIGHTCYCLE_TORCH_THREADS", "OMP_NUM_THREADS"} & env.keys():
        env["LIGHTCYCLE_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    return env


def exec_server(model_uri: str, host: str, port: int, workers: int) -> None:
    resolved = resolve_servable(model_uri)
    cmd = serve_command(resolved, host, port, workers)
    env = server_environment(workers, os.environ)
    print(f"serving {model_uri} -> {resolved} on http://{host}:{port}/invocations", flush=True)
    os.execve(cmd[0], cmd, env)
