"""Read images for prediction: IDX files, PNGs (a file or a directory), parquet or CSV of pixels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lightcycle.model import data
from lightcycle.errors import UserError

PIXEL_COLUMNS = 28 * 28
_HOW = ("an IDX image file (e.g. t10k-images-idx3-ubyte), a 28x28 grayscale PNG, a directory "
        "of such PNGs, or a .parquet/.csv with 784 pixel columns")


def load_images(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Return (names, pixels) with pixels float32 (N, 1, 28, 28) in 0-255."""
    path = Path(path)
    if path.is_dir():
        pngs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not pngs:
            raise UserError(f"{path} holds no .png files; expected {_HOW}.")
        return [p.name for p in pngs], np.stack([_png(p) for p in pngs])[:, None]
    if not path.is_file():
        raise UserError(f"Input {path} does not exist; expected {_HOW}.")
    suffix = path.suffix.lower()
    if suffix == ".png":
        return [path.name], _png(path)[None, None]
    if suffix in (".parquet", ".csv"):
        return _table(path)
    images = data.read_idx_images(path).astype(np.float32)
    return [f"{path.name}[{i}]" for i in range(len(images))], images[:, None]


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    if pixels.shape != (28, 28):
        raise UserError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]} pixels; expected 28x28.")
    return pixels


def _table(path: Path) -> tuple[list[str], np.ndarray]:
    import pandas as pd

    frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    pixel_columns = [c for c in frame.columns if str(c) not in ("label", "name", "id")]
    if len(pixel_columns) != PIXEL_COLUMNS:
        raise UserError(f"{path} has {len(pixel_columns)} pixel columns; expected {PIXEL_COLUMNS} "
                        "(28x28, row-major), plus optional name/label columns.")
    pixels = frame[pixel_columns].to_numpy(dtype=np.float32).reshape(-1, 1, 28, 28)
    names = frame["name"].astype(str).tolist() if "name" in frame else [
        f"{path.name}[{i}]" for i in range(len(frame))]
    return names, pixels
