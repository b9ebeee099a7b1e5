"""An `authorization_function` for `mlflow server --app-name basic-auth` that also accepts a
bearer token (what MLflow's client sends for MLFLOW_TRACKING_TOKEN), as a team's token gateway
in front of MLflow would. The token and its user come from the server's environment:
LIGHTCYCLE_TEST_BEARER="<user>:<token>". Everything else goes to MLflow's basic auth.
"""

from __future__ import annotations

import hmac
import os

from flask import request
from mlflow.server.auth import authenticate_request_basic_auth, make_basic_auth_response
from werkzeug.datastructures import Authorization


def authenticate() -> Authorization:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return authenticate_request_basic_auth()
    user, _, token = os.environ["LIGHTCYCLE_TEST_BEARER"].partition(":")
    if token and hmac.compare_digest(header.removeprefix("Bearer "), token):
        return Authorization("bearer", {"username": user})
    return make_basic_auth_response()
