"""What a person sees in the MLflow UI after a chain, read through the tracking server's REST API
(what the UI itself reads): a model-training experiment, runs named after their steps, logged
models named after what they are, and registered models and versions that describe themselves.
Reads the session's shared chain (conftest.sample_chain), never changes it."""

from __future__ import annotations

import re

import pytest
import requests
from mlflow import MlflowClient

from lightcycle.lifecycle import tracking

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sample-chain")]


def api(server, method: str, path: str, **kwargs) -> dict:
    response = requests.request(method, f"{server.url}/api/2.0/mlflow/{path}", timeout=30, **kwargs)
    assert response.ok, f"{method} {path}: {response.status_code} {response.text[:500]}"
    return response.json()


@pytest.fixture(scope="module")
def chain(sample_chain, sqlite_server):
    return {**sample_chain, "server": sqlite_server}


def test_the_experiment_opens_as_model_training(chain):
    experiment = api(chain["server"], "GET", "experiments/get",
                     params={"experiment_id": chain["experiment"]})["experiment"]
    tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
    assert tags.get(tracking.TAG_EXPERIMENT_KIND) == "custom_model_development", tags


def test_an_experiment_with_another_kind_keeps_it(sqlite_server):
    client = MlflowClient(sqlite_server.url)
    kinded = client.create_experiment("ui-kinded", tags={tracking.TAG_EXPERIMENT_KIND: "genai_development"})
    plain = client.create_experiment("ui-plain")
    for experiment_id in (kinded, plain):
        tracking.mark_experiment(client, experiment_id)
    assert client.get_experiment(kinded).tags[tracking.TAG_EXPERIMENT_KIND] == "genai_development"
    assert client.get_experiment(plain).tags[tracking.TAG_EXPERIMENT_KIND] == "custom_model_development"


def test_every_run_name_starts_with_its_step(chain):
    runs = api(chain["server"], "POST", "runs/search",
               json={"experiment_ids": [chain["experiment"]], "max_results": 100})["runs"]
    steps = set()
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        step = tags[tracking.TAG_ENTRY_POINT]
        steps.add(step)
        assert run["info"]["run_name"].startswith(step), (step, run["info"]["run_name"])
    assert {"main", "train", "register", "torchscript", "promote"} <= steps, steps
    names = {run["info"]["run_name"] for run in runs}
    assert "train-cnn-1ep" in names and "torchscript-export" in names, names


def test_logged_models_are_named_after_the_net_and_carry_the_gate_accuracy(chain):
    models = api(chain["server"], "POST", "logged-models/search",
                 json={"experiment_ids": [chain["experiment"]]})["models"]
    by_name = {m["info"]["name"]: m for m in models}
    assert {"cnn", "cnn-scripted", "cnn-pt2"} <= set(by_name), sorted(by_name)
    assert "model" not in by_name
    for name in ("cnn-scripted", "cnn-pt2"):
        metrics = {m["key"]: m["value"] for m in by_name[name]["data"].get("metrics", [])}
        assert 0 < metrics.get("gate_accuracy", 0) <= 1, (name, metrics)
        assert "parity_max_abs_diff" in metrics, (name, metrics)


@pytest.mark.parametrize("suffix", ["", "-scripted", "-pt2"])
def test_registered_models_and_versions_describe_themselves(chain, suffix):
    name = chain["name"] + suffix
    model = api(chain["server"], "GET", "registered-models/get",
                params={"name": name})["registered_model"]
    described = model.get("description", "")
    assert "**Input**" in described and "28" in described, described
    if suffix:
        assert f"models:/{name}@champion" in described and "pixels_uint8_b64" in described
    else:
        assert f"{chain['name']}-scripted" in described  # serve the deployable, not this
    version = api(chain["server"], "GET", "model-versions/get",
                  params={"name": name, "version": "1"})["model_version"]
    text = version.get("description", "")
    assert re.search(r"- Accuracy: 0\.\d{4} on the", text), text
    if suffix:
        assert re.search(r"- Parity with eager: max \|logit diff\| \S+ \(tolerance", text), text
        assert re.search(r"- Gate: promoted: accuracy 0\.\d{4} beats min_accuracy 0\.1000; "
                         r"no champion yet \(promote run \w+\)$", text), text
        assert text.count("- Gate:") == 1, text


def test_steps_print_no_artifact_progress_bars_or_download_directories(chain):
    output = chain["stdout"] + chain["stderr"]
    assert "Downloading artifacts" not in output, output[-3000:]
    # `mlflow run` itself (the user's command, not a step) announces its own directory once.
    assert output.count("for downloading remote URIs") <= 1, output[-3000:]
