"""A team-style tracking server (`make server`) and the PostgreSQL clusters behind it.

`python -m lightcycle.operations.tracking_server` starts `mlflow server` on PostgreSQL when it is installed (a
persistent cluster under `--dir`), on sqlite otherwise, with artifacts proxied by the server
and optional basic auth. It stops the server and the cluster on Ctrl-C / SIGTERM.

The PostgreSQL cluster itself is operations.postgres.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from lightcycle.errors import UserError
from lightcycle.operations.postgres import PostgresCluster, postgres_unavailable_reason

def mlflow_server_command(backend_uri: str, artifacts: Path, host: str, port: int,
                          workers: int = 1, auth: bool = False) -> list[str]:
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--host", host,
           "--port", str(port), "--workers", str(workers), "--backend-store-uri", backend_uri,
           "--artifacts-destination", str(artifacts)]
    if auth:
        cmd += ["--app-name", "basic-auth"]
    return cmd


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"mlflow server exited with {proc.returncode} before answering "
                            f"{url}/health; its output is above.")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise UserError(f"mlflow server did not answer {url}/health within {timeout:.0f}s.")


# MLflow's credential cache (auth_cache_ttl_seconds): without it every request pays a scrypt
# check of the password, about 120 ms of CPU on a 2-core machine.
AUTH_CACHE_TTL_S = 60


def _secret(path: Path) -> str:
    """A random secret kept in a 0600 file, created on first use."""
    if not path.exists():
        path.touch(0o600)
        path.write_text(secrets.token_urlsafe(24) + "\n")
    path.chmod(0o600)
    return path.read_text().strip()


def _webhook_key(path: Path) -> str:
    """A Fernet key (32 random bytes, url-safe base64) kept in a 0600 file, made on first use."""
    if not path.exists():
        path.touch(0o600)
        path.write_text(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode() + "\n")
    path.chmod(0o600)
    return path.read_text().strip()


def _auth_env(state: Path) -> dict[str, str]:
    password = _secret(state / "admin-password")
    config = state / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{state / 'basic_auth.db'}\n"
        "admin_username = admin\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n"
    )
    config.chmod(0o600)
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": _secret(state / "flask-secret-key")}


def _close(state: Path) -> None:
    """0700 for `state` and the directories under it, 0600 for its files, as left by an
    earlier start under a wider umask. The PostgreSQL cluster keeps its own (initdb's) modes."""
    state.chmod(0o700)
    for root, dirs, files in os.walk(state):
        if Path(root) == state and "postgres" in dirs:
            dirs.remove("postgres")
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700)
        for name in files:
            os.chmod(os.path.join(root, name), 0o600)


def _let_cluster_owner_traverse(state: Path) -> None:
    """As root, the cluster runs as the `postgres` user, who must pass through `state` to
    reach state/postgres: group `postgres` may traverse it (0710), never list or read it."""
    if os.geteuid() != 0:
        return
    import grp

    from lightcycle.operations.postgres import PG_USER

    os.chown(state, 0, grp.getgrnam(PG_USER).gr_gid)
    state.chmod(0o710)


def serve(state: Path, host: str, port: int, backend: str, auth: bool, workers: int,
          pg_port: int = 5433) -> int:
    if auth:
        try:
            import flask_wtf  # noqa: F401  (mlflow's basic-auth app imports it at start)
        except ImportError:
            raise UserError("--auth needs Flask-WTF (mlflow[auth]): "
                            "`pip install -r requirements.txt`.") from None
    state = state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    # Everything this server and MLflow write here is ours alone (the sqlite store, the
    # password hashes in basic_auth.db, secrets, artifacts): files 0600, directories 0700.
    os.umask(0o077)
    _close(state)
    # MLflow's job runner (eight huey processes) runs GenAI jobs lightcycle never submits;
    # MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true in the environment turns it back on.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    cluster = None
    if backend == "auto":
        reason = postgres_unavailable_reason()
        backend = "sqlite" if reason else "postgresql"
        if reason:
            print(f"[server] PostgreSQL unavailable ({reason}); using sqlite", flush=True)
        elif (state / "mlflow.db").exists():
            # An earlier start without PostgreSQL left its runs there; do not hide them silently.
            print(f"[server] note: {state / 'mlflow.db'} (an earlier sqlite store) is not used; "
                  "pass --backend sqlite to serve it", flush=True)
    if backend == "postgresql":
        _let_cluster_owner_traverse(state)
        cluster = PostgresCluster(state / "postgres", pg_port, pgpass=state / "pgpass")
        if cluster.pid() is not None:
            raise UserError(f"The cluster in {cluster.data} is already running (postmaster pid "
                            f"{cluster.pid()}): another `make server` is using {state}.")
        fresh = not cluster.initialized
        if fresh:
            print(f"[server] creating a PostgreSQL cluster in {cluster.data}", flush=True)
            cluster.init()
        cluster.start()
        cluster.create_database("mlflow")
        backend_uri = cluster.uri("mlflow")
        env.update(cluster.env())
    else:
        backend_uri = f"sqlite:///{state / 'mlflow.db'}"
        if workers != 1:
            # sqlite takes one writer at a time; two server processes writing at once get
            # "database is locked" as soon as two runs log together.
            print(f"[server] sqlite store: 1 worker, not {workers} (sqlite has a single "
                  "writer; use PostgreSQL for more)", flush=True)
            workers = 1
    if auth:
        env.update(_auth_env(state))
    # Webhook secrets are stored encrypted; without a key of its own each server process makes
    # a random one, and a webhook made before a restart (or by another worker) can no longer
    # be delivered. One key, kept with the store, outlives both. A key of the user's wins.
    env.setdefault("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", _webhook_key(state / "webhook-secret-key"))
    url_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{url_host}:{port}"
    proc = subprocess.Popen(
        mlflow_server_command(backend_uri, state / "artifacts", host, port, workers, auth),
        env=env, start_new_session=True)
    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        wait_healthy(url, proc)
        print(f"\n[server] MLflow tracking server ready ({backend}: {backend_uri}; "
              f"artifacts: {state / 'artifacts'})", flush=True)
        print(f"export MLFLOW_TRACKING_URI={url}", flush=True)
        if auth:
            print("export MLFLOW_TRACKING_USERNAME=admin  # then create real users\n"
                  f"export MLFLOW_TRACKING_PASSWORD=$(cat {state / 'admin-password'})",
                  flush=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"[server] listening on {host}: mlflow accepts only Host headers it knows "
                  "(--allowed-hosts); put TLS in front before anyone else can reach it "
                  "(docs/operations.md: Production setup)", flush=True)
        print("[server] Ctrl-C stops it", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(proc)
        if cluster is not None:
            cluster.stop()
        print("[server] stopped", flush=True)


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (uvicorn and its workers), SIGKILL after 20 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if server.poll() is not None:
            return
        try:
            os.killpg(server.pid, sig)
            server.wait(20)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(".mlflow-server"),
                        help="state: cluster or sqlite file, artifacts, secrets")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--backend", choices=["auto", "postgresql", "sqlite"], default="auto")
    parser.add_argument("--auth", action="store_true", help="mlflow's basic-auth app")
    parser.add_argument("--workers", type=int, default=2,
                        help="server processes (a sqlite store always runs 1)")
    parser.add_argument("--pg-port", type=int, default=5433,
                        help="PostgreSQL's port on 127.0.0.1 (5433 leaves a system 5432 alone)")
    args = parser.parse_args(argv)
    try:
        return serve(args.dir, args.host, args.port, args.backend, args.auth, args.workers,
                     args.pg_port)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
