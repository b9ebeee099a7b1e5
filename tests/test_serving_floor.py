"""The deployable's forward path (issue 24): TorchScript's optimizing executor off, one intra-op
thread for small batches; the answers are the archive's own, and the refusals are unchanged."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lightcycle.lifecycle import export
from lightcycle.model.nets import build_net, example_input
from lightcycle.serving import serving_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(the deployable's model dir, its archive), saved as the chain saves them."""
    import mlflow.pyfunc

    torch.manual_seed(0)
    archive = str(tmp_path_factory.mktemp("floor") / "model.pt")
    export.save_archive(torch.jit.freeze(torch.jit.script(build_net("cnn").eval())), archive)
    model_dir = str(tmp_path_factory.mktemp("floor") / "model")
    mlflow.pyfunc.save_model(model_dir, **export.deployable_model_kwargs(archive, "torchscript"))
    return model_dir, archive


@pytest.fixture(scope="module")
def classifier(saved):
    import mlflow.pyfunc

    model_dir, archive = saved
    model = mlflow.pyfunc.load_model(model_dir)
    return model.unwrap_python_model(), torch.jit.load(archive).eval()


@pytest.mark.parametrize("batch", [1, serving_model.SMALL_BATCH, serving_model.SMALL_BATCH + 1, 64])
def test_probabilities_are_the_archives_own(classifier, batch):
    wrapper, archive = classifier
    pixels = example_input(batch)
    with torch.inference_mode():
        expected = torch.softmax(archive(pixels), dim=1).numpy()
    got = wrapper.predict(None, pixels.numpy())
    np.testing.assert_allclose(np.stack(got["probabilities"]), expected, rtol=1e-5, atol=1e-6)


def test_small_batches_use_one_thread_and_large_ones_the_configured_count(classifier):
    wrapper, _ = classifier
    seen = {}

    def in_a_pool_thread():  # as the scoring server runs each request
        wrapper.predict(None, example_input(1).numpy())
        seen["small"] = torch.get_num_threads()
        wrapper.predict(None, example_input(64).numpy())
        seen["large"] = torch.get_num_threads()

    thread = threading.Thread(target=in_a_pool_thread)
    thread.start()
    thread.join()
    assert seen == {"small": 1, "large": wrapper.runtime.threads}


@pytest.mark.parametrize("bad", [np.full((1, 1, 28, 28), 300.0), np.full((1, 1, 28, 28), np.nan),
                                 np.zeros((1, 784)), np.zeros((0, 1, 28, 28))])
def test_the_forward_path_still_refuses_bad_input(classifier, bad):
    wrapper, _ = classifier
    from mlflow.exceptions import MlflowException

    # The model's own copy of serving_model.py raised it (models from code), so not this
    # module's InputError class: its message and code say what it is.
    with pytest.raises(MlflowException, match="expected raw pixels") as raised:
        wrapper.predict(None, bad)
    assert raised.value.get_http_status_code() == 400


@pytest.mark.parametrize("batch", [1, 64])
def test_the_scoring_server_writes_the_same_answer_with_the_c_json_encoder(saved, monkeypatch,
                                                                            batch):
    """Loaded in MLflow's scoring server, the deployable has the server write its records with
    `json.dumps` (C encoder) instead of `json.dump` (pure Python): the same bytes as MLflow's own
    writer, through the server's whole request handler; other outputs still take MLflow's."""
    import io
    import json

    import pandas as pd
    from mlflow.pyfunc import scoring_server

    writer = scoring_server.predictions_to_json
    mlflow_writer = getattr(writer, "__wrapped__", writer)
    # As the server process has it; restored after the test, with MLflow's own functions.
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    monkeypatch.setattr(scoring_server, "predictions_to_json", mlflow_writer)
    monkeypatch.setattr(scoring_server, "infer_and_parse_data", scoring_server.infer_and_parse_data)
    model = scoring_server.load_model_with_mlflow_config(saved[0])
    assert scoring_server.predictions_to_json is not mlflow_writer  # the deployable's writer

    pixels = example_input(batch).numpy()
    response = scoring_server.invocations(json.dumps({"inputs": pixels.tolist()}),
                                          "application/json", model, None)
    assert response.status == 200, response.response[:500]
    records = model.predict(pixels)
    assert type(records) is list and len(records) == batch
    expected = io.StringIO()
    mlflow_writer(records, expected)
    assert response.response == expected.getvalue()

    # Anything but the deployable's records goes to MLflow's writer unchanged.
    for other, metadata in ((pd.DataFrame({"a": [1.5]}), None), (records, {"m": 1})):
        ours, theirs = io.StringIO(), io.StringIO()
        scoring_server.predictions_to_json(other, ours, metadata)
        mlflow_writer(other, theirs, metadata)
        assert ours.getvalue() == theirs.getvalue()


@pytest.fixture(scope="module")
def saved_onnx(tmp_path_factory):
    """(the onnx deployable's model dir, its graph file), saved as the chain saves them."""
    import mlflow.pyfunc

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("floor-onnx")
    archive = str(tmp / "model.onnx")
    export.save_archive(export.convert(build_net("cnn").eval(), "onnx", example_input(2)), archive)
    mlflow.pyfunc.save_model(str(tmp / "model"), **export.deployable_model_kwargs(archive, "onnx"))
    return str(tmp / "model"), archive


@pytest.mark.parametrize("env, threads", [({"LIGHTCYCLE_TORCH_THREADS": "2"}, 2),
                                          ({"OMP_NUM_THREADS": "1"}, 1)])
def test_the_onnx_graph_keeps_the_thread_settings_by_batch_size(saved_onnx, monkeypatch, env,
                                                                threads):
    """One intra-op thread up to SMALL_BATCH images, the configured count above it; and the
    answers are ONNX Runtime's own for the graph, at both sizes."""
    import mlflow.pyfunc
    import onnxruntime

    model_dir, archive = saved_onnx
    for name in ("LIGHTCYCLE_TORCH_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runtime = mlflow.pyfunc.load_model(model_dir).unwrap_python_model().runtime
    assert runtime.small.get_session_options().intra_op_num_threads == 1
    assert runtime.large.get_session_options().intra_op_num_threads == threads
    reference = onnxruntime.InferenceSession(archive, providers=["CPUExecutionProvider"])
    for batch in (serving_model.SMALL_BATCH, serving_model.SMALL_BATCH + 1):
        pixels = example_input(batch).numpy()
        logits = reference.run(None, {export.ONNX_INPUT: pixels})[0]
        expected = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(runtime(pixels), expected / expected.sum(1, keepdims=True),
                                   rtol=1e-5, atol=1e-6)
