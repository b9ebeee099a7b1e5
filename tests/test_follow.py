"""`serve -P follow=true` (issue 34) on real tracking servers, sqlite and PostgreSQL, that send
registry webhooks to loopback, with real scoring processes and 8 keep-alive clients.

Each backend gets its own `mlflow server` (it is restarted in one test) and one registered
deployable in three versions: 1 and 2 are the same untrained `cnn`, 3 is "broken" (its
reference disagrees with what it answers). One follower, started with `mlflow run . -e serve`
as a user types it, serves all the tests of a backend in order; its log is what it printed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import shlex
import subprocess
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet

from conftest import (BACKENDS, PROJECT_ROOT, free_port, start_tracking_server, stop_process,
                      wait_for_http)

WEBHOOKS_ON = {
    # An http receiver on loopback: MLflow refuses both by default.
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    # The server caches its list of webhooks (60 s by default): a new one is missed meanwhile.
    "MLFLOW_WEBHOOK_CACHE_TTL": "1",
    # One key across restarts, or the webhook's stored secret cannot be read after one.
    "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
}
DOCUMENTED = "mlflow run . -e serve --env-manager local -P follow=true"
NAME = "follow-fashion"
POLL_SECONDS = 5
VERSION_HEADER = "x-lightcycle-model-version"


def _deployable(tmp: Path, broken: bool = False) -> Path:
    import mlflow.pyfunc
    import torch

    from lightcycle.lifecycle import export
    from lightcycle.model.nets import build_net

    torch.manual_seed(0)
    tmp.mkdir()
    archive = tmp / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        export.save_archive(torch.jit.freeze(torch.jit.script(build_net("cnn").eval())), archive)
    kwargs = export.deployable_model_kwargs(str(archive), "torchscript")
    if broken:  # what it answers is no longer what its reference says
        reference = Path(kwargs["artifacts"][export.SERVING_REFERENCE])
        logged = json.loads(reference.read_text())
        logged["class_id"] = [(c + 1) % 10 for c in logged["class_id"]]
        reference.write_text(json.dumps(logged))
    mlflow.pyfunc.save_model(str(tmp / "model"), **kwargs)
    return tmp / "model"


class Registry:
    """The backend's server, its store's URI (to move an alias while the server is down) and
    an MlflowClient of its own (this process's global tracking URI is left alone)."""

    def __init__(self, server, store_uri: str, env: dict[str, str]):
        from mlflow import MlflowClient

        self.server, self.store_uri, self.env = server, store_uri, env
        self.client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)

    def move(self, alias: str, version: str) -> float:
        """Move the alias through the REST API the UI uses; the time it was moved."""
        response = requests.post(f"{self.server.url}/api/2.0/mlflow/registered-models/alias",
                                 json={"name": NAME, "alias": alias, "version": version}, timeout=30)
        response.raise_for_status()
        return time.monotonic()

    def restart(self) -> None:
        stop_process(self.server.proc)
        port = int(self.server.url.rsplit(":", 1)[1])
        self.server = start_tracking_server(self.server.root, backend_uri=self.store_uri, port=port,
                                            env=self.env)


# ---------------------------------------------------------------- fast: no server


def test_the_documented_command_is_the_one_these_tests_run():
    assert DOCUMENTED in (PROJECT_ROOT / "docs" / "serving.md").read_text()


