"""A basic-auth tracking server as a team runs it (issue 22): credentials resolved the ways
MLflow resolves them (here: only ~/.mlflow/credentials), and breaking another user's stale
promotion lock with EDIT, or a message naming the permission."""

from __future__ import annotations

import os
import secrets
import subprocess

import pytest
from mlflow import MlflowClient

from conftest import PROJECT_ROOT, runs_of, start_tracking_server, stop_process
from lightcycle.errors import UserError
from lightcycle.lifecycle import connection, promotion_lock
from lightcycle.operations.tracking_server import AUTH_CACHE_TTL_S

pytestmark = pytest.mark.slow
ENV_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    root = tmp_path_factory.mktemp("team-auth")
    admin_password = secrets.token_urlsafe(18)
    settings = {"default_permission": "READ", "admin_username": "admin",
                "database_uri": f"sqlite:///{root / 'basic_auth.db'}",
                "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
                "auth_cache_ttl_seconds": AUTH_CACHE_TTL_S}  # as `make server AUTH=1`
    (root / "auth.ini").write_text("[mlflow]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    server = start_tracking_server(root, extra_args=["--app-name", "basic-auth"], env={
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
    yield {"url": server.url, "root": root, "admin": admin_password}
    stop_process(server.proc)


def home_with_credentials(home, user: str, password: str) -> dict[str, str]:
    """An environment whose only credential is `home`/.mlflow/credentials."""
    (home / ".mlflow").mkdir(parents=True, exist_ok=True)
    (home / ".mlflow" / "credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = {user}\nmlflow_tracking_password = {password}\n")
    env = {k: v for k, v in os.environ.items() if k not in ENV_CREDENTIALS}
    return {**env, "HOME": str(home)}


def as_user(monkeypatch, tmp_path, team, user: str, password: str) -> MlflowClient:
    env = home_with_credentials(tmp_path / f"home-{user}", user, password)
    for key in ENV_CREDENTIALS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", env["HOME"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team["url"])
    return MlflowClient(team["url"])


def test_train_authenticates_with_only_a_credentials_file(team, tmp_path, monkeypatch):
    env = home_with_credentials(tmp_path / "home", "admin", team["admin"])
    env["MLFLOW_TRACKING_URI"] = team["url"]
    client = as_user(monkeypatch, tmp_path, team, "admin", team["admin"])
    experiment = client.create_experiment("credentials-file")
    connection.check_tracking_server()  # in this process too, from the file alone
    result = subprocess.run(["mlflow", "run", str(PROJECT_ROOT), "-e", "train", "--env-manager",
                             "local", "--experiment-id", experiment, "-P", "epochs=1"],
                            capture_output=True, text=True, timeout=900, env=env, cwd=PROJECT_ROOT)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "requires credentials" not in out and team["admin"] not in out
    assert [r.info.status for r in runs_of(experiment, "train")] == ["FINISHED"]

    wrong = home_with_credentials(tmp_path / "wrong", "admin", "not-the-password")
    monkeypatch.setenv("HOME", wrong["HOME"])
    with pytest.raises(UserError, match="refused the credentials of user 'admin'.*credentials"):
        connection.check_tracking_server()


def test_stale_lock_of_another_user_is_broken_with_edit_or_names_the_permission(
        team, tmp_path, monkeypatch):
    from mlflow.server import get_app_client

    admin = as_user(monkeypatch, tmp_path, team, "admin", team["admin"])
    users = get_app_client("basic-auth", tracking_uri=team["url"])
    passwords = {name: secrets.token_urlsafe(12) for name in ("alice", "bob")}
    for name, password in passwords.items():
        users.create_user(name, password)
    experiment = admin.create_experiment("locks")
    ended = admin.create_run(experiment).info.run_id
    admin.set_terminated(ended, "FAILED")  # alice's promote died holding the lock
    bobs_run = admin.create_run(experiment).info.run_id
    model = f"locked-{secrets.token_hex(3)}"
    lock = model + promotion_lock.LOCK_SUFFIX

    alice = as_user(monkeypatch, tmp_path, team, "alice", passwords["alice"])
    alice.create_registered_model(lock, tags={promotion_lock.TAG_LOCK_OWNER: "alice-dead",
                                              promotion_lock.TAG_LOCK_RUN: ended})
    bob = as_user(monkeypatch, tmp_path, team, "bob", passwords["bob"])
    with pytest.raises(UserError, match=f"needs EDIT permission on registered model {lock}"):
        with promotion_lock.promotion_lock(bob, model, bobs_run, timeout=30, poll=0.1):
            pytest.fail("bob took a lock he may not break")
    assert alice.get_registered_model(lock).tags[promotion_lock.TAG_LOCK_OWNER] == "alice-dead"

    monkeypatch.setenv("HOME", str(tmp_path / "home-admin"))  # the admin client's file
    users.grant_user_permission("bob", "registered_model", lock, "EDIT")
    bob = as_user(monkeypatch, tmp_path, team, "bob", passwords["bob"])
    with promotion_lock.promotion_lock(bob, model, bobs_run, timeout=30, poll=0.1) as lease:
        lease.check()  # bob holds it now
    # bob may not delete alice's lock model: he left it free, and the next holder takes it.
    assert bob.get_registered_model(lock).tags[promotion_lock.TAG_LOCK_OWNER] == promotion_lock.FREE
    alice = as_user(monkeypatch, tmp_path, team, "alice", passwords["alice"])
    with promotion_lock.promotion_lock(alice, model, bobs_run, timeout=30, poll=0.1) as lease:
        lease.check()
    assert not alice.search_registered_models(f"name LIKE '{model}--%'")
