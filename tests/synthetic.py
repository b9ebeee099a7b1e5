"""Synthetic Fashion-MNIST data sets of any size, built from the bundled sample (never committed)."""

from __future__ import annotations

from pathlib import Path

FULL_SIZE = {"train": 60_000, "test": 10_000}


def write_idx(raw: Path, split: str, images, labels) -> None:
    """IDX files as Fashion-MNIST ships them: big-endian header, then unsigned bytes."""
    import struct

    from lightcycle.model.data import IMAGES_MAGIC, LABELS_MAGIC, SPLIT_FILES

    images_name, labels_name = SPLIT_FILES[split]
    raw.mkdir(parents=True, exist_ok=True)
    (raw / images_name).write_bytes(struct.pack(">iiii", IMAGES_MAGIC, len(images), 28, 28)
                                    + images.astype("uint8").tobytes())
    (raw / labels_name).write_bytes(struct.pack(">ii", LABELS_MAGIC, len(labels))
                                    + labels.astype("uint8").tobytes())


def synthetic_images(split: str, count: int, seed: int = 0):
    """`count` images built from the sample's split: tiled, each copy shifted by up to 2 pixels
    (the same label still fits a shifted garment), so every image is a plausible one."""
    import numpy as np

    from lightcycle.model import data

    sample = data.load_split(data.SAMPLE_DATA_DIR, split)
    index = np.arange(count) % len(sample)
    shifts = np.random.default_rng(seed).integers(-2, 3, size=(count, 2))
    shifts[: len(sample)] = 0  # the first copy is the sample itself
    images = np.empty((count, 28, 28), dtype=np.uint8)
    for dy, dx in {tuple(s) for s in shifts}:
        rows = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
        images[rows] = np.roll(sample.images[index[rows]], (dy, dx), axis=(1, 2))
    return images, sample.labels[index]


def synthetic_data_dir(root: Path, train: int, test: int) -> Path:
    """A data_dir (torchvision's layout) with `train` / `test` synthetic images."""
    for split, count in (("train", train), ("test", test)):
        write_idx(root / "FashionMNIST" / "raw", split, *synthetic_images(split, count))
    return root