def _signed(secret: str, body: str, stamp: int | None = None, delivery: str | None = None):
    """Headers as MLflow's delivery code signs them (mlflow.webhooks.delivery)."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    delivery, stamp = delivery or str(uuid.uuid4()), str(stamp or int(time.time()))
    return {"X-MLflow-Signature": _generate_hmac_signature(secret, delivery, stamp, body),
            "X-MLflow-Timestamp": stamp, "X-MLflow-Delivery-Id": delivery}


def test_the_receiver_takes_mlflows_signature_and_refuses_everything_else():
    from lightcycle.serving.follow import WebhookReceiver

    receiver = WebhookReceiver(("127.0.0.1", 0), b"s3cret", NAME, "champion", threading.Event())
    try:
        body = '{"entity": "model_version_alias", "action": "created"}'
        headers = _signed("s3cret", body)
        assert receiver.verify(headers, body.encode()) is None
        assert receiver.verify(headers, body.encode()) == "replayed delivery"
        assert receiver.verify({}, body.encode()) == "unsigned"
        assert receiver.verify(_signed("guess", body), body.encode()) == "bad signature"
        assert receiver.verify(_signed("s3cret", body), body.encode() + b" ") == "bad signature"
        stale = _signed("s3cret", body, stamp=int(time.time()) - 301)
        assert receiver.verify(stale, body.encode()) == "stale timestamp"
    finally:
        receiver.server_close()


@pytest.mark.parametrize("kwargs, needle", [
    ({"model_uri": "models:/m/3"}, "names none"),
    ({"poll_seconds": 0}, "poll_seconds=0"),
    ({"workers": 0}, "workers=0"),
    ({"webhook_url": "serving-host:5002"}, "webhook_url="),
])
def test_follow_refuses_what_it_cannot_follow(kwargs, needle):
    from lightcycle.errors import UserError
    from lightcycle.serving.follow import Follower

    settings = {"model_uri": "models:/m@champion", "host": "127.0.0.1", "port": 5001,
                "workers": 1, "poll_seconds": 10, "webhook_port": 5002, **kwargs}
    with pytest.raises(UserError, match=re.escape(needle)):
        Follower(**settings)


def test_answers_name_their_version_and_close_the_connection_once_draining():
    import asyncio

    from lightcycle.serving.scoring_worker import labelled

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def answer(draining: asyncio.Event) -> dict:
        sent = []

        async def send(message):
            sent.append(message)

        await labelled(app, "7", draining)({"type": "http"}, None, send)
        return dict(sent[0]["headers"])

    async def both():
        draining = asyncio.Event()
        serving = await answer(draining)
        draining.set()
        return serving, await answer(draining)

    serving, drained = asyncio.run(both())
    assert serving == {b"x-lightcycle-model-version": b"7"}
    assert drained == {b"x-lightcycle-model-version": b"7", b"connection": b"close"}


# ---------------------------------------------------------------- slow: real servers


@pytest.fixture(scope="module", params=BACKENDS)
def registry(request, tmp_path_factory):
    env = dict(WEBHOOKS_ON)
    root = tmp_path_factory.mktemp(f"follow-{request.param}")
    if request.param == "postgresql":
        cluster = request.getfixturevalue("postgresql_cluster")
        cluster.create_database("follow")
        store_uri = cluster.uri("follow")
        env.update(cluster.env())
    else:
        store_uri = f"sqlite:///{root / 'mlflow.db'}"
    with _registry(root, store_uri, env) as registry:
        yield registry


@contextlib.contextmanager
def _registry(root: Path, store_uri: str, env: dict[str, str]):
    registry = Registry(start_tracking_server(root, backend_uri=store_uri, env=env), store_uri, env)
    try:
        client = registry.client
        run = client.create_run(client.create_experiment("follow"))
        client.log_artifacts(run.info.run_id, str(_deployable(root / "good")), "good")
        client.log_artifacts(run.info.run_id, str(_deployable(root / "broken", broken=True)), "broken")
        client.set_terminated(run.info.run_id)
        client.create_registered_model(NAME)
        for path in ("good", "good", "broken"):
            client.create_model_version(NAME, f"{run.info.artifact_uri}/{path}", run.info.run_id)
        client.set_registered_model_alias(NAME, "champion", "1")
        yield registry
    finally:
        stop_process(registry.server.proc)


class Follower:
    """`mlflow run . -e serve -P follow=true` and what it printed."""

    def __init__(self, registry: Registry, log: Path, **params):
        self.port, self.webhook_port = free_port(), free_port()
        self.log = log
        # docs/serving.md's command, as written; the model, the ports and the poll interval
        # are this test's.
        params = {"model_uri": f"models:/{NAME}@champion", "port": self.port,
                  "poll_seconds": POLL_SECONDS, "webhook_port": self.webhook_port, **params}
        cmd = shlex.split(DOCUMENTED)
        for key, value in params.items():
            cmd += ["-P", f"{key}={value}"]
        self.proc = subprocess.Popen(
            cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
            start_new_session=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": registry.server.url})
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for_http(f"{self.url}/ping", self.proc, timeout=180, log=log)

    def printed(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.printed():
            assert self.proc.poll() is None, f"the follower exited:\n{self.printed()[-3000:]}"
            assert time.monotonic() < deadline, f"{text!r} not printed in {timeout} s:\n{self.printed()[-3000:]}"
            time.sleep(0.1)

    def spares_ready(self, timeout: float = 60) -> None:
        """Wait until the spare processes of the next version have done their imports: after
        each version's start, one "ready" line."""
        deadline = time.monotonic() + timeout
        while (self.printed().count("spare process(es) ready")
               < self.printed().count("starting version ")):
            assert self.proc.poll() is None, f"the follower exited:\n{self.printed()[-3000:]}"
            assert time.monotonic() < deadline, f"no spares ready:\n{self.printed()[-3000:]}"
            time.sleep(0.1)

    def version(self) -> str:
        response = requests.post(f"{self.url}/invocations", json={"inputs": PIXELS}, timeout=30)
        response.raise_for_status()
        return response.headers[VERSION_HEADER]


