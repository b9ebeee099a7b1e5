"""A team-style tracking server (`make server`) and the PostgreSQL clusters behind it.

`python -m lightcycle.server` starts `mlflow server` on PostgreSQL when it is installed (a
persistent cluster under `--dir`), on sqlite otherwise, with artifacts proxied by the server
and optional basic auth. It stops the server and the cluster on Ctrl-C / SIGTERM.

`PostgresCluster` is also what the tests use for their throw-away clusters.
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from lightcycle.errors import UserError

PG_PACKAGE = "postgresql-15"
PG_USER = "postgres"  # the OS user that owns the cluster when we run as root


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def postgres_bin_dir() -> Path | None:
    """The directory holding initdb/pg_ctl: Debian keeps them off PATH, in a versioned dir."""
    try:
        listing = subprocess.run(["dpkg", "-L", PG_PACKAGE], capture_output=True, text=True)
    except FileNotFoundError:
        listing = None
    if listing is not None and listing.returncode == 0:
        for line in listing.stdout.splitlines():
            if line.endswith("/bin/initdb") and Path(line).is_file():
                return Path(line).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def postgres_unavailable_reason() -> str | None:
    """Why a PostgreSQL cluster cannot be started here, or None when it can."""
    if postgres_bin_dir() is None:
        return (f"PostgreSQL is not installed ({PG_PACKAGE}: no initdb found); "
                f"install it with `apt-get install -y {PG_PACKAGE}`")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "the psycopg2 driver is not installed: `pip install -r requirements.txt`"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root and there is no '{PG_USER}' user to own the cluster"
        if shutil.which("runuser") is None:
            return "running as root and `runuser` is missing"
    return None


class PostgresCluster:
    """One PostgreSQL cluster in `root`: data in root/data, socket and log in root.

    initdb and postgres refuse to run as root, so as root every command runs as the
    `postgres` user, who must own `root`. Connections: TCP on 127.0.0.1 only, password
    (scram) auth; the password lives in a 0600 pgpass file outside the cluster's reach, so it
    never appears in a URI, a command line or a log.
    """

    def __init__(self, root: Path, port: int, bin_dir: Path | None = None,
                 pgpass: Path | None = None, settings: dict[str, str] | None = None) -> None:
        reason = postgres_unavailable_reason()
        if reason:
            raise UserError(f"Cannot start PostgreSQL: {reason}.")
        self.root = Path(root).resolve()
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = port
        self.bin = bin_dir or postgres_bin_dir()
        self.pgpass = Path(pgpass or self.root.parent / (self.root.name + ".pgpass")).resolve()
        self.settings = {"listen_addresses": "127.0.0.1", "port": str(port),
                         "unix_socket_directories": str(self.root), **(settings or {})}

    # -- running the cluster's own tools as its owner -----------------------------------
    def _as_owner(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else cmd

    def _run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = self._as_owner([str(self.bin / tool), *args])
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                cwd=self.root)
        if result.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise UserError(f"{tool} {' '.join(args[:2])} failed ({result.returncode}):\n"
                            f"{result.stdout}{result.stderr}{tail}")
        return result

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            user = pwd.getpwnam(PG_USER)
            os.chown(path, user.pw_uid, user.pw_gid)

    @property
    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def password(self) -> str:
        return self.pgpass.read_text().splitlines()[0].rsplit(":", 1)[-1]

    def init(self) -> None:
        """initdb with a fresh random superuser password (written to the pgpass file only)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self._own(self.root)
        if os.geteuid() == 0:
            probe = subprocess.run(self._as_owner(["test", "-w", str(self.root)]))
            if probe.returncode != 0:
                raise UserError(f"The '{PG_USER}' user cannot write {self.root} (a parent "
                                "directory is closed to it); choose a directory it can reach.")
        password = secrets.token_urlsafe(24)
        pwfile = self.root / "initdb.pw"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        self._own(pwfile)
        try:
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile),
                      "--auth-host=scram-sha-256", "--auth-local=scram-sha-256",
                      "-E", "UTF8", "--no-locale", "--no-instructions")
        finally:
            pwfile.unlink(missing_ok=True)
        self.pgpass.parent.mkdir(parents=True, exist_ok=True)
        self.pgpass.touch(0o600)
        self.pgpass.write_text(f"127.0.0.1:*:*:postgres:{password}\n")
        self.pgpass.chmod(0o600)

    def start(self, timeout: float = 60) -> None:
        options = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", str(int(timeout)), "-o", options, timeout=timeout + 30)

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Stop the postmaster (pg_ctl: it signals the postmaster's pid and waits for it)."""
        pid = self.pid()
        if pid is None:
            return
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w",
                  "-t", str(int(timeout)), timeout=timeout + 30)
        # pg_ctl returns once postmaster.pid is gone, a moment before the process itself.
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def pid(self) -> int | None:
        """The running postmaster's process id, or None."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
            return None
        return pid

    def kill(self) -> None:
        """Last resort by process id: SIGQUIT is PostgreSQL's immediate shutdown."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)

    def connect(self, dbname: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                password=self.password(), dbname=dbname, connect_timeout=10)

    def create_database(self, name: str) -> None:
        """A role and a database, both called `name`; the role shares the pgpass password."""
        conn = self.connect()
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE ROLE "{name}" LOGIN PASSWORD %s', (self.password(),))
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}" OWNER "{name}"')
        finally:
            conn.close()
        line = f"127.0.0.1:*:{name}:{name}:{self.password()}"
        if line not in self.pgpass.read_text().splitlines():
            with self.pgpass.open("a") as out:
                out.write(line + "\n")

    def uri(self, dbname: str) -> str:
        """SQLAlchemy URI without the password: libpq reads it from PGPASSFILE (env()).

        The driver is named because SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3.
        """
        return f"postgresql+psycopg2://{dbname}@127.0.0.1:{self.port}/{dbname}"

    def env(self) -> dict[str, str]:
        return {"PGPASSFILE": str(self.pgpass)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours still answers kill(0): look at its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


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


def _secret(path: Path) -> str:
    """A random secret kept in a 0600 file, created on first use."""
    if not path.exists():
        path.touch(0o600)
        path.write_text(secrets.token_urlsafe(24) + "\n")
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
    )
    config.chmod(0o600)
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": _secret(state / "flask-secret-key")}


def serve(state: Path, host: str, port: int, backend: str, auth: bool, workers: int) -> int:
    if auth:
        try:
            import flask_wtf  # noqa: F401  (mlflow's basic-auth app imports it at start)
        except ImportError:
            raise UserError("--auth needs Flask-WTF (mlflow[auth]): "
                            "`pip install -r requirements.txt`.") from None
    state = state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o755)  # the postgres user must traverse it to reach its cluster
    env = dict(os.environ)
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
        cluster = PostgresCluster(state / "postgres", free_port(), pgpass=state / "pgpass")
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
    if auth:
        env.update(_auth_env(state))
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
                  "(README: Running for a team)", flush=True)
        print("[server] Ctrl-C stops it", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_process_group(proc, timeout=20)
        if cluster is not None:
            cluster.stop()
        print("[server] stopped", flush=True)


def stop_process_group(proc: subprocess.Popen, timeout: float = 15) -> None:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(".mlflow-server"),
                        help="state: cluster or sqlite file, artifacts, secrets")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--backend", choices=["auto", "postgresql", "sqlite"], default="auto")
    parser.add_argument("--auth", action="store_true", help="mlflow's basic-auth app")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        return serve(args.dir, args.host, args.port, args.backend, args.auth, args.workers)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
