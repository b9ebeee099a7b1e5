"""`serve -P follow=true`: serve `models:/<name>@<alias>` and move to each version the alias
comes to name, with no failed request.

How a move happens, with what uvicorn and the kernel already give (no proxy in between):
- this process binds the serving port once and keeps it; every scoring process
  (lightcycle.serving.scoring_worker, MLflow's own scoring app) accepts from that one socket,
  so a connection waiting in its backlog is taken by whichever process accepts next;
- a new version's processes start beside the old ones and are checked on private loopback
  ports: `/ping`, then the version's logged input example must be answered as its logged
  `serving_reference` says. Only then do they accept from the shared socket;
- the old processes then drain: they stop accepting, close each open connection after its
  next answer (`Connection: close`), and exit once none is left.
A version that fails its check never takes traffic: the old one keeps serving, and the
version gets the tag `lightcycle.serving_refused` saying why.

What tells it that the alias moved: an MLflow registry webhook (`model_version_alias.created`, on a tracking
server with a SQL backend that allows the receiver's address), signed with a secret made here,
kept in memory and never printed; and, always, a poll of the alias every `poll_seconds`, which
is all there is where the server sends no webhooks, and which also finds a move made while the
tracking server was unreachable.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from lightcycle.errors import UserError

TAG_REFUSED = "lightcycle.serving_refused"
ALIAS_EVENT = "model_version_alias.created"
SIGNATURE_WINDOW_SECONDS = 300  # what MLflow's docs tell a receiver to accept
START_TIMEOUT_SECONDS = 300  # a version's processes load the model in this, or it is refused
MAX_WEBHOOK_BODY = 64 * 1024


def _say(message: str) -> None:
    print(f"follow: {message}", flush=True)


class Scorer:
    """One scoring process (lightcycle.serving.scoring_worker) and its status pipe."""

    def __init__(self, listener: socket.socket, env: dict[str, str], timeout: int, runtime: str):
        status_read, status_write = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lightcycle.serving.scoring_worker",
             "--listen_fd", str(listener.fileno()), "--status_fd", str(status_write),
             "--timeout", str(timeout), "--runtime", runtime],
            stdin=subprocess.PIPE, text=True, env=env, start_new_session=True,
            pass_fds=(listener.fileno(), status_write))
        os.close(status_write)
        self.lines: queue.Queue[str] = queue.Queue()
        self.standing_by = threading.Event()
        threading.Thread(target=self._read, args=(os.fdopen(status_read),), daemon=True).start()

    def _read(self, status) -> None:
        with status:
            for line in status:
                if line.strip() == "standby":
                    self.standing_by.set()
                else:
                    self.lines.put(line.strip())
        self.lines.put("")  # the process is gone

    def send(self, command: str) -> None:
        try:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def read_status(self, timeout: float) -> str:
        """The next status line after "standby", or '' if the process exited or said nothing
        in time."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, deadline: float) -> None:
        """Drain (see scoring_worker) by `deadline`, else kill."""
        self.send("drain")
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Version:
    """One model version's scoring processes and where its files were downloaded."""

    number: str
    model_dir: Path
    scorers: list[Scorer] = field(default_factory=list)

    def runtime(self) -> str:
        return "onnxruntime" if any(self.model_dir.glob("artifacts/*.onnx")) else "torch"

    def alive(self) -> bool:
        return all(scorer.alive() for scorer in self.scorers)

    def stop(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for scorer in self.scorers:
            scorer.stop(deadline)
        shutil.rmtree(self.model_dir, ignore_errors=True)


def check_answers(port: int, model_dir: Path) -> str | None:
    """Why the server on 127.0.0.1:`port` does not answer as the version's reference says, or
    None when it does."""
    import numpy as np
    import requests

    example = model_dir / "serving_input_example.json"
    reference_file = model_dir / "artifacts" / "serving_reference.json"
    if not example.is_file() or not reference_file.is_file():
        return ("it has no logged input example and serving reference (it was logged before "
                "follow=true existed): log it again with `mlflow run . -e torchscript`")
    base = f"http://127.0.0.1:{port}"
    try:
        ping = requests.get(f"{base}/ping", timeout=30)
        if ping.status_code != 200:
            return f"/ping answered {ping.status_code}"
        answer = requests.post(f"{base}/invocations", data=example.read_bytes(), timeout=60,
                               headers={"Content-Type": "application/json"})
    except requests.RequestException as exc:
        return f"it did not answer: {exc}"
    if answer.status_code != 200:
        return f"its input example was answered {answer.status_code}: {answer.text[:300]}"
    reference = json.loads(reference_file.read_text())
    try:
        rows = answer.json()["predictions"]
        class_ids = [row["class_id"] for row in rows]
        probabilities = np.array([row["probabilities"] for row in rows], dtype=np.float64)
    except (ValueError, KeyError, TypeError) as exc:
        return f"its answer to the input example is not the deployable's ({exc!r}): {answer.text[:300]}"
    expected = np.array(reference["probabilities"], dtype=np.float64)
    if class_ids != reference["class_id"] or probabilities.shape != expected.shape:
        return f"it answered classes {class_ids} where its reference says {reference['class_id']}"
    worst = float(np.abs(probabilities - expected).max())
    if worst > reference["atol"]:
        return (f"its probabilities differ from its reference by up to {worst:.3g} "
                f"(allowed {reference['atol']:g})")
    return None


class WebhookReceiver(ThreadingHTTPServer):
    """Takes MLflow's signed deliveries; a valid alias event for the followed alias wakes the
    follower. Anything unsigned, forged, stale or replayed is answered 401 and changes nothing."""

    daemon_threads = True

    def __init__(self, address, secret: bytes, name: str, alias: str, wake: threading.Event):
        self.secret, self.name, self.alias, self.wake = secret, name, alias, wake
        self.seen = collections.deque(maxlen=1024)
        self.seen_lock = threading.Lock()
        self.rejected = 0
        super().__init__(address, _WebhookHandler)

    def verify(self, headers, body: bytes) -> str | None:
        """Why the delivery is not MLflow's (HMAC-SHA256 over `<id>.<timestamp>.<body>`)."""
        signature = headers.get("X-MLflow-Signature", "")
        delivery, stamp = headers.get("X-MLflow-Delivery-Id", ""), headers.get("X-MLflow-Timestamp", "")
        if not signature.startswith("v1,") or not delivery or not stamp.isdigit():
            return "unsigned"
        signed = f"{delivery}.{stamp}.".encode() + body
        expected = base64.b64encode(hmac.new(self.secret, signed, hashlib.sha256).digest()).decode()
        if not hmac.compare_digest(signature[3:], expected):
            return "bad signature"
        if abs(time.time() - int(stamp)) > SIGNATURE_WINDOW_SECONDS:
            return "stale timestamp"
        with self.seen_lock:
            if delivery in self.seen:
                return "replayed delivery"
            self.seen.append(delivery)
        return None


class _WebhookHandler(BaseHTTPRequestHandler):
    server: WebhookReceiver

    def do_POST(self):  # noqa: N802 (http.server's name)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_WEBHOOK_BODY:
            return self._answer(413)
        body = self.rfile.read(length)
        if self.server.verify(self.headers, body):
            self.server.rejected += 1
            return self._answer(401)
        try:
            event = json.loads(body)
            data = event.get("data") or {}
            ours = (f"{event.get('entity')}.{event.get('action')}" == ALIAS_EVENT
                    and data.get("name") == self.server.name and data.get("alias") == self.server.alias)
        except (ValueError, AttributeError):
            return self._answer(400)
        if ours:
            self.server.wake.set()
        self._answer(200)

    def _answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args):  # deliveries are not news; a refusal is counted
        pass


