"""A private PostgreSQL cluster run as the `postgres` user: the team server's store, and the tests'."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

from lightcycle.errors import UserError

PG_PACKAGE = "postgresql-15"
PG_USER = "postgres"  # the OS user that owns the cluster when we run as root


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

    def role_password(self, name: str) -> str | None:
        """The password pgpass holds for role `name` on its own database, or None."""
        prefix = f"127.0.0.1:*:{name}:{name}:"
        for line in self.pgpass.read_text().splitlines():
            if line.startswith(prefix):
                return line.removeprefix(prefix)
        return None

    def create_database(self, name: str) -> None:
        """A role and a database, both called `name`. The role has a password of its own,
        generated here and kept in pgpass only: the application never holds the superuser's.
        A role from an older version that shared the superuser's password gets its own now."""
        password = self.role_password(name)
        fresh = password is None or password == self.password()
        if fresh:
            password = secrets.token_urlsafe(24)
        conn = self.connect()
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE ROLE "{name}" LOGIN PASSWORD %s', (password,))
                elif fresh:
                    cur.execute(f'ALTER ROLE "{name}" PASSWORD %s', (password,))
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}" OWNER "{name}"')
        finally:
            conn.close()
        if fresh:
            prefix = f"127.0.0.1:*:{name}:{name}:"
            lines = [line for line in self.pgpass.read_text().splitlines()
                     if not line.startswith(prefix)]
            self.pgpass.write_text("".join(f"{line}\n" for line in [*lines, prefix + password]))
            self.pgpass.chmod(0o600)

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
