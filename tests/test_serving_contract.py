"""The deployable's input contract over HTTP on a real `mlflow models serve` (issues 11, 12, 32).

A TorchScript deployable and an ONNX one, saved exactly as the chain saves them
(`deployable_model_kwargs`) from the same untrained `cnn`: no tracking server, no training, so
they run in seconds. The ONNX one is served in processes where `import torch` raises
(tests/without_torch/sitecustomize.py), and every HTTP test here runs against both.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import PROJECT_ROOT, SAMPLE_DIR, free_port, stop_process, wait_for_http
from test_serve import BAD_INPUTS
from lightcycle.model import data
from lightcycle.serving import client

pytestmark = pytest.mark.slow


WITHOUT_TORCH = {"PYTHONPATH": os.pathsep.join(filter(None, [
    str(PROJECT_ROOT / "tests" / "without_torch"), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def net():
    import torch

    from lightcycle.model.nets import build_net

    torch.manual_seed(0)
    return build_net("cnn").eval()


def _save(net, tmp, fmt: str) -> Path:
    import mlflow.pyfunc
    import torch

    from lightcycle.lifecycle import export

    if fmt == "onnx":
        archive = str(tmp / "model.onnx")
        export.save_archive(export.convert(net, "onnx", torch.zeros(2, 1, 28, 28)), archive)
    else:
        archive = str(tmp / "model.pt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            export.save_archive(torch.jit.freeze(torch.jit.script(net)), archive)
    model_dir = tmp / "model"
    mlflow.pyfunc.save_model(str(model_dir), **export.deployable_model_kwargs(archive, fmt))
    return model_dir


@pytest.fixture(scope="module")
def deployable(net, tmp_path_factory):
    return _save(net, tmp_path_factory.mktemp("deployable"), "torchscript")


@pytest.fixture(scope="module")
def onnx_deployable(net, tmp_path_factory):
    return _save(net, tmp_path_factory.mktemp("onnx-deployable"), "onnx")


@pytest.fixture(scope="module")
def eager_probabilities(net, images):
    import torch

    with torch.inference_mode():
        return torch.softmax(net(torch.from_numpy(images[:, None].astype(np.float32))),
                             dim=1).double().numpy()


def _serve(cmd, port, log, env=None):
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            cwd=PROJECT_ROOT, start_new_session=True,
                            env={**os.environ, **(env or {})})
    wait_for_http(f"http://127.0.0.1:{port}/ping", proc, timeout=120, log=log)
    return proc


@pytest.fixture(scope="module", params=["torchscript", "onnx"])
def url(request, tmp_path_factory):
    """The plain `mlflow models serve` on each deployable; the onnx one without torch."""
    onnx = request.param == "onnx"
    model = request.getfixturevalue("onnx_deployable" if onnx else "deployable")
    port = free_port()
    proc = _serve([os.path.join(os.path.dirname(sys.executable), "mlflow"), "models", "serve",
                   "-m", str(model), "--env-manager", "local", "-p", str(port)],
                  port, tmp_path_factory.mktemp("log") / "serve.log", WITHOUT_TORCH if onnx else None)
    yield f"http://127.0.0.1:{port}"
    stop_process(proc)


def test_the_onnx_server_runs_where_torch_cannot_be_imported(onnx_deployable):
    """What the onnx `url` runs under: torch refused in any process, onnxruntime still there;
    and the deployable's logged requirements name no torch."""
    result = subprocess.run([sys.executable, "-c", "import onnxruntime; import torch"],
                            env={**os.environ, **WITHOUT_TORCH}, capture_output=True, text=True)
    assert result.returncode != 0 and "import of torch refused" in result.stderr, result.stderr
    for name in ("requirements.txt", "conda.yaml", "python_env.yaml"):
        text = (onnx_deployable / name).read_text()
        assert "torch" not in text and ("onnxruntime==" in text or name == "python_env.yaml"), text


def test_answers_are_eager_torchs_on_the_test_images(url, images, eager_probabilities):
    response = invoke(url, {"inputs": images[:, None].astype(np.float32).tolist()})
    assert response.status_code == 200, response.text[:2000]
    rows = response.json()["predictions"]
    probabilities = np.array([row["probabilities"] for row in rows])
    np.testing.assert_allclose(probabilities, eager_probabilities, atol=1e-5)
    assert [row["class_id"] for row in rows] == eager_probabilities.argmax(1).tolist()
    assert [row["label"] for row in rows] == [data.CLASS_NAMES[i] for i in
                                              eager_probabilities.argmax(1)]


