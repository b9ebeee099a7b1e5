"""The LightningModule's metrics (torchmetrics): the same epoch values on one process and on two
DDP processes, because their states are summed across ranks before they are logged."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT, SAMPLE_DIR
from lightcycle.model import data
from lightcycle.model.evaluate import metric_safe

pytestmark = pytest.mark.slow

VAL_IMAGES = 72  # 10% of the sample's 720 training images


def _validate(devices: int) -> dict[str, float]:
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "tests/ddp_validate.py"),
                             str(devices), str(SAMPLE_DIR)], capture_output=True, text=True,
                            timeout=600, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    [line] = [l for l in result.stdout.splitlines() if l.startswith("METRICS ")]
    return json.loads(line.removeprefix("METRICS "))


def test_two_ddp_processes_log_the_epoch_accuracy_of_one():
    one, two = _validate(1), _validate(2)
    per_class = [f"val_acc_{metric_safe(name)}" for name in data.CLASS_NAMES]
    assert set(one) == set(two) == {"val_loss", "val_acc", *per_class}
    # Each rank saw half the images; the logged value is the whole epoch's, within one image.
    assert abs(one["val_acc"] - two["val_acc"]) <= 1 / VAL_IMAGES + 1e-9
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    # 72 images split evenly, none repeated: each class's accuracy is the same ratio. (A mean
    # of the ranks' own ratios, as sync_dist alone would give, is not: their counts differ.)
    for name in per_class:
        assert two[name] == pytest.approx(one[name], abs=1e-6), name
    # And they are the epoch's values: what the same net gives on all 72 images at once.
    loss, accuracy = _eager_validation()
    assert one["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert one["val_acc"] == pytest.approx(accuracy)


def _eager_validation() -> tuple[float, float]:
    import lightning as L
    import torch

    from lightcycle.defaults import VAL_FRACTION
    from lightcycle.model.classifier import FashionClassifier
    from lightcycle.model.datamodule import to_tensors

    L.seed_everything(0, verbose=False)  # as ddp_validate.py: the same initial weights
    net = FashionClassifier(model="cnn").net.eval()
    images, labels = to_tensors(data.load_split(SAMPLE_DIR, "train"))
    _, val = data.split_indices(len(labels), VAL_FRACTION, seed=42)
    with torch.no_grad():
        logits = net(images[val])
    loss = torch.nn.functional.cross_entropy(logits, labels[val])
    return float(loss), float((logits.argmax(1) == labels[val]).float().mean())
