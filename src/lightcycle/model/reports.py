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
    wrong = np.flatnonzero(predictions != split.labels)[:limit]
    cols = 6
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.8))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, idx in zip(np.atleast_1d(axes).ravel(), wrong):
        ax.imshow(split.images[idx], cmap="gray_r")
        ax.set_title(
            f"{CLASS_NAMES[split.labels[idx]]}\nas {CLASS_NAMES[predictions[idx]]}", fontsize=7
        )
    fig.suptitle(f"{len(wrong)} misclassified test images (true / predicted)")
    fig.tight_layout()
    return fig
