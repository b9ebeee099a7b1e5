"""The LightningModule that trains a plain net from `lightcycle.model.nets`.

The net stays a plain `nn.Module` (`self.net`): that is what gets logged, scripted and served.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightcycle import defaults
from lightcycle.model.data import CLASS_NAMES, NUM_CLASSES
from lightcycle.model.datamodule import augment
from lightcycle.model.evaluate import metric_safe
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
        # torchmetrics: states on the module's device, summed across ranks by compute().
        # nan_strategy="disable": the default checks every update for NaN with .item(), a
        # host sync per step on a GPU. validate_args=False: the labels are ours, checked once.
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_loss", MeanMetric(nan_strategy="disable"))
            setattr(self, f"{stage}_acc", MulticlassAccuracy(NUM_CLASSES, average="micro",
                                                             validate_args=False))
        self.val_class_acc = MulticlassAccuracy(NUM_CLASSES, average=None, validate_args=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, stage: str, logits: torch.Tensor, labels: torch.Tensor,
              loss: torch.Tensor) -> None:
        """Accumulate one batch into the stage's metrics: logged once per epoch, because
        `self.log` costs about 1 ms a call on a 2-core CPU, 7% of a small net's step."""
        # The batch's mean loss once per image, not weight=len(labels): with
        # nan_strategy="disable", torchmetrics 1.9's MeanMetric drops the weights (every batch
        # would count as much as the full ones, the last, short one included).
        getattr(self, f"{stage}_loss").update(loss.detach().expand(len(labels)))
        getattr(self, f"{stage}_acc").update(logits.detach(), labels)
        if stage == "val":
            self.val_class_acc.update(logits.detach(), labels)

    def _log_epoch(self, stage: str, **kwargs) -> None:
        """compute() gathers the metric states of every rank, so the logged value is the whole
        epoch's on each of them (the same number: sync_dist then averages equal values)."""
        values = {f"{stage}_loss": getattr(self, f"{stage}_loss").compute(),
                  f"{stage}_acc": getattr(self, f"{stage}_acc").compute()}
        if stage == "val":
            per_class = self.val_class_acc.compute()
            values.update({f"val_acc_{metric_safe(name)}": per_class[i]
                           for i, name in enumerate(CLASS_NAMES)})
            self.val_class_acc.reset()
        for name, value in values.items():
            self.log(name, value, prog_bar=name in ("train_loss", "val_loss", "val_acc",
                                                    "test_loss", "test_acc"),
                     sync_dist=True, batch_size=1, **kwargs)
        getattr(self, f"{stage}_loss").reset()
        getattr(self, f"{stage}_acc").reset()

    def _eval_step(self, stage: str, batch) -> None:
        images, labels = batch
        logits = self.net(images)
        self._step(stage, logits, labels, F.cross_entropy(logits, labels))

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def training_step(self, batch, batch_idx):
        images, labels = batch
        if self.hparams.augment:
            images = augment(images)
        logits = self.net(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self._step("train", logits, labels, loss)
        # With the epoch's last batch, not in on_train_epoch_end: callbacks (the epoch line,
        # MLflow's autolog) read the epoch's metrics in their own on_train_epoch_end, which
        # Lightning calls before the module's.
        if batch_idx == self.trainer.num_training_batches - 1:
            self._log_epoch("train", on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )
        total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.learning_rate, total_steps=max(1, int(total))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
