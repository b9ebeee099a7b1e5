"""PNG reports logged with a run: confusion matrix and a grid of misclassified test images."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lightcycle.model.data import CLASS_NAMES, Split  # noqa: E402


def confusion_matrix_figure(confusion: np.ndarray, title: str = "Test confusion matrix"):
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = confusion.max() / 2 if confusion.size else 0
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > threshold else "black", fontsize=8)
    fig.tight_layout()
    return fig


def misclassified_figure(split: Split, predictions: np.ndarray, limit: int = 36):
    """Up to `limit` misclassified images, 6 per row, each captioned "true / as predicted".

    One image of all tiles on one axes: a grid of 36 axes took 1.3 s to lay out and draw in
    every train run, this takes 0.2 s (BENCHMARKS.md)."""
    wrong = np.flatnonzero(predictions != split.labels)[:limit]
    cols = 6
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    tile_w, tile_h = 28 + 12, 28 + 14  # pixels per tile: margins, and room for the caption
    montage = np.zeros((rows * tile_h, cols * tile_w), dtype=np.uint8)
    inch = 1.6 / tile_w  # 1.6 inches per tile, as wide as the montage's aspect allows
    height = rows * tile_h * inch
    fig = plt.figure(figsize=(cols * tile_w * inch, height + 0.4))
    ax = fig.add_axes((0, 0, 1, height / (height + 0.4)))
    for n, idx in enumerate(wrong):
        top, left = (n // cols) * tile_h + 14, (n % cols) * tile_w + 6
        montage[top:top + 28, left:left + 28] = split.images[idx]
        ax.text(left + 14, top - 1.5, f"{CLASS_NAMES[split.labels[idx]]}\n"
                f"as {CLASS_NAMES[predictions[idx]]}", ha="center", va="bottom", fontsize=7)
    ax.imshow(montage, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    fig.suptitle(f"{len(wrong)} misclassified test images (true / predicted)", y=0.995,
                 va="top")
    return fig
