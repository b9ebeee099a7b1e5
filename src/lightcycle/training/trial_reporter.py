"""The Lightning callback that reports a trial's epochs to MLflow and Optuna, and stops a pruned one."""

from __future__ import annotations

import math
import time

import mlflow
import optuna
from lightning.pytorch.callbacks import Callback
from mlflow import MlflowClient

OBJECTIVE = "val_loss"  # minimized; val_acc on the sample's 72 validation images ties too often


class TrialReporter(Callback):
    """Per-epoch validation metrics to the trial's run and to Optuna; stops a pruned trial.

    Pruning sets `should_stop` instead of raising inside Lightning, so the Trainer finishes
    its epoch cleanly; the objective raises TrialPruned after fit.
    """

    def __init__(self, trial: optuna.Trial, run_id: str) -> None:
        self.trial = trial
        self.run_id = run_id
        self.client = MlflowClient()
        self.pruned = False
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k in ("val_loss", "val_acc", "train_loss", "train_acc")}
        epoch = trainer.current_epoch
        self.history.append(metrics)
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            mlflow.entities.Metric(k, v, now, epoch) for k, v in metrics.items()])
        value = metrics.get(OBJECTIVE, math.nan)
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            self.pruned = True
            trainer.should_stop = True
