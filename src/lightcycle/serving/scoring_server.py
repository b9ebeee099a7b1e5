"""Serve a registered deployable with the real `mlflow models serve` scoring server.

`serve` runs exactly the server `mlflow models serve --env-manager local` runs (MLflow's
`scoring_server.get_cmd`: the uvicorn command on `mlflow.pyfunc.scoring_server.app:app`, same
arguments and environment), but in this process: the `mlflow` CLI would import every MLflow
command and then start a second interpreter that imports MLflow again, about half of the
cold start.
"""

from __future__ import annotations

import os
import shlex
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


def scoring_server_command(resolved: str, host: str, port: int,
                           workers: int) -> tuple[list[str], dict[str, str]]:
    """What `mlflow models serve -m <resolved> --env-manager local` execs once it has the model
    on local disk: MLflow's own command and environment, with this venv's uvicorn."""
    from mlflow.pyfunc import scoring_server
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    local = resolved if Path(resolved).is_dir() else _download_artifact_from_uri(resolved)
    command, env = scoring_server.get_cmd(local, port=port, host=host, nworkers=workers)
    argv = shlex.split(command)
    argv[0] = str(Path(sys.executable).with_name(argv[0]))  # uvicorn of this interpreter
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return argv, env


def exec_server(model_uri: str, host: str, port: int, workers: int) -> None:
    """Run MLflow's scoring-server command (uvicorn's own CLI entry point) in this process."""
    resolved = resolve_servable(model_uri)
    cmd, env = scoring_server_command(resolved, host, port, workers)
    print(f"serving {model_uri} -> {resolved} on http://{host}:{port}/invocations", flush=True)
    os.environ.update(env)
    import uvicorn.main

    uvicorn.main.main(args=cmd[1:], prog_name="uvicorn")
