"""Test machinery for `export.publish`: a deployable refused for a fault, then published."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import SAMPLE_DIR
from lightcycle.lifecycle import export, model_io, registry


def refused_then_published(net, prefix: str, method: str, fault, match: str, suffix: str,
                           monkeypatch) -> tuple[str, object, export.Deployable]:
    """Logs and registers `net` under a fresh name `<prefix>-<random>`, then publishes it by
    `method` twice. First with `fault` applied to what the product converts (patched where it
    converts): parity must refuse it (a ParityError matching `match`), its run must end FAILED
    and no `<name><suffix>` model may be registered. Then as it is: (the name, the source
    version, what publish returned)."""
    client = MlflowClient()
    name = f"{prefix}-{np.random.default_rng().integers(1 << 30)}"
    with mlflow.start_run() as run:
        info = model_io.log_eager_model(net)
    source, _ = registry.register_model(info.model_uri, name, run.info.run_id, {}, client)

    convert = export.convert
    with monkeypatch.context() as patch:  # the fault, injected where the product converts
        patch.setattr(export, "convert", lambda *args: fault(convert(*args)))
        with pytest.raises(export.ParityError, match=match):
            with mlflow.start_run() as failed:
                export.publish(f"models:/{name}/{source.version}", method, SAMPLE_DIR)
    assert mlflow.get_run(failed.info.run_id).info.status == "FAILED"
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_registered_model(name + suffix)

    with mlflow.start_run():
        return name, source, export.publish(f"models:/{name}/{source.version}", method, SAMPLE_DIR)
