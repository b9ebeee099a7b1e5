"""Talking to the tracking server: bounded client retries and a fail-fast reachability check."""

from __future__ import annotations

import os
import time

from lightcycle.errors import UserError
from lightcycle.lifecycle import tracking

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

    Requests go through MLflow's own client (mlflow.utils.rest_utils.http_request with the
    credentials of mlflow.utils.credentials.get_default_host_creds), so this check sees what
    every later request of the step sees: MLFLOW_TRACKING_USERNAME/_PASSWORD or
    ~/.mlflow/credentials, MLFLOW_TRACKING_TOKEN, client certificates, the CA bundle, the
    insecure-TLS flag, MLFLOW_TRACKING_AUTH plugins and SigV4.

    A step whose run already exists on the server rides out a restart first (see
    RESTART_GRACE_SECONDS)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return uri
    shown = tracking.redact_url(uri)
    creds = host_creds(uri)
    grace = RESTART_GRACE_SECONDS if os.environ.get("MLFLOW_RUN_ID") else 0.0
    deadline, announced = time.monotonic() + grace, False
    while True:
        try:
            response = _request(creds, "/health", "GET", timeout)
            break
        except MlflowException as exc:
            if time.monotonic() >= deadline:
                cause = type(exc.__cause__ or exc.__context__ or exc).__name__
                raise UserError(
                    f"Cannot reach the MLflow tracking server at {shown} ({cause})"
                    + (f" for {grace:.0f} s" if grace else "") + ". Start it, or set "
                    "MLFLOW_TRACKING_URI to a server this machine can reach."
                ) from None
            if not announced:
                print(f"tracking server at {shown} is not answering; it created this run "
                      f"moments ago, so waiting up to {grace:.0f} s for it to come back",
                      flush=True)
                announced = True
            time.sleep(0.5)
    if response.status_code >= 500:
        raise UserError(
            f"The MLflow tracking server at {shown} answered /health with "
            f"{response.status_code}. Check the server's log."
        )
    check_credentials(uri, timeout, creds)
    return uri


def host_creds(uri: str):
    """The credentials and TLS settings MLflow's own client uses for `uri`."""
    from mlflow.utils.credentials import get_default_host_creds

    return get_default_host_creds(uri)


def _request(creds, endpoint: str, method: str, timeout: float, **kwargs):
    from mlflow.utils.rest_utils import http_request

    # No retries: the caller decides how long to wait, and says why it failed.
    return http_request(creds, endpoint, method, max_retries=0, timeout=timeout,
                        raise_on_status=False, **kwargs)


CREDENTIALS_HELP = (
    "Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment, or put "
    "mlflow_tracking_username and mlflow_tracking_password under [mlflow] in "
    "~/.mlflow/credentials (or use MLFLOW_TRACKING_TOKEN), never on the command line or in code"
)


def check_credentials(uri: str, timeout: float = 10.0, creds=None) -> None:
    """One authenticated read, so a server with `--app-name basic-auth` fails us here, clearly.
    Credentials are resolved by MLflow (see check_tracking_server); they are never printed."""
    from mlflow.exceptions import MlflowException

    creds = creds or host_creds(uri)
    shown = tracking.redact_url(uri)
    try:
        response = _request(creds, "/api/2.0/mlflow/experiments/search", "POST", timeout,
                            json={"max_results": 1})
    except MlflowException as exc:
        cause = type(exc.__cause__ or exc.__context__ or exc).__name__
        raise UserError(f"The MLflow tracking server at {shown} stopped answering "
                        f"({cause}). Check the server's log.") from None
    if response.status_code == 401:
        if not (creds.username or creds.token or creds.auth or creds.aws_sigv4
                or creds.client_cert_path):
            raise UserError(f"The MLflow tracking server at {shown} requires credentials. "
                            f"{CREDENTIALS_HELP}.")
        who = (f"user {creds.username!r}" if creds.username else
               "the token in MLFLOW_TRACKING_TOKEN" if creds.token else "this client")
        raise UserError(
            f"The MLflow tracking server at {shown} refused the credentials of {who}. Check "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or ~/.mlflow/credentials "
            "(ask the server's admin)."
        )
    if response.status_code == 403:
        raise UserError(
            f"The MLflow tracking server at {shown} denied {creds.username or 'this client'!r} "
            "access to experiments. Ask the server's admin for READ or EDIT permission."
        )


def tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()
