"""The onnx deployable (`method=onnx`, issue 32): parity on the graph ONNX Runtime runs can pass
and fail, and a graph that fails it is never logged or registered."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import SAMPLE_DIR
from lightcycle.lifecycle import export, model_io, registry
from lightcycle.model import data
from lightcycle.model.evaluate import images_tensor, predict_logits
from lightcycle.model.nets import build_net
from publishing import refused_then_published


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_net("cnn").eval()


@pytest.fixture(scope="module")
def reference(net):
    test = data.load_split(SAMPLE_DIR, "test")
    images = images_tensor(test)
    return export.Reference(images, predict_logits(net, images), test.labels)


@pytest.fixture(scope="module")
def graph(net, reference):
    return export.convert(net, "onnx", reference.images[:2])


def shifted(graph, logit: int = 3, by: float = 1e3):
    """A copy of `graph` whose head adds `by` to one class's logit."""
    import onnx
    from onnx import numpy_helper

    changed = onnx.ModelProto()
    changed.CopyFrom(graph)
    bias = next(t for t in changed.graph.initializer if list(t.dims) == [10])
    values = numpy_helper.to_array(bias).copy()
    values[logit] += by
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    return changed


def test_onnx_graph_matches_eager_on_every_test_image(graph, reference):
    _, stage, parity = export.check_onnx(graph, reference)
    assert parity.ok and stage == "exported", parity.describe()
    assert parity.images == 180 and parity.max_abs_diff <= export.PARITY_ATOL


@pytest.mark.parametrize("batch", [1, 7, 64, export.MAX_BATCH])
def test_the_batch_dimension_is_dynamic(graph, batch):
    logits = export.onnx_logits(graph.SerializeToString(), torch.zeros(batch, 1, 28, 28))
    assert logits.shape == (batch, 10)


def test_onnx_parity_fails_when_the_graph_moves_a_logit(graph, reference):
    _, _, parity = export.check_onnx(shifted(graph), reference)
    assert not parity.ok and parity.argmax_mismatches > 0, parity.describe()
    assert "predictions differ" in parity.describe()


def test_the_onnx_pyfunc_never_imports_torch(graph, tmp_path):
    """In this process torch is loaded already, so the check is on the code the model logs:
    the onnx path of serving_model.py imports onnxruntime, never torch."""
    import ast

    tree = ast.parse(export.SERVING_MODEL_CODE.read_text())
    onnx_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "OnnxGraph")
    imported = {alias.name for node in ast.walk(onnx_class)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module for node in ast.walk(onnx_class)
                                            if isinstance(node, ast.ImportFrom)}
    assert "onnxruntime" in imported and not {n for n in imported if n.split(".")[0] == "torch"}, imported
    module_level = {alias.name.split(".")[0] for node in tree.body
                    if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in node.names} | {node.module.split(".")[0] for node in tree.body
                                                if isinstance(node, ast.ImportFrom) and node.module}
    assert "torch" not in module_level, module_level


@pytest.mark.slow
def test_publish_onnx_logs_a_torch_free_deployable_or_nothing(net, tracking_uri, experiment,
                                                             monkeypatch):
    name, source, result = refused_then_published(
        net, "onnx", "onnx", shifted, "onnx model \\(onnx\\) does not match", registry.ONNX_SUFFIX,
        monkeypatch)
    client = MlflowClient()
    assert result.version.name == name + registry.ONNX_SUFFIX
    assert result.parity.ok and result.stage == "exported"
    mv = client.get_model_version_by_alias(result.version.name, registry.CHALLENGER)
    assert mv.version == result.version.version
    assert mv.tags[export.TAG_METHOD] == "onnx/exported"
    assert mv.tags[registry.TAG_SOURCE_VERSION] == f"models:/{name}/{source.version}"
    assert float(mv.tags[export.TAG_PARITY_MAX_DIFF]) <= export.PARITY_ATOL
    assert mv.tags[export.TAG_PARITY_ARGMAX] == "0"
    assert "onnx" in mv.description and "predictions differ" in mv.description
    assert "no torch" in client.get_registered_model(result.version.name).description

    local = mlflow.artifacts.download_artifacts(result.version.uri)
    requirements = open(f"{local}/requirements.txt").read()
    assert "onnxruntime==" in requirements and "torch" not in requirements, requirements
    model = mlflow.pyfunc.load_model(local)
    metadata = model.metadata.metadata
    assert metadata["format"] == "onnx" and "torch_version" not in metadata
    assert metadata["onnxruntime_version"] == model_io.package_version("onnxruntime")
    test = data.load_split(SAMPLE_DIR, "test")
    answer = model.predict(test.images.astype(np.float32))
    eager = predict_logits(net, images_tensor(test)).argmax(1).numpy()
    np.testing.assert_array_equal(answer["class_id"].to_numpy(), eager)
