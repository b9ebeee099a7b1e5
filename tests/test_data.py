"""Data behaviour: the bundled sample reads cleanly, and every kind of bad data gets a clear error."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from conftest import SAMPLE_DIR, check, copy_sample, mlflow_run, runs_of
from lightcycle.model import data
from lightcycle.model.data import DataError


def test_sample_matches_torchvision_reader():
    from torchvision.datasets import FashionMNIST

    ours = data.load_split(SAMPLE_DIR, "train")
    theirs = FashionMNIST(str(SAMPLE_DIR), train=True, download=False)
    assert ours.images.shape == (720, 28, 28)
    np.testing.assert_array_equal(ours.images, theirs.data.numpy())
    np.testing.assert_array_equal(ours.labels, theirs.targets.numpy())
    assert len(data.load_split(SAMPLE_DIR, "test")) == 180


def test_sample_has_every_class_and_its_notice():
    for split in ("train", "test"):
        counts = np.bincount(data.load_split(SAMPLE_DIR, split).labels, minlength=10)
        assert (counts == counts[0]).all() and counts[0] > 0
    assert "MIT License" in (SAMPLE_DIR / "README.md").read_text()


def test_validation_split_is_seeded_and_disjoint():
    train_a, val_a = data.split_indices(720, 0.1, seed=1)
    train_b, val_b = data.split_indices(720, 0.1, seed=1)
    _, val_c = data.split_indices(720, 0.1, seed=2)
    np.testing.assert_array_equal(val_a, val_b)
    assert not np.array_equal(val_a, val_c)
    assert len(val_a) == 72 and not set(train_a) & set(val_a)


def test_digest_changes_with_content(tmp_path):
    root = copy_sample(tmp_path)
    before = data.dataset_digest(root)
    assert before == data.dataset_digest(SAMPLE_DIR)
    labels = data.raw_dir(root) / "t10k-labels-idx1-ubyte"
    blob = bytearray(labels.read_bytes())
    blob[-1] = (blob[-1] + 1) % 10
    labels.write_bytes(bytes(blob))
    assert data.dataset_digest(root) != before


# --- bad data: one case each; the message names the file and the fix -------------------------

def _raw(root):
    return data.raw_dir(root)


def _truncate(root):
    path = _raw(root) / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    return path.name, "Truncated"


def _corrupt_header(root):
    path = _raw(root) / "train-images-idx3-ubyte"
    blob = bytearray(path.read_bytes())
    blob[8:12] = struct.pack(">i", 32)  # rows = 32, not 28
    path.write_bytes(bytes(blob))
    return path.name, "Corrupt header"


def _short_header(root):
    path = _raw(root) / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:5])
    return path.name, "Corrupt header"


def _wrong_magic(root):
    path = _raw(root) / "train-labels-idx1-ubyte"
    blob = bytearray(path.read_bytes())
    blob[0:4] = struct.pack(">i", 2051)
    path.write_bytes(bytes(blob))
    return path.name, "Wrong magic number"


def _missing_file(root):
    path = _raw(root) / "t10k-images-idx3-ubyte"
    path.unlink()
    return path.name, "Missing data file"


def _mismatched_counts(root):
    # A consistent label file with fewer records than the image file.
    path = _raw(root) / "train-labels-idx1-ubyte"
    labels = path.read_bytes()[8:][:700]
    path.write_bytes(struct.pack(">ii", 2049, len(labels)) + labels)
    return "train-labels-idx1-ubyte", "Mismatched counts"


def _label_out_of_range(root):
    path = _raw(root) / "t10k-labels-idx1-ubyte"
    blob = bytearray(path.read_bytes())
    blob[8 + 17] = 12
    path.write_bytes(bytes(blob))
    return path.name, "Labels out of range"


def _missing_directory(root):
    import shutil

    shutil.rmtree(root / "FashionMNIST")
    return "FashionMNIST/raw", "Missing directory"


BAD_DATA = {
    "missing_directory": _missing_directory,
    "missing_file": _missing_file,
    "truncated_file": _truncate,
    "corrupt_header": _corrupt_header,
    "short_header": _short_header,
    "wrong_magic": _wrong_magic,
    "mismatched_counts": _mismatched_counts,
    "labels_out_of_range": _label_out_of_range,
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_fails_clearly_and_leaves_no_finished_run(case, tmp_path, experiment):
    from lightcycle.training.config import TrainConfig
    from lightcycle.training.train import train

    root = copy_sample(tmp_path)
    culprit, kind = BAD_DATA[case](root)
    with pytest.raises(DataError) as excinfo:
        train(TrainConfig(data_dir=str(root), epochs=1))
    message = str(excinfo.value)
    assert kind in message
    assert culprit in message
    assert "download=true" in message or "data_dir" in message  # says how to fix it
    assert runs_of(experiment, status="FINISHED") == []


def test_missing_data_dir_marks_mlflow_run_failed_without_traceback(tmp_path, experiment):
    result = mlflow_run("train", {"data_dir": tmp_path / "nowhere", "epochs": 1}, experiment)
    assert result.returncode != 0
    assert "Missing data directory" in result.stderr
    assert "Traceback" not in result.stderr
    runs = runs_of(experiment)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"


def test_download_flag_uses_torchvision_layout(tmp_path):
    # Offline: torchvision finds the files already in place and does not download.
    root = copy_sample(tmp_path)
    data.prepare(root, download=True)
    assert len(data.load_split(root, "test")) == 180
    with pytest.raises(DataError, match="Missing data directory"):
        data.prepare(tmp_path / "empty", download=False)
