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

    @staticmethod
    def _summed(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss x images, correct answers and images of one batch: summed over an epoch and
        logged once at its end, because `self.log` costs about 1 ms a call on a 2-core CPU
        (Lightning checks and moves its result store every time), 7% of a small net's step."""
        return torch.stack([loss.detach().float() * len(labels),
                            (logits.argmax(1) == labels).sum().float(),
                            torch.tensor(float(len(labels)), device=loss.device)])

    def _log_means(self, stage: str, sums: torch.Tensor, **kwargs) -> None:
        loss_sum, correct, seen = sums
        self.log(f"{stage}_loss", loss_sum / seen, prog_bar=True, sync_dist=True, batch_size=1,
                 **kwargs)
        self.log(f"{stage}_acc", correct / seen, prog_bar=stage != "train", sync_dist=True,
                 batch_size=1, **kwargs)

    def _step(self, batch) -> None:
        images, labels = batch
        logits = self.net(images)
        self._eval_sums += self._summed(F.cross_entropy(logits, labels), logits, labels)

    def on_validation_epoch_start(self) -> None:
        self._eval_sums = torch.zeros(3, device=self.device)

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._log_means("val", self._eval_sums)

    def on_test_epoch_end(self) -> None:
        self._log_means("test", self._eval_sums)

    def on_train_epoch_start(self) -> None:
        self._epoch_sums = torch.zeros(3, device=self.device)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        if self.hparams.augment:
            images = augment(images)
        logits = self.net(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self._epoch_sums += self._summed(loss, logits, labels)
        # With the epoch's last batch, not in on_train_epoch_end: callbacks (the epoch line,
        # MLflow's autolog) read the epoch's metrics in their own on_train_epoch_end, which
        # Lightning calls before the module's.
        if batch_idx == self.trainer.num_training_batches - 1:
            self._log_means("train", self._epoch_sums, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch)

    def test_step(self, batch, batch_idx):
        self._step(batch)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )
        total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.learning_rate, total_steps=max(1, int(total))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
