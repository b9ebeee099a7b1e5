"""Every entry point once, through `mlflow run . -e <step> --env-manager local`: the fast tier's
end-to-end check (`make test PYTEST_ARGS='-m "not slow"'`). It reads the session's shared chain
(conftest.sample_chain, the documented 1-epoch `main`), so the full suite pays for it once."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from conftest import SAMPLE_DIR, check, mlflow_run, runs_of, serve_step
from lightcycle.model import data

pytestmark = pytest.mark.xdist_group("sample-chain")

CHAIN_STEPS = ("train", "register", "torchscript", "promote")


@pytest.fixture(scope="module")
def chain(sample_chain, tracking_server, monkeypatch_module):
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", tracking_server.url)
    return sample_chain


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_main_runs_train_register_torchscript_and_promote_to_a_champion(chain):
    client = MlflowClient()
    # The chain's own main is the first; later tests of the group run more in this experiment.
    main = min(runs_of(chain["experiment"], "main", status="FINISHED"),
               key=lambda run: run.info.start_time)
    children = client.search_runs([chain["experiment"]],
                                  f"tags.`mlflow.parentRunId` = '{main.info.run_id}'")
    steps = sorted(r.data.tags["mlflow.project.entryPoint"] for r in children
                   if r.info.status == "FINISHED")
    assert set(CHAIN_STEPS) <= set(steps), steps
    champion = client.get_model_version_by_alias(chain["name"] + "-scripted", "champion")
    # "champion": a later test of the group ran the gate again on the same version.
    assert champion.tags["lightcycle.gate.decision"] in ("promoted", "champion")


def test_lineage_step_prints_the_champion_and_its_training_run(chain):
    client = MlflowClient()
    champion = client.get_model_version_by_alias(chain["name"] + "-scripted", "champion")
    eager_uri = champion.tags["lightcycle.source_version"]
    eager = client.get_model_version(*eager_uri.removeprefix("models:/").split("/"))
    result = check(mlflow_run("lineage", {"model_uri": chain["champion"]}, chain["experiment"]))
    assert f"-> models:/{chain['name']}-scripted/{champion.version} " in result.stdout
    assert f"training run {eager.tags['lightcycle.source_run_id']} (FINISHED)" in result.stdout


def test_predict_step_labels_every_sample_image(chain, tmp_path):
    import pandas as pd

    out = tmp_path / "labels.csv"
    check(mlflow_run("predict", {"model_uri": chain["champion"],
                                 "input": SAMPLE_DIR / "FashionMNIST/raw/t10k-images-idx3-ubyte",
                                 "output": out}, chain["experiment"]))
    table = pd.read_csv(out)
    assert len(table) == len(data.read_idx_images(
        SAMPLE_DIR / "FashionMNIST/raw/t10k-images-idx3-ubyte"))
    assert set(table["label"]) <= set(data.CLASS_NAMES)


def test_serve_step_answers_a_batch_with_class_probabilities(chain, tracking_server, tmp_path):
    import numpy as np
    import requests

    with serve_step(chain["champion"], tmp_path / "serve.log",
                    env={"MLFLOW_TRACKING_URI": tracking_server.url}) as url:
        images = data.read_idx_images(SAMPLE_DIR / "FashionMNIST/raw/t10k-images-idx3-ubyte")[:3]
        answer = requests.post(f"{url}/invocations", json={"inputs": images.tolist()}, timeout=30)
        assert answer.status_code == 200, answer.text
        rows = answer.json()["predictions"]
        assert len(rows) == 3
        assert {row["label"] for row in rows} <= set(data.CLASS_NAMES)
        np.testing.assert_allclose([sum(row["probabilities"]) for row in rows], 1.0, atol=1e-5)


def test_tune_step_runs_a_study_as_a_parent_with_its_trial(chain, tmp_path):
    # An experiment of its own: trial runs are not entry-point runs (test_ui reads the chain's).
    experiment = MlflowClient().create_experiment("fast-tier-tune")
    result = check(mlflow_run("tune", {"n_trials": 1, "epochs": 1, "models": "mlp",
                                       "study_name": "fast-tier",
                                       "optuna_storage": tmp_path / "optuna.db"}, experiment))
    (parent,) = runs_of(experiment, "tune", status="FINISHED")
    trials = MlflowClient().search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert [r.info.status for r in trials] == ["FINISHED"], result.stdout[-2000:]
    assert parent.data.tags["lightcycle.best_trial_run"] == trials[0].info.run_id
    assert parent.data.metrics["trials_complete"] == 1
