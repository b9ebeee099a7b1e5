"""Serving the champion with the real `mlflow models serve`, over HTTP, and its input contract."""

from __future__ import annotations

import json
import os
import subprocess

import mlflow
import numpy as np
import pytest
import requests

from conftest import (PROJECT_ROOT, SAMPLE_CHAIN_MODEL, SAMPLE_DIR, check, free_port,
                      mlflow_run, stop_process, wait_for_http)
from lightcycle.model import data
from lightcycle.serving import scoring_server
from lightcycle.errors import UserError

# The session's shared chain (conftest.sample_chain): read here, never changed.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sample-chain")]


@pytest.fixture(scope="module")
def chain_experiment(tracked_sample_chain):
    """Both deployables from one eager version: the pt2 tests compare their answers."""
    return tracked_sample_chain["experiment"]


@pytest.fixture(scope="module")
def champion(tracked_sample_chain):
    return tracked_sample_chain["champion"]


def _start(cmd, port, tmp_path, env):
    log = tmp_path / f"serve-{port}.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
                            env=env, start_new_session=True)
    wait_for_http(f"http://127.0.0.1:{port}/ping", proc, timeout=120, log=log)
    return proc


@pytest.fixture(scope="module")
def server(champion, tracking_server, tmp_path_factory):
    """`mlflow run . -e serve` on the champion."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_server.url}
    proc = _start(["mlflow", "run", str(PROJECT_ROOT), "-e", "serve", "--env-manager", "local",
                   "-P", f"model_uri={champion}", "-P", f"port={port}"],
                  port, tmp_path_factory.mktemp("serve"), env)
    yield f"http://127.0.0.1:{port}", proc
    stop_process(proc)


@pytest.fixture(scope="module")
def pt2_server(sample_chain, chain_experiment, tracking_server, tmp_path_factory):
    """The documented pt2 command, then `serve` on its champion."""
    env = {"MLFLOW_TRACKING_URI": tracking_server.url}
    result = check(mlflow_run("main", {**sample_chain["params"], "deployable": "pt2"},
                              chain_experiment, env=env))
    assert f"champion    models:/{SAMPLE_CHAIN_MODEL}-pt2/" in result.stdout, result.stdout
    port = free_port()
    proc = _start(["mlflow", "run", str(PROJECT_ROOT), "-e", "serve", "--env-manager", "local",
                   "-P", f"model_uri=models:/{SAMPLE_CHAIN_MODEL}-pt2@champion", "-P", f"port={port}"],
                  port, tmp_path_factory.mktemp("serve-pt2"), {**os.environ, **env})
    yield f"http://127.0.0.1:{port}"
    stop_process(proc)


WITHOUT_TORCH = str(PROJECT_ROOT / "tests" / "without_torch")  # its sitecustomize refuses torch


@pytest.fixture(scope="module")
def onnx_server(sample_chain, chain_experiment, tracking_server, tmp_path_factory):
    """The documented onnx command, then the plain `mlflow models serve` on its champion in
    processes where `import torch` raises."""
    env = {"MLFLOW_TRACKING_URI": tracking_server.url}
    result = check(mlflow_run("main", {**sample_chain["params"], "deployable": "onnx"},
                              chain_experiment, env=env))
    assert f"champion    models:/{SAMPLE_CHAIN_MODEL}-onnx/" in result.stdout, result.stdout
    port = free_port()
    proc = _start(["mlflow", "models", "serve", "-m",
                   f"models:/{SAMPLE_CHAIN_MODEL}-onnx@champion", "--env-manager", "local",
                   "-p", str(port)], port, tmp_path_factory.mktemp("serve-onnx"),
                  {**os.environ, **env, "PYTHONPATH": os.pathsep.join(
                      filter(None, [WITHOUT_TORCH, os.environ.get("PYTHONPATH")]))})
    yield f"http://127.0.0.1:{port}"
    stop_process(proc)


@pytest.fixture(scope="module")
def test_images():
    return data.load_split(SAMPLE_DIR, "test")


def invoke(url, body, content_type="application/json"):
    payload = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(url + "/invocations", data=payload,
                         headers={"Content-Type": content_type}, timeout=60)


def test_valid_batch_gets_probabilities_and_class_names(server, test_images):
    url, _ = server
    pixels = test_images.images[:64, None].astype(float).tolist()
    response = invoke(url, {"inputs": pixels})
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert len(rows) == 64
    probabilities = np.array([r["probabilities"] for r in rows])
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    class_ids = np.array([r["class_id"] for r in rows])
    assert [r["label"] for r in rows] == [data.CLASS_NAMES[i] for i in class_ids]
    assert (class_ids == test_images.labels[:64]).mean() > 0.2


def test_integer_pixels_are_accepted(server, test_images):
    url, _ = server
    response = invoke(url, {"inputs": test_images.images[:2, None].tolist()})
    assert response.status_code == 200, response.text


def test_images_without_channel_axis_get_the_same_answers(server, test_images):
    url, _ = server
    with_channel = invoke(url, {"inputs": test_images.images[:8, None].tolist()})
    without = invoke(url, {"inputs": test_images.images[:8].tolist()})
    assert without.status_code == 200, without.text
    assert without.json() == with_channel.json()


def test_plain_mlflow_models_serve_gives_the_same_answers(server, champion, tracking_server,
                                                          test_images, tmp_path):
    url, _ = server
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_server.url}
    proc = _start(["mlflow", "models", "serve", "-m", champion, "--env-manager", "local",
                   "-p", str(port)], port, tmp_path, env)
    try:
        body = {"inputs": test_images.images[:16, None].astype(float).tolist()}
        ours = invoke(url, body).json()
        plain = invoke(f"http://127.0.0.1:{port}", body).json()
    finally:
        stop_process(proc)
    assert ours == plain


def _image(value=0.0):
    return [[[value] * 28 for _ in range(28)]]


BAD_INPUTS = {
    "wrong_rank": ({"inputs": [[0.0] * 784]}, "shape"),
    "wrong_channels": ({"inputs": [[[[0.0] * 28] * 28] * 3]}, "shape"),
    "wrong_height_width": ({"inputs": [[[[0.0] * 32] * 32]]}, "shape"),
    "pixel_above_255": ({"inputs": [_image(300.0)]}, "[0, 255]"),
    "pixel_below_0": ({"inputs": [_image(-1.0)]}, "[0, 255]"),
    "nan": ('{"inputs": [[[' + ",".join(["[" + ",".join(["NaN"] * 28) + "]"] * 28) + "]]]}", "NaN"),
    "infinity": ('{"inputs": [[[' + ",".join(["[" + ",".join(["Infinity"] * 28) + "]"] * 28) + "]]]}", "Infinity"),
    "strings": ({"inputs": [[[["a"] * 28] * 28]]}, "type <U1"),
    "booleans": ({"inputs": [[[[True] * 28] * 28]]}, "type bool"),
    "ragged": ({"inputs": [[[[0.0] * 28] * 27 + [[0.0] * 5]]]}, "inhomogeneous"),
    "empty_batch": ({"inputs": []}, "empty batch"),
    "empty_images": ({"inputs": [[]]}, "shape (1, 0)"),
    "null": ({"inputs": None}, "Got null"),
    "dict_not_list": ({"inputs": {"pixels": [1, 2]}}, "named inputs"),
    "unknown_key": ({"pixels": [_image()]}, "inputs"),
    "two_keys": ({"inputs": [_image()], "instances": [_image()]}, "inputs"),
    "not_json": ("this is {not json", "JSON"),
    "empty_body": ("", "Expecting value: line 1 column 1 (char 0)"),
    "scalar": ({"inputs": 5}, "shape ()"),
    "batch_too_large": ({"inputs": [_image()] * 1025}, "at most 1024"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_a_clear_4xx(server, case):
    url, _ = server
    body, needle = BAD_INPUTS[case]
    response = invoke(url, body)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    assert needle in response.text, response.text[:1000]


def test_pt2_champion_is_torch_export_and_answers_like_torchscript(pt2_server, server,
                                                                    test_images):
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(f"{SAMPLE_CHAIN_MODEL}-pt2", "champion")
    assert version.tags["lightcycle.conversion"] == "export/exported"
    scripted = client.get_model_version_by_alias(f"{SAMPLE_CHAIN_MODEL}-scripted", "champion")
    assert version.tags["lightcycle.source_version"] == scripted.tags["lightcycle.source_version"]
    body = {"inputs": test_images.images[:64].tolist()}
    pt2_rows = invoke(pt2_server, body).json()["predictions"]
    ts_rows = invoke(server[0], body).json()["predictions"]
    assert [r["label"] for r in pt2_rows] == [r["label"] for r in ts_rows]
    np.testing.assert_allclose([r["probabilities"] for r in pt2_rows],
                               [r["probabilities"] for r in ts_rows], atol=1e-5)


def test_onnx_champion_serves_without_torch_and_answers_like_torchscript(onnx_server, server,
                                                                         test_images):
    client = mlflow.MlflowClient()
    name = f"{SAMPLE_CHAIN_MODEL}-onnx"
    version = client.get_model_version_by_alias(name, "champion")
    assert client.get_model_version_by_alias(name, "challenger").version == version.version
    assert version.tags["lightcycle.conversion"] == "onnx/exported"
    assert version.tags["lightcycle.gate.decision"] == "promoted"
    scripted = client.get_model_version_by_alias(f"{SAMPLE_CHAIN_MODEL}-scripted", "champion")
    assert version.tags["lightcycle.source_version"] == scripted.tags["lightcycle.source_version"]
    requirements = mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}/requirements.txt")
    assert "torch" not in open(requirements).read()
    body = {"inputs": test_images.images.tolist()}  # all 180
    onnx_rows = invoke(onnx_server, body).json()["predictions"]
    ts_rows = invoke(server[0], body).json()["predictions"]
    assert [r["label"] for r in onnx_rows] == [r["label"] for r in ts_rows]
    np.testing.assert_allclose([r["probabilities"] for r in onnx_rows],
                               [r["probabilities"] for r in ts_rows], atol=1e-5)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_pt2_champion_keeps_the_input_contract(pt2_server, case):
    body, needle = BAD_INPUTS[case]
    response = invoke(pt2_server, body)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    assert needle in response.text, response.text[:1000]


def test_wrong_content_type_gets_415(server):
    url, _ = server
    response = invoke(url, json.dumps({"inputs": [_image()]}), content_type="text/plain")
    assert response.status_code == 415
    assert "content type" in response.text.lower()


def _rss_kib(pid: int) -> int:
    total = 0
    for child in [pid, *_descendants(pid)]:
        try:
            for line in open(f"/proc/{child}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    kids = [int(p) for p in out.stdout.split()]
    return kids + [g for k in kids for g in _descendants(k)]


def test_server_stays_healthy_after_1000_bad_requests(server, test_images):
    url, proc = server
    good = {"inputs": test_images.images[:4, None].astype(float).tolist()}
    bad = [b for b, _ in BAD_INPUTS.values() if b != BAD_INPUTS["batch_too_large"][0]]
    with requests.Session() as session:
        def post(body):
            payload = body if isinstance(body, str) else json.dumps(body)
            return session.post(url + "/invocations", data=payload,
                                headers={"Content-Type": "application/json"}, timeout=60)
        for _ in range(100):  # warm-up, so allocator pools are in place before measuring
            post(bad[0])
        before = _rss_kib(proc.pid)
        statuses = [post(bad[i % len(bad)]).status_code for i in range(1000)]
        after = _rss_kib(proc.pid)
        assert all(400 <= s < 500 for s in statuses)
        assert post(good).status_code == 200
    assert after - before < 50 * 1024, f"RSS grew {before} -> {after} KiB"


def test_serve_accepts_only_registry_uris_or_local_model_dirs(tmp_path, tracking_uri):
    with pytest.raises(UserError, match="Refusing to serve"):
        scoring_server.resolve_servable("runs:/0123/model")
    with pytest.raises(UserError, match="Refusing to serve"):
        scoring_server.resolve_servable(str(tmp_path))


def test_several_workers_share_the_cores_unless_the_user_set_threads():
    cores = os.cpu_count() or 1
    two = scoring_server.server_environment(2, {"PATH": "/usr/bin"})
    assert two["LIGHTCYCLE_TORCH_THREADS"] == str(max(1, cores // 2))
    assert two["PATH"].endswith(os.pathsep + "/usr/bin")  # this venv's bin/ leads
    assert "LIGHTCYCLE_TORCH_THREADS" not in scoring_server.server_environment(1, {})
    for own in ({"LIGHTCYCLE_TORCH_THREADS": "3"}, {"OMP_NUM_THREADS": "3"}):
        env = scoring_server.server_environment(4, own)
        assert {k: env[k] for k in own} == own and len(env.keys() & {
            "LIGHTCYCLE_TORCH_THREADS", "OMP_NUM_THREADS"}) == 1


def _write_pngs(directory, images):
    from PIL import Image

    directory.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(directory / f"img{i:03d}.png")
    return directory


def test_client_prints_class_names_for_idx_and_png(server, test_images, tmp_path):
    url, _ = server
    idx = SAMPLE_DIR / "FashionMNIST/raw/t10k-images-idx3-ubyte"
    pngs = _write_pngs(tmp_path / "pngs", test_images.images[:5])
    result = subprocess.run([os.path.join(os.path.dirname(os.sys.executable), "python"), "-m",
                             "lightcycle.serving.client", "--url", url, str(idx), str(pngs)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 185
    labels = [line.split("\t")[1] for line in lines]
    assert set(labels) <= set(data.CLASS_NAMES)
    assert labels[180:] == labels[:5]  # the PNGs are the first five IDX images


def test_predict_entry_point_writes_and_logs_csv(champion, tracking_uri, experiment, test_images,
                                                 tmp_path):
    import pandas as pd

    frame = pd.DataFrame(test_images.images.reshape(180, -1)[:40])
    frame.columns = [f"px{i}" for i in range(784)]
    frame.to_parquet(tmp_path / "pixels.parquet")
    out, temp = tmp_path / "predictions.csv", tmp_path / "tmp"
    temp.mkdir()
    check(mlflow_run("predict", {"model_uri": champion, "input": tmp_path / "pixels.parquet",
                                 "output": out}, experiment, env={"TMPDIR": str(temp)}))
    assert not list(temp.rglob("MLmodel")), "predict left the downloaded model in TMPDIR"
    table = pd.read_csv(out)
    assert len(table) == 40
    assert {"name", "class_id", "label", "p_bag", "p_ankle_boot"} <= set(table.columns)
    probability_columns = [c for c in table.columns if c.startswith("p_")]
    np.testing.assert_allclose(table[probability_columns].sum(1), 1.0, atol=1e-5)
    run = mlflow.MlflowClient().search_runs([experiment])[0]
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "predictions")] \
        == ["predictions/predictions.csv"]


def test_predict_refuses_unknown_input_clearly(champion, tracking_uri, experiment, tmp_path):
    result = mlflow_run("predict", {"model_uri": champion, "input": tmp_path / "nope.idx"},
                        experiment)
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
