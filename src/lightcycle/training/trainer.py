"""The Lightning Trainer that train and tune share: hardware, precision and progress output."""

from __future__ import annotations

import os
import time

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightcycle.model.classifier import FashionClassifier
from lightcycle.model.datamodule import FashionMNISTDataModule
from lightcycle.training.config import TrainConfig, _cuda_available


def deterministic_setting(accelerator: str) -> bool | str:
    """Lightning's `deterministic` for `accelerator`: True on the CPU, "warn" elsewhere.

    The CPU kernels the nets use all have deterministic versions, so a seeded CPU run repeats
    its metrics exactly. On CUDA, `torch.use_deterministic_algorithms(True)` raises in the
    backward of `AdaptiveAvgPool2d` (the cnn pools 7x7 to 3x3; resnet18 pools to 1x1), which
    has no deterministic CUDA kernel: "warn" keeps every other op deterministic (cuDNN
    included), names the ones that are not, and trains. A seeded GPU run then repeats its
    metrics to within the float rounding of those atomic adds, not bit for bit.
    """
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not _cuda_available())
    return True if on_cpu else "warn"


def trainer_kwargs(cfg: TrainConfig) -> dict[str, object]:
    """The hardware and scale settings the Trainer gets, as the user chose them."""
    devices, num_nodes, strategy = cfg.trainer_devices, cfg.num_nodes, cfg.strategy
    if cfg.on_spark:
        # Each Spark task is one torchrun node with LOCAL_WORLD_SIZE processes (one, or the
        # task's GPUs): the Trainer must describe that layout, or Lightning refuses WORLD_SIZE.
        devices = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        num_nodes = max(1, int(os.environ.get("WORLD_SIZE", "1")) // devices)
        if strategy == "auto" and devices * num_nodes > 1:
            strategy = "ddp"
    return {
        "max_epochs": cfg.epochs,
        "accelerator": cfg.accelerator,
        "devices": devices,
        "num_nodes": num_nodes,
        "strategy": strategy,
        "precision": cfg.precision,
        "deterministic": deterministic_setting(cfg.accelerator),
    }


class EpochLine(Callback):
    """One line per epoch when stderr is not a terminal (CI logs, `mlflow run` captured)."""

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        fields = " ".join(
            f"{k}={float(m[k]):.4f}" for k in ("train_loss", "val_loss", "val_acc") if k in m
        )
        elapsed = time.perf_counter() - getattr(self, "_start", time.perf_counter())
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} {fields} ({elapsed:.1f}s)",
              flush=True)


def build_trainer(cfg: TrainConfig, log_dir: str | None, interactive: bool,
                  callbacks: tuple[Callback, ...] = ()) -> L.Trainer:
    """`log_dir`: where TensorBoard events go; None for tune's trials, which report to MLflow
    through their own callback."""
    progress = [] if interactive or log_dir is None else [EpochLine()]
    return L.Trainer(
        **trainer_kwargs(cfg),
        logger=TensorBoardLogger(save_dir=log_dir, name="tensorboard", version="") if log_dir else False,
        enable_checkpointing=False,  # autolog logs checkpoints to MLflow instead
        enable_progress_bar=interactive,
        enable_model_summary=interactive,
        callbacks=[*callbacks, *progress],
        log_every_n_steps=1,
    )


def build_model(cfg: TrainConfig) -> tuple[FashionClassifier, FashionMNISTDataModule]:
    """The LightningModule and the data it trains on, as `cfg` describes them (seeded)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = FashionMNISTDataModule(
        cfg.data_dir, cfg.batch_size, cfg.num_workers, cfg.val_fraction, cfg.seed
    )
    module = FashionClassifier(
        model=cfg.model, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        width=cfg.width or None, depth=cfg.depth or None,
    )
    return module, datamodule
