"""Held-out evaluation shared by train, conversion parity and the promotion gate (torch only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from lightcycle.model.data import CLASS_NAMES, NUM_CLASSES, Split

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    per_class_accuracy: dict[str, float]
    confusion: np.ndarray  # (true, predicted) counts
    predictions: np.ndarray
    logits: np.ndarray = field(repr=False)

    def metrics(self, prefix: str = "test") -> dict[str, float]:
        out = {f"{prefix}_loss": self.loss, f"{prefix}_accuracy": self.accuracy}
        for name, acc in self.per_class_accuracy.items():
            out[f"{prefix}_accuracy_{metric_safe(name)}"] = acc
        return out


def metric_safe(name: str) -> str:
    return name.lower().replace("/", "_").replace("-", "_").replace(" ", "_")


def images_tensor(split: Split) -> torch.Tensor:
    return torch.from_numpy(split.images).unsqueeze(1).float()


@torch.no_grad()
def predict_logits(predictor: Predictor, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    chunks = [predictor(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks).float()


def summarize_logits(logits: torch.Tensor, target: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, predictions and the (true, predicted) confusion counts, on `logits`' device:
    nothing leaves the GPU until evaluate_logits copies the results out."""
    target = target.to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits, target)
    predictions = logits.argmax(1)
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=logits.device)
    confusion.index_put_((target, predictions), torch.ones_like(target), accumulate=True)
    return loss, predictions, confusion


def evaluate_logits(logits: torch.Tensor, labels: np.ndarray) -> Evaluation:
    loss, predictions, confusion = (t.cpu() for t in
                                    summarize_logits(logits, torch.from_numpy(labels)))
    predictions, confusion = predictions.numpy(), confusion.numpy()
    totals = confusion.sum(1)
    per_class = {
        name: float(confusion[i, i] / totals[i]) if totals[i] else float("nan")
        for i, name in enumerate(CLASS_NAMES)
    }
    return Evaluation(
        loss=loss.item(),
        accuracy=float((predictions == labels).mean()),
        per_class_accuracy=per_class,
        confusion=confusion,
        predictions=predictions,
        logits=logits.cpu().numpy(),
    )


def evaluate(predictor: Predictor, split: Split, device: torch.device | str | None = None
             ) -> Evaluation:
    """Evaluate a logits-producing callable (eager net, scripted module) on a split; the
    images go to `device` (default: the net's own, else the CPU)."""
    if isinstance(predictor, torch.nn.Module):
        predictor.eval()
        if device is None:
            device = next(iter(predictor.parameters()), torch.empty(0)).device
    images = images_tensor(split).to(device or "cpu")
    return evaluate_logits(predict_logits(predictor, images), split.labels)
