"""README promises that no other module walks: `main -P deployable=int8` through the chain,
and a learning rate written `1e-3` through `mlflow run`."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import check, mlflow_run, runs_of
from lightcycle.lifecycle import registry

pytestmark = pytest.mark.slow


@pytest.mark.xdist_group("sample-chain")
def test_main_with_deployable_int8_reuses_the_chain_and_gates_an_int8_deployable(
        sample_chain, tracking_server, monkeypatch):
    """The shared chain's `main`, again with `-P deployable=int8`: training and registration are
    reused; the int8 TorchScript is built, passes its parity, is gated and holds its own
    champion (`<name>-int8`), leaving the chain's other deployables as they were."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.url)
    mlflow.set_tracking_uri(tracking_server.url)
    client = MlflowClient()
    scripted = client.get_model_version_by_alias(sample_chain["name"] + "-scripted", "champion")
    params = {**sample_chain["params"], "deployable": "int8"}
    result = check(mlflow_run("main", params, sample_chain["experiment"]))
    out = result.stdout
    assert "train: reusing finished run" in out and "register: reusing finished run" in out, out
    name = registry.deployable_name(sample_chain["name"], "int8")
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["lightcycle.gate.decision"] == "promoted"
    assert champion.tags["lightcycle.conversion"].startswith("quantize")
    assert champion.tags["lightcycle.source_version"] == scripted.tags["lightcycle.source_version"]
    assert f"mlflow models serve -m models:/{name}@champion" in out, out[-3000:]
    assert mlflow.models.get_model_info(f"models:/{name}@champion").metadata["conversion"] == "quantize"
    # The torchscript champion did not move.
    after = client.get_model_version_by_alias(sample_chain["name"] + "-scripted", "champion")
    assert after.version == scripted.version
    mlflow.set_tracking_uri(None)


def test_a_learning_rate_written_1e_3_keeps_autologs_params(experiment):
    """MLflow logs `-P learning_rate=1e-3` as the string "1e-3"; autolog then logs lr=0.001,
    and a clash would make autolog drop all its params. The step logs the value as Python
    prints it, so autolog's optimizer params are all there."""
    check(mlflow_run("train", {"learning_rate": "1e-3", "epochs": 1, "model": "mlp"}, experiment))
    (run,) = runs_of(experiment, "train", "FINISHED")
    params = run.data.params
    assert float(params["learning_rate"]) == 0.001
    for key in ("lr", "optimizer_name", "weight_decay", "epochs"):
        assert key in params, (key, sorted(params))
    assert float(params["lr"]) == 0.001 and params["optimizer_name"] in ("Adam", "AdamW", "SGD")
