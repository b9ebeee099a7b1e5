"""The LightningModule that trains a plain net from `lightcycle.model.nets`.

The net stays a plain `nn.Module` (`self.net`): that is what gets logged, scripted and served.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from lightcycle import defaults
from lightcycle.model.datamodule import augment
from lightcycle.model.nets import build_net


class FashionClassifier(L.LightningModule):
    def __init__(
        self,
        model: str = defaults.TRAIN["model"],
        learning_rate: float = defaults.TRAIN["learning_rate"],
        weight_decay: float = defaults.TRAIN["weight_decay"],
        width: int | None = None,
        depth: int | None = None,
        augment: bool = True,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_net(model, width=width, depth=depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self.net(images)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean()
        self.log(f"{stage}_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{stage}_acc", acc, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):
        images, labels = batch
        if self.hparams.augment:
            images = augment(images)
        logits = self.net(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        acc = (logits.argmax(1) == labels).float().mean()
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train_acc", acc, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )
        total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.learning_rate, total_steps=max(1, int(total))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
