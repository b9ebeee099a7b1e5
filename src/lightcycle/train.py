"""Train a net with Lightning, MLflow autolog and everything autolog misses."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import lightning as L
import mlflow
import mlflow.pytorch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightcycle import data, model_io, reports, tracking
from lightcycle.classifier import FashionClassifier
from lightcycle.datamodule import FashionMNISTDataModule
from lightcycle.errors import UserError
from lightcycle.evaluate import evaluate
from lightcycle.nets import NET_NAMES

PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true")


@dataclass
class TrainConfig:
    model: str = "cnn"
    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 0.005
    weight_decay: float = 0.0001
    seed: int = 42
    data_dir: str = str(data.default_data_dir())
    download: bool = False
    precision: str = "32"
    accelerator: str = "cpu"
    devices: str = "1"
    strategy: str = "auto"
    num_workers: int = 0
    num_nodes: int = 1
    val_fraction: float = 0.1
    width: int = 0  # 0: the net's default
    depth: int = 0

    def validate(self) -> None:
        if self.model not in NET_NAMES:
            raise UserError(f"Unknown model {self.model!r}: choose one of {', '.join(NET_NAMES)}.")
        if self.precision not in PRECISIONS:
            raise UserError(
                f"Unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}."
            )
        gpu_asked = self.accelerator in ("gpu", "cuda")
        if gpu_asked and not _cuda_available():
            raise UserError(
                f"accelerator={self.accelerator} but this machine has no usable CUDA GPU "
                "(torch.cuda.is_available() is False): use accelerator=cpu, or run on a GPU node."
            )
        on_cpu = self.accelerator == "cpu" or (self.accelerator == "auto" and not _cuda_available())
        if self.precision == "16-mixed" and on_cpu:
            # Lightning would silently switch to bf16-mixed on the CPU; say so instead.
            raise UserError(
                "precision=16-mixed needs a GPU (accelerator=gpu); on the CPU use bf16-mixed."
            )
        for name in ("epochs", "batch_size", "num_nodes"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be positive, got {self.learning_rate}.")

        self._check_launcher_world_size()

    def _check_launcher_world_size(self) -> None:
        """Under torchrun (or anything that sets WORLD_SIZE), the launch must match the Trainer.

        Lightning's own message names no launcher flags; this one says which to change.
        """
        world = os.environ.get("WORLD_SIZE")
        if not world or not world.isdigit() or not self.devices.isdigit():
            return
        if int(world) != int(self.devices) * self.num_nodes:
            raise UserError(
                f"The launcher started {world} processes (WORLD_SIZE), but devices={self.devices} "
                f"x num_nodes={self.num_nodes} = {int(self.devices) * self.num_nodes}. Pass "
                "--devices <processes per node> --num_nodes <nodes>, e.g. torchrun "
                "--nproc-per-node=1 --nnodes=2 needs --devices 1 --num_nodes 2."
            )

    @property
    def trainer_devices(self) -> int | str:
        return int(self.devices) if self.devices.isdigit() else self.devices


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def trainer_kwargs(cfg: TrainConfig) -> dict[str, object]:
    """The hardware and scale settings the Trainer gets, as the user chose them."""
    return {
        "max_epochs": cfg.epochs,
        "accelerator": cfg.accelerator,
        "devices": cfg.trainer_devices,
        "num_nodes": cfg.num_nodes,
        "strategy": cfg.strategy,
        "precision": cfg.precision,
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


def build_trainer(cfg: TrainConfig, log_dir: str, interactive: bool) -> L.Trainer:
    return L.Trainer(
        **trainer_kwargs(cfg),
        logger=TensorBoardLogger(save_dir=log_dir, name="tensorboard", version=""),
        enable_checkpointing=False,  # autolog logs checkpoints to MLflow instead
        enable_progress_bar=interactive,
        enable_model_summary=interactive,
        callbacks=[] if interactive else [EpochLine()],
        deterministic=True,
        log_every_n_steps=1,
    )


def train(cfg: TrainConfig) -> str | None:
    """Train, evaluate on the held-out test set and log it all. Returns the run id on rank 0."""
    cfg.validate()
    rank_zero = tracking.is_global_rank_zero()
    # Every rank checks, before any of them trains or joins the process group: an unreachable
    # server then stops each node at once with the same message, instead of rank 0 failing
    # alone after an epoch and the others waiting on it.
    tracking.check_tracking_server()
    if rank_zero:
        data.prepare(cfg.data_dir, download=cfg.download)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = FashionMNISTDataModule(
        cfg.data_dir, cfg.batch_size, cfg.num_workers, cfg.val_fraction, cfg.seed
    )
    module = FashionClassifier(
        model=cfg.model, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        width=cfg.width or None, depth=cfg.depth or None,
    )
    interactive = sys.stderr.isatty()
    with tempfile.TemporaryDirectory(prefix="lightcycle-train-") as log_dir:
        trainer = build_trainer(cfg, log_dir, interactive)
        if not rank_zero:
            # Other ranks train and nothing else: one run, one model, metrics from rank 0.
            trainer.fit(module, datamodule=datamodule)
            return None
        return _train_and_log(cfg, trainer, module, datamodule, log_dir)


def _train_and_log(cfg, trainer, module, datamodule, log_dir) -> str:
    digest = data.dataset_digest(cfg.data_dir)
    with mlflow.start_run() as run:
        mlflow.set_tags(tracking.step_tags("train"))
        mlflow.pytorch.autolog(
            log_models=False,  # logged below as float32 with a signature (autolog has none in bf16)
            log_datasets=False,
            checkpoint=True,
            checkpoint_monitor="val_loss",
            checkpoint_save_best_only=False,
            silent=True,
        )
        tracking.log_params_once({
            **dataclasses.asdict(cfg),
            "net_parameters": sum(p.numel() for p in module.net.parameters()),
            "world_size": trainer.world_size,
        })
        mlflow.set_tag(tracking.TAG_DATA_DIGEST, digest)
        train_split = data.load_split(cfg.data_dir, "train")
        test_split = data.load_split(cfg.data_dir, "test")
        _log_dataset(train_split, cfg.data_dir, "training", digest)
        _log_dataset(test_split, cfg.data_dir, "testing", digest)

        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        mlflow.log_metric("fit_seconds", time.perf_counter() - start)

        net = module.net.float().cpu().eval()
        result = evaluate(net, test_split)
        mlflow.log_metrics(result.metrics("test"))
        mlflow.log_figure(reports.confusion_matrix_figure(result.confusion),
                          "plots/confusion_matrix.png")
        mlflow.log_figure(reports.misclassified_figure(test_split, result.predictions),
                          "plots/misclassified.png")
        mlflow.log_artifacts(os.path.join(log_dir, "tensorboard"), "tensorboard")

        info = model_io.log_eager_model(net, test_accuracy=result.accuracy, data_digest=digest)
        mlflow.set_tags({tracking.TAG_OUTPUT_URI: info.model_uri,
                         tracking.TAG_MODEL_ID: info.model_id})
        print(f"test_accuracy={result.accuracy:.4f} test_loss={result.loss:.4f}")
        print(f"run_id={run.info.run_id} model_uri={info.model_uri}")
        return run.info.run_id


def _log_dataset(split: data.Split, data_dir: str, context: str, digest: str) -> None:
    dataset = mlflow.data.from_numpy(
        split.images,
        targets=split.labels,
        source=os.path.abspath(data.raw_dir(data_dir)),
        name=f"fashion-mnist-{'train' if context == 'training' else 'test'}",
        digest=digest,
    )
    mlflow.log_input(dataset, context=context)
