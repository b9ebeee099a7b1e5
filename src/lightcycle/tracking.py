"""MLflow helpers shared by every step: code version, tags, params, ranks and fail-fast checks.

Imports only mlflow (and the standard library) so that non-training steps stay fast.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from lightcycle.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Tags every step run carries; later steps and the cache read them back from the server.
TAG_ENTRY_POINT = "mlflow.project.entryPoint"
TAG_CODE_VERSION = "lightcycle.code_version"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_DATA_DIGEST = "lightcycle.data_digest"
TAG_OUTPUT_URI = "lightcycle.output_uri"  # what a step run produced, for the next step
TAG_MODEL_ID = "lightcycle.model_id"

_SOURCE_GLOBS = ("src/lightcycle/**/*.py", "steps/*.py", "MLproject", "requirements.txt")

# MLflow's own client retries every request (connection refused, 408/429/5xx) with exponential
# backoff: sleep = factor * 2**(n-1), first retry immediate. Its defaults (7 retries, factor 2)
# wait about 4 minutes before a dead server surfaces. Factor 1 keeps 7 retries but bounds the
# wait to about 2 minutes (0+2+4+...+64 s plus jitter): long enough to ride out a server
# restart (15-30 s here), short enough that a real outage fails the step instead of hanging it.
# Set as environment defaults so `mlflow run` children inherit them; a user's values win.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


def configure_http_retries() -> None:
    for key, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)


configure_http_retries()


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _git_dirty(root: Path) -> bool:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src", "steps", "MLproject",
             "requirements.txt"],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return True
    return bool(out.stdout.strip())


def source_hash(root: Path = PROJECT_ROOT) -> str:
    digest = hashlib.sha256()
    files = sorted({p for pattern in _SOURCE_GLOBS for p in root.glob(pattern) if p.is_file()})
    for path in files:
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def code_version(root: Path = PROJECT_ROOT) -> str:
    """The git commit on a clean tree; otherwise the commit (if any) plus a hash of the source.

    A dirty tree must not reuse runs made by the committed code, so its version differs.
    """
    commit = git_commit(root)
    if commit and not _git_dirty(root):
        return commit
    prefix = f"{commit[:12]}-dirty" if commit else "nogit"
    return f"{prefix}-{source_hash(root)}"


def step_tags(entry_point: str) -> dict[str, str]:
    tags = {TAG_ENTRY_POINT: entry_point, TAG_CODE_VERSION: code_version()}
    commit = git_commit()
    if commit:
        tags[TAG_GIT_COMMIT] = commit
    return tags


def is_global_rank_zero() -> bool:
    """True outside distributed launches and on global rank 0 inside them.

    Lightning's subprocess launcher sets LOCAL_RANK/NODE_RANK in its children, torchrun sets
    RANK, SLURM sets SLURM_PROCID: any non-zero value means "not the process that logs".
    """
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True


def log_params_once(params: dict[str, object]) -> None:
    """Log params the active run does not have yet.

    `mlflow run` has already logged the entry point's parameters as the user typed them
    (e.g. "1e-3"); logging them again as Python prints them ("0.001") would be refused.
    """
    import mlflow

    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    fresh = {k: str(v) for k, v in params.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)


def check_tracking_server(timeout: float = 10.0) -> str:
    """Fail at once, with a message that says what to do, when an HTTP tracking server is
    unreachable or refuses our credentials (instead of a retried, minutes-long traceback)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return uri
    import requests

    base = uri.rstrip("/")
    try:
        response = requests.get(base + "/health", timeout=timeout, verify=_tls_verify())
    except requests.RequestException as exc:
        raise UserError(
            f"Cannot reach the MLflow tracking server at {uri} ({type(exc).__name__}). "
            "Start it, or set MLFLOW_TRACKING_URI to a server this machine can reach."
        ) from None
    if response.status_code >= 500:
        raise UserError(
            f"The MLflow tracking server at {uri} answered /health with "
            f"{response.status_code}. Check the server's log."
        )
    check_credentials(base, timeout)
    return uri


def _tls_verify() -> bool | str:
    """The TLS settings MLflow's own client honours, so the check sees what the steps see."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return False
    return os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True


def check_credentials(base: str, timeout: float = 10.0) -> None:
    """One authenticated read, so a server with `--app-name basic-auth` fails us here, clearly.

    Credentials come only from the environment (MLFLOW_TRACKING_USERNAME / _PASSWORD or
    MLFLOW_TRACKING_TOKEN), as MLflow's own client reads them; they are never printed.
    """
    import requests

    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    auth = (user, password or "") if user else None
    try:
        response = requests.post(base + "/api/2.0/mlflow/experiments/search",
                                 json={"max_results": 1}, auth=auth, headers=headers,
                                 timeout=timeout, verify=_tls_verify())
    except requests.RequestException as exc:
        raise UserError(f"The MLflow tracking server at {base} stopped answering "
                        f"({type(exc).__name__}). Check the server's log.") from None
    if response.status_code == 401:
        if not (user or token):
            raise UserError(
                f"The MLflow tracking server at {base} requires credentials. Set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment "
                "(never on the command line or in code)."
            )
        who = f"user {user!r}" if user else "the token in MLFLOW_TRACKING_TOKEN"
        raise UserError(
            f"The MLflow tracking server at {base} refused the credentials of {who}. Check "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (ask the server's admin)."
        )
    if response.status_code == 403:
        raise UserError(
            f"The MLflow tracking server at {base} denied {user or 'this client'!r} access "
            "to experiments. Ask the server's admin for READ or EDIT permission."
        )


def tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def run_step(main, argv: list[str] | None = None) -> None:
    """Run a step's main(); user errors become one clear line on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
