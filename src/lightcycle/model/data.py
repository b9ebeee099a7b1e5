"""FashionMNIST in its own IDX format: strict reading, seeded splits and a content digest.

Only torch is needed here (no Lightning), so evaluation and conversion steps can use it.
`data_dir` follows torchvision's convention: it is the root that contains
`FashionMNIST/raw/`, so an existing torchvision download works as is.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightcycle import defaults
from lightcycle.errors import UserError

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

PROJECT_ROOT = Path(__file__).resolve().parents[3]
SAMPLE_DATA_DIR = PROJECT_ROOT / defaults.DATA_DIR


class DataError(UserError):
    """Bad or missing data. The message names the file and says how to fix it."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, 28, 28)
    labels: np.ndarray  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)


def default_data_dir() -> Path:
    return SAMPLE_DATA_DIR


def raw_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "FashionMNIST" / "raw"


_FIX = (
    "Point data_dir at the directory that contains FashionMNIST/raw/ (torchvision's layout; "
    "the bundled sample is data/sample), or pass download=true to fetch the full data set."
)


def _read_header(path: Path, magic: int, ndim: int) -> tuple[bytes, tuple[int, ...]]:
    if not path.is_file():
        raise DataError(f"Missing data file {path}. {_FIX}")
    blob = path.read_bytes()
    header_len = 4 + 4 * ndim
    if len(blob) < header_len:
        raise DataError(
            f"Corrupt header in {path}: the file has {len(blob)} bytes, fewer than the "
            f"{header_len}-byte IDX header. Re-download the file (download=true) or restore it."
        )
    (found_magic,) = struct.unpack(">i", blob[:4])
    if found_magic != magic:
        raise DataError(
            f"Wrong magic number in {path}: found {found_magic} (0x{found_magic & 0xFFFFFFFF:08x}),"
            f" expected {magic} (0x{magic:08x}). This is not an IDX "
            f"{'image' if ndim == 3 else 'label'} file, or it is gzipped: gunzip it or "
            "re-download with download=true."
        )
    dims = struct.unpack(f">{ndim}i", blob[4:header_len])
    if any(d < 0 for d in dims) or (ndim == 3 and dims[1:] != (IMAGE_SIZE, IMAGE_SIZE)):
        raise DataError(
            f"Corrupt header in {path}: dimensions {dims}, expected (N, 28, 28) for images or "
            "(N,) for labels. Re-download the file (download=true) or restore it."
        )
    body = blob[header_len:]
    expected = int(np.prod(dims))
    if len(body) != expected:
        raise DataError(
            f"Truncated or padded file {path}: the header announces {dims[0]} records "
            f"({expected} bytes of data) but the file holds {len(body)} bytes. "
            "Re-download the file (download=true) or restore it."
        )
    return body, dims


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    body, dims = _read_header(Path(path), IMAGES_MAGIC, 3)
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


def read_idx_labels(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    body, _ = _read_header(path, LABELS_MAGIC, 1)
    labels = np.frombuffer(body, dtype=np.uint8).astype(np.int64)
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        raise DataError(
            f"Labels out of range in {path}: {bad.size} labels outside 0..{NUM_CLASSES - 1} "
            f"(first at record {int(bad[0])}, value {int(labels[bad[0]])}). "
            "The file is corrupt or not FashionMNIST: re-download it (download=true)."
        )
    return labels


def load_split(data_dir: str | os.PathLike, split: str) -> Split:
    """Read and validate one split ("train" or "test") from `data_dir`."""
    root = raw_dir(data_dir)
    if not Path(data_dir).is_dir():
        raise DataError(f"Missing data directory {data_dir}. {_FIX}")
    if not root.is_dir():
        raise DataError(f"Missing directory {root} (data_dir={data_dir}). {_FIX}")
    images_name, labels_name = SPLIT_FILES[split]
    images = read_idx_images(root / images_name)
    labels = read_idx_labels(root / labels_name)
    if len(images) != len(labels):
        raise DataError(
            f"Mismatched counts in {root}: {images_name} holds {len(images)} images but "
            f"{labels_name} holds {len(labels)} labels. The two files come from different "
            "downloads: restore both from the same source (download=true)."
        )
    return Split(images=images, labels=labels)


def prepare(data_dir: str | os.PathLike, download: bool = False) -> None:
    """Fetch the data set with torchvision when asked; afterwards it must read cleanly."""
    if download:
        # torchvision is only needed to download; reading is ours so errors are precise.
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(root=str(data_dir), train=train, download=True)
    for split in SPLIT_FILES:
        load_split(data_dir, split)


def dataset_digest(data_dir: str | os.PathLike) -> str:
    """sha256 over the four raw files (names and contents): what the model was trained on."""
    digest = hashlib.sha256()
    root = raw_dir(data_dir)
    for split in ("train", "test"):
        for name in SPLIT_FILES[split]:
            digest.update(name.encode())
            digest.update((root / name).read_bytes())
    return digest.hexdigest()[:16]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split of the train set; the test set stays untouched."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])
