"""The `train` entry point, through `mlflow run` against a real tracking server."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import PROJECT_ROOT, SAMPLE_DIR, check, mlflow_run, runs_of
from lightcycle.model import data

pytestmark = pytest.mark.slow


def _artifact_paths(client, run_id, path=None):
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return out


@pytest.fixture(scope="module")
def trained(tracking_server):
    """One `mlflow run . -e train` with 2 epochs, shared by the assertions below."""
    mlflow.set_tracking_uri(tracking_server.url)
    experiment_id = mlflow.create_experiment("train-entry-point")
    result = check(mlflow_run("train", {"epochs": 2}, experiment_id,
                              env={"MLFLOW_TRACKING_URI": tracking_server.url}))
    runs = runs_of(experiment_id)
    assert len(runs) == 1
    yield runs[0], result
    mlflow.set_tracking_uri(None)


def test_run_is_finished_and_tagged(trained, tracking_uri):
    run, _ = trained
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "train"
    assert run.data.tags["lightcycle.code_version"]
    assert run.data.tags["lightcycle.data_digest"] == data.dataset_digest(SAMPLE_DIR)


def test_hyperparameters_and_autolog_params(trained, tracking_uri):
    params = trained[0].data.params
    for key in ("model", "epochs", "batch_size", "learning_rate", "seed", "precision",
                "data_dir", "devices", "strategy", "weight_decay", "net_parameters"):
        assert key in params, key
    assert params["lr"] == params["learning_rate"] == "0.005"  # autolog kept its params
    assert params["optimizer_name"] == "AdamW"


def test_metrics_per_epoch_and_on_test_set(trained, tracking_uri):
    run, _ = trained
    metrics = run.data.metrics
    for key in ("train_loss", "val_loss", "val_acc", "test_loss", "test_accuracy",
                "test_accuracy_bag", "test_accuracy_ankle_boot"):
        assert key in metrics, key
    assert len(MlflowClient().get_metric_history(run.info.run_id, "val_loss")) == 2
    assert 0.0 <= metrics["test_accuracy"] <= 1.0


def test_dataset_inputs_carry_the_digest(trained, tracking_uri):
    inputs = trained[0].inputs.dataset_inputs
    contexts = {i.tags[0].value: i.dataset for i in inputs}
    assert set(contexts) == {"training", "testing"}
    assert contexts["training"].digest == data.dataset_digest(SAMPLE_DIR)


def test_artifacts_plots_tensorboard_checkpoint(trained, tracking_uri, tmp_path):
    run, _ = trained
    paths = _artifact_paths(MlflowClient(), run.info.run_id)
    assert "plots/confusion_matrix.png" in paths
    assert "plots/misclassified.png" in paths
    assert any(p.startswith("tensorboard/events.out.tfevents") for p in paths)
    assert run.data.tags["mlflow.latest_checkpoint_artifact"] in paths
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="plots",
                                                dst_path=str(tmp_path))
    assert (tmp_path / "plots/confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert local


def test_misclassified_figure_shows_each_wrong_image_with_its_labels():
    from lightcycle.model import reports

    test_images = data.load_split(str(SAMPLE_DIR), "test")
    predictions = test_images.labels.copy()
    wrong = [3, 50, 121]
    predictions[wrong] = (predictions[wrong] + 1) % 10
    fig = reports.misclassified_figure(test_images, predictions)
    [ax] = fig.axes
    captions = [t.get_text() for t in ax.texts]
    assert captions == [f"{data.CLASS_NAMES[test_images.labels[i]]}\nas "
                        f"{data.CLASS_NAMES[predictions[i]]}" for i in wrong]
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(ax.images[0].get_array()),
                                                       (28, 28))
    for i in wrong:  # each wrong image is in the picture, pixel for pixel
        assert (windows == test_images.images[i]).all(axis=(2, 3)).any(), i
    assert fig._suptitle.get_text().startswith("3 misclassified")


def test_tensorboard_events_are_readable(trained, tracking_uri, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = trained
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                artifact_path="tensorboard", dst_path=str(tmp_path))
    events = EventAccumulator(local)
    events.Reload()
    assert "val_loss" in events.Tags()["scalars"]


def test_model_has_signature_and_predicts_raw_pixels(trained, tracking_uri):
    run, _ = trained
    model_uri = run.data.tags["lightcycle.output_uri"]
    assert [o.model_id for o in run.outputs.model_outputs] == [model_uri.removeprefix("models:/")]
    import torch
    from mlflow.models import get_model_info

    from lightcycle.lifecycle.model_io import load_eager_net

    signature = get_model_info(model_uri).signature
    assert signature.inputs.inputs[0].shape == (-1, 1, 28, 28)
    assert signature.inputs.inputs[0].type == np.float32
    assert signature.outputs.inputs[0].shape == (-1, 10)
    test = data.load_split(SAMPLE_DIR, "test")
    with torch.no_grad():  # the eager net is a state_dict + spec: no pyfunc, nothing unpickled
        pixels = torch.from_numpy(test.images[:, None].astype(np.float32))
        logits = load_eager_net(model_uri)(pixels).numpy()
    assert logits.dtype == np.float32
    accuracy = float((logits.argmax(1) == test.labels).mean())
    assert accuracy > 0.3  # chance is 0.1; 2 epochs on 648 images


def test_progress_is_one_line_per_epoch_when_not_a_terminal(trained):
    _, result = trained
    lines = [l for l in result.stdout.splitlines() if l.startswith("epoch ")]
    assert [l.split()[1] for l in lines] == ["1/2", "2/2"]


def test_same_seed_gives_same_test_metrics(experiment):
    def once():
        subprocess.run([sys.executable, str(PROJECT_ROOT / "steps/train.py"), "--epochs", "1"],
                       check=True, capture_output=True, cwd=PROJECT_ROOT)
    once()
    once()
    runs = runs_of(experiment, "train", "FINISHED")
    assert len(runs) == 2
    first, second = (r.data.metrics for r in runs)
    assert first["test_loss"] == second["test_loss"]
    assert first["test_accuracy"] == second["test_accuracy"]


def test_ddp_on_two_cpu_processes_makes_one_run_and_one_model(experiment):
    result = check(mlflow_run("train", {"epochs": 1, "devices": 2, "strategy": "ddp"}, experiment))
    runs = runs_of(experiment)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert len(run.outputs.model_outputs) == 1
    assert "test_accuracy" in run.data.metrics
    assert run.data.params["world_size"] == "2"  # both processes trained
    # Metrics come from rank 0 only: had rank 1 logged too (it inherits MLFLOW_RUN_ID, so it
    # would write into this same run), each history would hold two values for the one epoch.
    client = MlflowClient()
    for key in ("val_loss", "train_loss", "test_accuracy", "fit_seconds"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 1, key
    assert result.stdout.count("run_id=") == 1  # only rank 0 reports
    assert result.stdout.count("epoch 1/1") == 1


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


_GPU = [pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("accelerator, precision", [
    ("cpu", "bf16-mixed"),
    pytest.param("gpu", "bf16-mixed", marks=_GPU),
    pytest.param("gpu", "16-mixed", marks=_GPU),
])
def test_16_bit_training_logs_a_float32_model(experiment, accelerator, precision):
    import torch
    from mlflow.models import get_model_info

    from lightcycle.lifecycle.model_io import load_eager_net, logits_signature

    check(mlflow_run("train", {"epochs": 1, "precision": precision,
                               "accelerator": accelerator}, experiment))
    run = runs_of(experiment, "train", "FINISHED")[0]
    uri = run.data.tags["lightcycle.output_uri"]
    signature = get_model_info(uri).signature
    assert signature == logits_signature()  # the float32 run's, as is
    assert signature.inputs.inputs[0].type == np.float32
    net = load_eager_net(uri)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    out = net(torch.zeros((2, 1, 28, 28)))
    assert out.dtype == torch.float32 and out.shape == (2, 10)


def test_bad_parameters_fail_before_training(experiment):
    result = mlflow_run("train", {"model": "vgg"}, experiment)
    assert result.returncode != 0
    assert "choose one of cnn, mlp, resnet18" in result.stderr
    assert "Traceback" not in result.stderr
    assert all(r.info.status == "FAILED" for r in runs_of(experiment))
