"""Tensor code follows its input's device: training, evaluation and the parity check.

The `meta` device finds a CPU tensor mixed into a GPU computation without a GPU: such a mix
raises "Tensor on device meta is not on the expected device cpu!" as CUDA would. Where CUDA
exists the same tests run on it too (marked `gpu`). Meta tensors hold no values, so on `meta`
each test stops where results are copied to the host; on CUDA it goes all the way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SAMPLE_DIR
from lightcycle.model import data
from lightcycle.model.datamodule import augment
from lightcycle.model.nets import build_net, example_input

DEVICES = [
    pytest.param("meta", id="meta_device"),
    pytest.param("cuda", id="cuda_device", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]


@pytest.fixture
def deterministic():
    """The Trainer's setting on every accelerator (True on the CPU, "warn" on CUDA): torchmetrics
    then counts per-class hits without bincount, which has no meta kernel."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)


def _batch(device: str, n: int = 8):
    images = example_input(n).to(device)
    labels = torch.arange(n, device=device) % data.NUM_CLASSES
    return images, labels


@pytest.mark.parametrize("device", DEVICES)
def test_augment_follows_its_input(device):
    images, _ = _batch(device)
    assert augment(images).device.type == device
    # A seeded CPU generator (tests, benchmarks) draws on the CPU; the result still follows.
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.device.type == device and out.shape == images.shape


@pytest.mark.parametrize("device", DEVICES)
def test_training_and_validation_steps_follow_the_module(device, deterministic):
    import lightning as L

    from lightcycle.model.classifier import FashionClassifier

    module = FashionClassifier()
    # Attached but not fitting: num_training_batches is inf, so no epoch is logged mid-test.
    module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                               enable_model_summary=False)
    module.to(device)
    loss = module.training_step(_batch(device), 0)
    assert loss.device.type == device and loss.shape == ()
    loss.backward()
    assert all(p.grad.device.type == device for p in module.net.parameters()
               if p.grad is not None)
    module.validation_step(_batch(device), 0)
    for metric in (module.train_loss, module.train_acc, module.val_loss, module.val_acc):
        assert metric.compute().device.type == device
    assert module.val_class_acc.compute().shape == (data.NUM_CLASSES,)
    if device != "meta":
        assert 0.0 <= float(module.val_acc.compute()) <= 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_follows_the_logits(device):
    from lightcycle.model.evaluate import evaluate, predict_logits, summarize_logits

    split = data.load_split(SAMPLE_DIR, "test")
    net = build_net("cnn").eval().to(device)
    images = torch.from_numpy(split.images[:16]).unsqueeze(1).float().to(device)
    logits = predict_logits(net, images)
    loss, predictions, confusion = summarize_logits(logits, torch.from_numpy(split.labels[:16]))
    assert {t.device.type for t in (logits, loss, predictions, confusion)} == {device}
    assert confusion.shape == (data.NUM_CLASSES, data.NUM_CLASSES)
    if device != "meta":
        on_device = evaluate(net, split)
        on_cpu = evaluate(net.cpu(), split)
        assert on_device.confusion.sum() == len(split)
        np.testing.assert_array_equal(on_device.predictions, on_cpu.predictions)


@pytest.mark.parametrize("device", DEVICES)
def test_parity_comparison_follows_the_reference(device):
    from lightcycle.lifecycle.export import Reference, accuracy_drop, differences

    net = build_net("mlp").eval()
    images = example_input(8)
    candidate = net(images)  # a deployable's logits, computed on the CPU
    net.to(device)
    reference = net(images.to(device))
    max_diff, mismatches = differences(reference, candidate)
    labels = torch.arange(8, device=device)
    drop = accuracy_drop(reference, candidate, labels)
    assert {t.device.type for t in (max_diff, mismatches, drop)} == {device}
    if device != "meta":
        assert float(max_diff) < 1e-4 and int(mismatches) == 0
        parity = Reference(images.to(device), reference, labels.cpu().numpy()).check(net)
        assert parity.ok


def test_cpu_evaluation_counts_every_image_once():
    from lightcycle.model.evaluate import evaluate

    split = data.load_split(SAMPLE_DIR, "test")
    result = evaluate(build_net("cnn").eval(), split)
    assert result.confusion.sum() == len(split)
    assert result.confusion.sum(1).tolist() == np.bincount(split.labels, minlength=10).tolist()
    np.testing.assert_array_equal(np.diag(result.confusion),
                                  np.bincount(split.labels[result.predictions == split.labels],
                                              minlength=10))
    assert result.accuracy == pytest.approx(float((result.predictions == split.labels).mean()))