def test_the_logged_input_example_is_answered_as_the_logged_reference_says(url, request):
    """What `serve -P follow=true` checks a new version by (serving/follow.py): the reference
    export.py writes from each archive matches what `mlflow models serve` answers, onnx too."""
    from lightcycle.serving.follow import check_answers

    onnx = request.node.callspec.params["url"] == "onnx"
    model = request.getfixturevalue("onnx_deployable" if onnx else "deployable")
    assert any(model.glob("artifacts/*.onnx")) == onnx
    assert check_answers(int(url.rsplit(":", 1)[1]), model) is None


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_every_malformed_payload_gets_the_same_clear_4xx(url, case):
    """The chain's champion answers these in tests/test_serve.py: NaN, Infinity, an oversized
    batch, wrong shapes and types, bodies that are not the contract."""
    body, needle = BAD_INPUTS[case]
    response = invoke(url, body)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    assert needle in response.text, response.text[:1000]


@pytest.fixture(scope="module")
def images():
    return data.load_split(SAMPLE_DIR, "test").images


def invoke(url, body):
    payload = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(url + "/invocations", data=payload,
                         headers={"Content-Type": "application/json"}, timeout=60)


def _image(value=0.0):
    return [[[value] * 28 for _ in range(28)]]


BOOLEANS = {
    "one_true_among_floats": lambda: [[[[1.0] * 27 + [True]] * 28]],
    "false_among_ints": lambda: [[[[0] * 28] * 27 + [[False] + [3] * 27]]],
    "true_as_first_pixel": lambda: [[[[True] + [3.5] * 27] + [[3.5] * 28] * 27]],
    "all_true": lambda: [[[[True] * 28] * 28]],
    "boolean_instead_of_an_image": lambda: [_image(), True],
    "boolean_in_3d_form": lambda: [[[0] * 27 + [False]] * 28],
}


@pytest.mark.parametrize("case", sorted(BOOLEANS))
def test_any_boolean_gets_a_400_that_says_so(url, case):
    response = invoke(url, {"inputs": BOOLEANS[case]()})
    assert response.status_code == 400, (response.status_code, response.text[:500])
    assert "type bool" in response.text and "true/false" in response.text, response.text[:500]


def test_numbers_without_booleans_still_work(url, images):
    response = invoke(url, {"inputs": images[:2, None].tolist()})
    assert response.status_code == 200, response.text[:500]


def test_base64_uint8_gives_the_same_answers_as_json_numbers(url, images):
    as_json = invoke(url, {"inputs": images[:64, None].astype(float).tolist()})
    encoded = base64.b64encode(images[:64].astype(np.uint8).tobytes()).decode()
    as_b64 = invoke(url, {"inputs": {"pixels_uint8_b64": encoded}})
    assert as_json.status_code == as_b64.status_code == 200, as_b64.text[:500]
    assert as_b64.json() == as_json.json()
    row = as_b64.json()["predictions"][0]
    assert set(row) == {"class_id", "label", "probabilities"}
    assert row["label"] == data.CLASS_NAMES[row["class_id"]] and len(row["probabilities"]) == 10


BAD_BASE64 = {
    "not_base64": ("!!!", "not valid base64"),
    "wrong_length": (base64.b64encode(b"\0" * 100).decode(), "not a multiple of 784"),
    "empty": ("", "empty batch"),
    "number": (5, "expected a base64 string"),
    "too_many_images": (base64.b64encode(b"\0" * 784 * 1025).decode(), "at most 1024"),
}


@pytest.mark.parametrize("case", sorted(BAD_BASE64))
def test_bad_base64_gets_a_clear_400(url, case):
    value, needle = BAD_BASE64[case]
    response = invoke(url, {"inputs": {"pixels_uint8_b64": value}})
    assert response.status_code == 400, (response.status_code, response.text[:500])
    assert needle in response.text, response.text[:500]


def test_other_named_inputs_are_still_refused(url):
    response = invoke(url, {"inputs": {"pixels_uint8_b64": "", "shape": [1, 28, 28]}})
    assert response.status_code == 400 and "named inputs" in response.text


def test_client_sends_base64_for_whole_pixels_and_json_otherwise(url, images):
    whole = images[:3, None].astype(np.float32)
    assert "pixels_uint8_b64" in client.request_body(whole)["inputs"]
    assert isinstance(client.request_body(whole + 0.5)["inputs"], list)
    assert client.predict(url, whole) == invoke(url, {"inputs": whole.tolist()}).json()["predictions"]


def test_in_process_predict_still_returns_the_table(deployable, images):
    import mlflow.pyfunc

    table = mlflow.pyfunc.load_model(str(deployable)).predict(images[:4, None].astype(np.float32))
    assert list(table.columns) == ["class_id", "label", "probabilities"] and len(table) == 4
    with pytest.raises(Exception, match="type bool"):
        mlflow.pyfunc.load_model(str(deployable)).predict([[[[1.0] * 27 + [True]] * 28]])