PIXELS = [[[[float((i * 7) % 256) for i in range(28)] for _ in range(28)]]]


class Load:
    """8 clients, each on its own keep-alive connection, sending batch-1 requests back to back.
    Every request is counted; an exception or a status other than 200 is a failure."""

    def __init__(self, url: str, clients: int = 8):
        self.url, self.stop = url, threading.Event()
        self.answers: list[tuple[float, str]] = []  # (when, which version answered)
        self.failures: list[str] = []
        self.sent = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self):
        with requests.Session() as session:
            while not self.stop.is_set():
                with self.lock:
                    self.sent += 1
                try:
                    response = session.post(f"{self.url}/invocations", json={"inputs": PIXELS},
                                            timeout=30)
                    outcome = (None if response.status_code == 200
                               else f"{response.status_code}: {response.text[:200]}")
                except requests.RequestException as exc:
                    outcome = repr(exc)
                with self.lock:
                    if outcome:
                        self.failures.append(outcome)
                    else:
                        self.answers.append((time.monotonic(), response.headers[VERSION_HEADER]))

    def first_answer_of(self, version: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                times = [when for when, answered in self.answers if answered == version]
            if times:
                return min(times)
            time.sleep(0.05)
        raise AssertionError(f"no answer from version {version} within {timeout} s")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def finish(self) -> None:
        self.__exit__()
        assert not self.failures, f"{len(self.failures)} of {self.sent} requests failed: {self.failures[:5]}"
        assert len(self.answers) == self.sent, f"{self.sent} sent, {len(self.answers)} answered"


@pytest.fixture(scope="module")
def follower(registry, tmp_path_factory):
    follower = Follower(registry, tmp_path_factory.mktemp("follower") / "serve.log")
    yield follower
    stop_process(follower.proc, timeout=60)


@pytest.mark.slow
def test_alias_move_reaches_the_server_by_webhook_with_no_failed_request(registry, follower):
    follower.wait_for("sends model_version_alias.created", timeout=30)
    assert follower.version() == "1"
    time.sleep(2)  # the server's webhook cache (1 s here) has read the new webhook
    follower.spares_ready()
    with Load(follower.url) as load:
        time.sleep(1)
        moved = registry.move("champion", "2")
        switched = load.first_answer_of("2", timeout=10) - moved
        follower.wait_for("version 1 stopped", timeout=30)
        time.sleep(1)
        load.finish()
    printed = follower.printed()
    assert "moved from version 1 to 2 (seen by webhook)" in printed, printed[-3000:]
    assert switched <= 10
    print(f"[{registry.server.url}] webhook: alias move -> first answer of the new version "
          f"{switched:.2f} s; {load.sent} requests, {len(load.failures)} failed")


@pytest.mark.slow
def test_forged_and_unsigned_webhooks_are_refused(registry, follower):
    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": NAME, "alias": "champion", "version": "3"}})
    stamp = str(int(time.time()))
    delivery = str(uuid.uuid4())
    forged = base64.b64encode(hmac.new(b"not the secret", f"{delivery}.{stamp}.{body}".encode(),
                                       hashlib.sha256).digest()).decode()
    url = f"http://127.0.0.1:{follower.webhook_port}/"
    unsigned = requests.post(url, data=body, timeout=10)
    bad = requests.post(url, data=body, timeout=10, headers={
        "X-MLflow-Signature": f"v1,{forged}", "X-MLflow-Timestamp": stamp,
        "X-MLflow-Delivery-Id": delivery})
    assert (unsigned.status_code, bad.status_code) == (401, 401)
    time.sleep(1)
    assert "moved from version 2" not in follower.printed()
    assert follower.version() == "2"


@pytest.mark.slow
def test_a_broken_champion_is_refused_and_the_old_one_keeps_serving(registry, follower):
    with Load(follower.url, clients=2) as load:
        registry.move("champion", "3")
        follower.wait_for("version 3 refused", timeout=60)
        follower.wait_for("version 2 keeps serving", timeout=5)
        load.finish()
    assert {version for _, version in load.answers} == {"2"}
    tags = registry.client.get_model_version(NAME, "3").tags
    assert "reference says" in tags["lightcycle.serving_refused"], tags
    printed = follower.printed()
    assert "version 3 refused: it answered classes" in printed, printed[-3000:]


@pytest.mark.slow
def test_a_move_while_the_tracking_server_is_down_is_picked_up_when_it_is_back(registry, follower,
                                                                            monkeypatch):
    from mlflow import MlflowClient

    for key, value in registry.env.items():
        monkeypatch.setenv(key, value)
    follower.spares_ready()
    with Load(follower.url) as load:
        stop_process(registry.server.proc)
        follower.wait_for("cannot read", timeout=POLL_SECONDS + 15)
        store = MlflowClient(tracking_uri=registry.store_uri, registry_uri=registry.store_uri)
        store.set_registered_model_alias(NAME, "champion", "1")  # no server: no webhook
        registry.restart()
        back = time.monotonic()
        switched = load.first_answer_of("1", timeout=POLL_SECONDS + 10 + 10) - back
        follower.wait_for("version 2 stopped", timeout=30)
        load.finish()
    assert "moved from version 2 to 1 (seen by poll)" in follower.printed()
    assert switched <= POLL_SECONDS + 10
    print(f"[{registry.server.url}] poll after restart: first answer of the new version "
          f"{switched:.2f} s after the server was back; {load.sent} requests, 0 failed")


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_stopping_deletes_the_webhook_and_the_scoring_processes(registry, follower):
    descendants = _descendants(follower.proc.pid)
    assert len(descendants) >= 3, descendants  # mlflow run -> steps/serve.py -> scoring process
    webhooks = [w for w in registry.client.list_webhooks() if NAME in w.name]
    assert len(webhooks) == 1, webhooks
    stop_process(follower.proc, timeout=60)
    assert not [w for w in registry.client.list_webhooks() if NAME in w.name]
    deadline = time.monotonic() + 30
    while any(map(_running, descendants)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in descendants if _running(pid)], "scoring processes left running"
    assert f"webhook {webhooks[0].webhook_id} deleted" in follower.printed()


@pytest.mark.slow
def test_a_server_that_sends_no_webhooks_is_polled(tmp_path):
    """MLflow's defaults: no webhook to an http or loopback receiver. The step says so, polls,
    and the move reaches the server within poll_seconds + 10 s with no failed request; here
    with 2 scoring processes per version (`-P workers=2`)."""
    with _registry(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", {}) as registry:
        missing = subprocess.run(
            [*shlex.split(DOCUMENTED), "-P", "model_uri=models:/follow-missing@champion",
             "-P", f"port={free_port()}"], capture_output=True, text=True, timeout=300,
            cwd=PROJECT_ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": registry.server.url})
        assert missing.returncode != 0
        assert "models:/follow-missing@champion does not exist in the registry" in missing.stderr, \
            missing.stderr[-3000:]
        follower = Follower(registry, tmp_path / "serve.log", workers=2)
        try:
            follower.wait_for(f"polling models:/{NAME}@champion every {POLL_SECONDS} s", timeout=30)
            assert "the tracking server takes no webhook" in follower.printed()
            follower.spares_ready()
            with Load(follower.url) as load:
                time.sleep(1)
                moved = registry.move("champion", "2")
                switched = load.first_answer_of("2", timeout=POLL_SECONDS + 10) - moved
                follower.wait_for("version 1 stopped", timeout=30)
                load.finish()
            assert "moved from version 1 to 2 (seen by poll)" in follower.printed()
            assert "starting version 2 of follow-fashion (2 process(es))" in follower.printed()
            assert not registry.client.list_webhooks()
            print(f"poll only ({POLL_SECONDS} s): alias move -> first answer of the new version "
                  f"{switched:.2f} s; {load.sent} requests, 0 failed")
        finally:
            stop_process(follower.proc, timeout=60)
