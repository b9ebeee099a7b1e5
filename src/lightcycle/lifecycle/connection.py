"""Talking to the tracking server: bounded client retries and a fail-fast reachability check."""

from __future__ import annotations

import os
import time

from lightcycle.errors import UserError

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


def use_bounded_retries() -> None:
    """Called by every step before MLflow's client makes its first request."""
    for key, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)


# A step started by `mlflow run` (MLFLOW_RUN_ID set) found the server answering moments ago,
# when its run was created: a refused connection now is a restart in progress, so it waits
# this long for the server to come back (a start takes 15-30 s here) before failing.
RESTART_GRACE_SECONDS = 90.0


def check_tracking_server(timeout: float = 10.0) -> str:
    """Fail at once, with a message that says what to do, when an HTTP tracking server is
    unreachable or refuses our credentials (instead of a retried, minutes-long traceback).

    A step whose run already exists on the server rides out a restart first (see
    RESTART_GRACE_SECONDS)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return uri
    import requests

    base = uri.rstrip("/")
    grace = RESTART_GRACE_SECONDS if os.environ.get("MLFLOW_RUN_ID") else 0.0
    deadline, announced = time.monotonic() + grace, False
    while True:
        try:
            response = requests.get(base + "/health", timeout=timeout, verify=_tls_verify())
            break
        except requests.RequestException as exc:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"Cannot reach the MLflow tracking server at {uri} ({type(exc).__name__})"
                    + (f" for {grace:.0f} s" if grace else "") + ". Start it, or set "
                    "MLFLOW_TRACKING_URI to a server this machine can reach."
                ) from None
            if not announced:
                print(f"tracking server at {uri} is not answering; it created this run moments "
                      f"ago, so waiting up to {grace:.0f} s for it to come back", flush=True)
                announced = True
            time.sleep(0.5)
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