def test_a_local_model_directory_loads_and_nothing_is_left_in_the_temp_dir(
        deployable, images, tmp_path, monkeypatch):
    """`predict` and `promote` load through model_io.load_pyfunc: registry models through a
    temporary download that goes away (tests/test_chain.py), a local directory where it is."""
    import tempfile

    from lightcycle.lifecycle import model_io

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    table = model_io.load_pyfunc(str(deployable)).predict(images[:3, None].astype(np.float32))
    assert len(table) == 3 and (deployable / "MLmodel").exists()
    assert not list(tmp_path.iterdir()), "load_pyfunc left something in the temp dir"


def test_the_serve_step_refuses_booleans_too(deployable, images, tmp_path):
    port = free_port()
    proc = _serve([sys.executable, "steps/serve.py", "--model_uri", str(deployable),
                   "--port", str(port)], port, tmp_path / "serve.log")
    try:
        response = invoke(f"http://127.0.0.1:{port}", {"inputs": BOOLEANS["all_true"]()})
        assert response.status_code == 400 and "type bool" in response.text
        assert invoke(f"http://127.0.0.1:{port}", {"inputs": images[:2].tolist()}).ok
    finally:
        stop_process(proc)


def _socket_inode(local_port: int, remote_port: int) -> int:
    """The inode of the 127.0.0.1 TCP socket with these ports, from /proc/net/tcp."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(a.split(":")[1], 16) for a in fields[1:3])
        if (local, remote) == (local_port, remote_port):
            return int(fields[9])
    raise AssertionError(f"no TCP socket 127.0.0.1:{local_port} <- :{remote_port}")


def _peer_socket_option(pids: list[int], inode: int, level: int, option: int) -> tuple[int, int]:
    """(pid, value) of a socket option on the socket `inode` that one of `pids` holds, read
    through a duplicate of its descriptor (pidfd_getfd, Linux >= 5.6)."""
    import ctypes
    import socket

    libc = ctypes.CDLL(None, use_errno=True)
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) != f"socket:[{inode}]":
                    continue
            except OSError:
                continue
            pidfd = os.pidfd_open(pid)
            try:
                dup = libc.syscall(438, pidfd, int(fd.name), 0)  # SYS_pidfd_getfd
                assert dup >= 0, f"pidfd_getfd: errno {ctypes.get_errno()}"
            finally:
                os.close(pidfd)
            sock = socket.socket(fileno=dup)
            try:
                return pid, sock.getsockopt(level, option)
            finally:
                sock.detach()
                os.close(dup)
    raise AssertionError(f"no process of {pids} holds socket {inode}")


def test_mlflow_models_serve_w2_accepts_connections_with_tcp_nodelay(deployable, images,
                                                                     tmp_path):
    """`mlflow models serve -w 2` runs `uvicorn --workers 2`, which binds the listening socket
    itself. uvicorn releases before 0.55.0 (its issue 3149) bound it so that every accepted
    connection kept Nagle's algorithm on: about 40 ms a keep-alive request. The project pins
    uvicorn 0.55.0 and the deployable requires at least that. Read on the server's side of a
    real keep-alive connection, in the worker that accepted it."""
    import importlib.metadata
    import socket

    assert tuple(map(int, importlib.metadata.version("uvicorn").split(".")[:2])) >= (0, 55)
    assert "uvicorn>=0.55.0" in (deployable / "requirements.txt").read_text().split()
    port = free_port()
    proc = _serve([os.path.join(os.path.dirname(sys.executable), "mlflow"), "models", "serve",
                   "-m", str(deployable), "--env-manager", "local", "-p", str(port), "-w", "2"],
                  port, tmp_path / "serve.log")
    try:
        import http.client

        keep_alive = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = json.dumps({"inputs": images[:2, None].astype(np.float32).tolist()})
        for _ in range(3):  # one connection for every request
            keep_alive.request("POST", "/invocations", body,
                               {"Content-Type": "application/json"})
            response = keep_alive.getresponse()
            assert response.status == 200, response.read()[:2000]
            response.read()
        try:
            client_port = keep_alive.sock.getsockname()[1]
            tree, parents = [proc.pid], [proc.pid]
            while parents:  # the CLI, uvicorn's supervisor, its workers
                parents = [int(p) for parent in parents for p in subprocess.run(
                    ["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True,
                    text=True).stdout.split()]
                tree += parents
            pid, nodelay = _peer_socket_option(tree, _socket_inode(port, client_port),
                                               socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            keep_alive.close()
    finally:
        stop_process(proc)
    assert pid != tree[0]  # a uvicorn worker holds the connection
    assert nodelay == 1, f"the worker's accepted socket has TCP_NODELAY={nodelay}"