class Follower:
    """Serves one alias on (host, port) until SIGTERM or Ctrl-C: see this module's docstring."""

    def __init__(self, model_uri: str, host: str, port: int, workers: int, poll_seconds: int,
                 webhook_port: int, webhook_url: str = "auto", timeout: int = 60):
        from lightcycle.lifecycle import registry

        named = registry.alias_of(model_uri)
        if not named:
            raise UserError(
                f"follow=true follows an alias, and {model_uri!r} names none: give "
                "models:/<name>@<alias> (for example models:/lightcycle-fashion-scripted@champion), "
                "or serve a fixed version with follow=false.")
        if workers < 1:
            raise UserError(f"workers={workers}: give at least 1 scoring process.")
        if webhook_url != "auto" and not webhook_url.startswith(("http://", "https://")):
            raise UserError(f"webhook_url={webhook_url!r}: give the http(s) URL at which the "
                            "tracking server reaches this machine's webhook_port, or auto.")
        if poll_seconds < 1:
            raise UserError(f"poll_seconds={poll_seconds}: give a whole number of seconds, at least 1.")
        self.model_uri, (self.name, self.alias) = model_uri, named
        self.host, self.port, self.workers, self.timeout = host, port, workers, timeout
        self.poll_seconds, self.webhook_port = poll_seconds, webhook_port
        self.advertised_url = webhook_url
        self.wake, self.stopping = threading.Event(), False
        self.refused: set[str] = set()
        self.spares: list[Scorer] = []
        self.downloads = Path(tempfile.mkdtemp(prefix="lightcycle-follow-"))
        self.webhook_id: str | None = None
        self.receiver: WebhookReceiver | None = None
        self.unreachable_since: float | None = None

    # -- the registry ---------------------------------------------------------------------
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient()

    def alias_version(self) -> str | None:
        """The version the alias names now, or None while the tracking server cannot say."""
        from mlflow.exceptions import MlflowException
        from requests import RequestException

        try:
            version = self.client().get_model_version_by_alias(self.name, self.alias).version
        except (MlflowException, RequestException, OSError) as exc:
            if self.unreachable_since is None:
                self.unreachable_since = time.monotonic()
                _say(f"cannot read {self.model_uri} ({str(exc).splitlines()[0][:200]}); the "
                     f"version serving goes on, asking again every {self.poll_seconds} s")
            return None
        if self.unreachable_since is not None:
            _say(f"the tracking server answers again after "
                 f"{time.monotonic() - self.unreachable_since:.0f} s")
            self.unreachable_since = None
        return str(version)

    def refuse(self, number: str, reason: str) -> None:
        self.refused.add(number)
        _say(f"version {number} refused: {reason}")
        try:
            self.client().set_model_version_tag(self.name, number, TAG_REFUSED, reason[:5000])
        except Exception as exc:  # the refusal stands; only its record is missing
            _say(f"could not tag version {number} {TAG_REFUSED}: {exc}")

    # -- scoring processes ----------------------------------------------------------------
    def standby(self, listener: socket.socket, runtime: str, announce: bool = True) -> None:
        """Start the processes the next version will load into, their imports done meanwhile."""
        from lightcycle.serving import scoring_server

        env = scoring_server.server_environment(self.workers, self.worker_environment)
        self.spares = [spare for spare in self.spares if spare.alive()]
        if len(self.spares) >= self.workers:
            return
        while len(self.spares) < self.workers:
            self.spares.append(Scorer(listener, env, self.timeout, runtime))
        spares = list(self.spares)

        def announce_ready():
            began = time.monotonic()
            if all(spare.standing_by.wait(START_TIMEOUT_SECONDS) for spare in spares):
                _say(f"{len(spares)} spare process(es) ready for the next version "
                     f"(imports done in {time.monotonic() - began:.1f} s)")

        if announce:
            threading.Thread(target=announce_ready, daemon=True).start()

    def start(self, number: str, listener: socket.socket) -> Version | str:
        """Version `number` downloaded, started and checked, not yet serving; or why not."""
        import mlflow

        began = time.monotonic()
        model_dir = self.downloads / f"v{number}"
        _say(f"starting version {number} of {self.name} ({self.workers} process(es))")
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{self.name}/{number}",
                                                dst_path=str(model_dir))
        except Exception as exc:
            return f"its files could not be downloaded: {exc}"
        version = Version(number, model_dir)
        self.standby(listener, version.runtime(), announce=False)
        version.scorers, self.spares = self.spares[:self.workers], self.spares[self.workers:]
        for scorer in version.scorers:
            scorer.send(f"load {number} {model_dir}")
        for scorer in version.scorers:
            line = scorer.read_status(START_TIMEOUT_SECONDS)
            if not line.startswith("checking "):
                reason = (f"its scoring process did not start within {START_TIMEOUT_SECONDS} s"
                          if scorer.alive() else "its scoring process exited while loading the "
                          "model (its error is printed above)")
                version.stop(timeout=10)
                return reason
            reason = check_answers(int(line.split()[1]), model_dir)
            if reason:
                version.stop(timeout=10)
                return reason
        _say(f"version {number} loaded and checked in {time.monotonic() - began:.1f} s")
        return version

    def take_traffic(self, version: Version) -> None:
        for scorer in version.scorers:
            scorer.send("serve")
        for scorer in version.scorers:
            if scorer.read_status(30) != "serving":
                raise UserError(f"version {version.number}'s scoring process stopped as it was "
                                "about to serve; its error is printed above.")

    # -- webhooks ---------------------------------------------------------------------------
    def webhook_url(self) -> str:
        """Where the tracking server sends deliveries: webhook_url, else this host's address
        (its name when serving on every interface) and webhook_port."""
        if self.advertised_url != "auto":
            return self.advertised_url
        host = self.host if self.host not in ("0.0.0.0", "::", "") else socket.getfqdn()
        return f"http://{host}:{self.receiver.server_address[1]}/"

    def open_webhook(self) -> None:
        """Receive webhooks where the tracking server will send them; else say why not."""
        if self.webhook_port == 0:
            _say(f"webhooks off (webhook_port=0): polling {self.model_uri} every {self.poll_seconds} s")
            return
        secret = secrets.token_urlsafe(32)
        try:
            self.receiver = WebhookReceiver((self.host, self.webhook_port), secret.encode(),
                                            self.name, self.alias, self.wake)
        except OSError as exc:
            raise UserError(f"cannot receive webhooks on {self.host}:{self.webhook_port} ({exc}): "
                            "choose a free port with -P webhook_port=<port>, or 0 to only poll.") from None
        threading.Thread(target=self.receiver.serve_forever, daemon=True).start()
        url = self.webhook_url()
        client = self.client()
        try:
            for stale in client.list_webhooks():
                if stale.url == url:  # left by a follower that was killed before it could clean up
                    client.delete_webhook(stale.webhook_id)
        except Exception:
            pass
        try:
            webhook = client.create_webhook(
                name=f"lightcycle-follow-{self.name}-{self.alias}", url=url,
                events=[ALIAS_EVENT], secret=secret,
                description=f"serve -P follow=true of {self.model_uri} at {self.host}:{self.port}")
        except Exception as exc:
            _say(f"the tracking server takes no webhook for {url} "
                 f"({str(exc).splitlines()[0][:300]}); polling {self.model_uri} every "
                 f"{self.poll_seconds} s. Webhooks need a SQL backend store, and for an http or "
                 "private address MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https and "
                 "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true on the server (docs/serving.md).")
            self.receiver.shutdown()
            self.receiver.server_close()
            self.receiver = None
            return
        self.webhook_id = webhook.webhook_id
        _say(f"webhook {self.webhook_id} sends {ALIAS_EVENT} to {url}; polling every "
             f"{self.poll_seconds} s as well")

    def close_webhook(self) -> None:
        if self.webhook_id:
            try:
                self.client().delete_webhook(self.webhook_id)
                _say(f"webhook {self.webhook_id} deleted")
            except Exception as exc:
                _say(f"could not delete webhook {self.webhook_id} ({exc}); delete it with "
                     f"MlflowClient().delete_webhook({self.webhook_id!r})")
        if self.receiver:
            self.receiver.shutdown()
            self.receiver.server_close()

    # -- the loop ---------------------------------------------------------------------------
    def stop(self, *_):
        self.stopping = True
        self.wake.set()

    def run(self) -> None:
        # The follower's own requests must fail fast while the tracking server is away: the
        # step's bounded retries (lifecycle/connection.py) would still hold a poll for about
        # two minutes, and the next poll is the retry. The scoring processes keep the settings.
        self.worker_environment = dict(os.environ)
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
        try:
            listener = socket.create_server((self.host, self.port), backlog=1024)
        except OSError as exc:
            raise UserError(f"cannot serve on {self.host}:{self.port} ({exc}): stop what holds "
                            "it, or choose another port with -P port=<port>.") from None
        from lightcycle.lifecycle import registry

        try:
            number = str(registry.resolve(self.model_uri).version)  # its errors say what to do
        except BaseException:
            listener.close()
            raise
        started = self.start(number, listener)
        if isinstance(started, str):
            listener.close()
            shutil.rmtree(self.downloads, ignore_errors=True)
            raise UserError(f"version {number} of {self.name} cannot serve: {started}")
        current = started
        self.take_traffic(current)
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        _say(f"version {number} serves {self.model_uri} on http://{self.host}:{self.port}/invocations")
        try:
            self.standby(listener, current.runtime())
            self.open_webhook()
            while not self.stopping:
                woken = self.wake.wait(self.poll_seconds)
                self.wake.clear()
                if self.stopping:
                    break
                if not current.alive():
                    raise UserError(f"a scoring process of version {current.number} exited "
                                    "(its error is printed above); restart serve.")
                number = self.alias_version()
                if number is None or number == current.number or number in self.refused:
                    continue
                _say(f"{self.model_uri} moved from version {current.number} to {number} "
                     f"(seen by {'webhook' if woken else 'poll'})")
                started = self.start(number, listener)
                if isinstance(started, str):
                    self.refuse(number, started)
                    _say(f"version {current.number} keeps serving")
                    self.standby(listener, current.runtime())
                    continue
                self.take_traffic(started)
                old, current = current, started
                _say(f"version {number} passed its check and takes the traffic; version "
                     f"{old.number} drains")
                old.stop(timeout=self.timeout + 10)
                _say(f"version {old.number} stopped")
                self.standby(listener, current.runtime())
        finally:
            self.close_webhook()
            current.stop(timeout=self.timeout + 10)
            deadline = time.monotonic() + 10
            for spare in self.spares:
                spare.stop(deadline)
            listener.close()
            shutil.rmtree(self.downloads, ignore_errors=True)
            _say("stopped")


def main(argv: list[str] | None = None) -> None:
    """`python -m lightcycle.serving.follow`: what the serving image runs with FOLLOW=1
    (`mlflow run . -e serve -P follow=true` is the same Follower)."""
    import argparse

    from lightcycle import defaults

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_uri", required=True)
    for key in ("host", "port", "workers", "poll_seconds", "webhook_port", "webhook_url"):
        default = defaults.SERVE[key]
        parser.add_argument(f"--{key}", default=default, type=type(default))
    args = parser.parse_args(argv)
    try:
        Follower(args.model_uri, args.host, args.port, args.workers, args.poll_seconds,
                 args.webhook_port, webhook_url=args.webhook_url).run()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
