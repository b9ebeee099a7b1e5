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

        resume = find_resumable_checkpoint(run.info.run_id, log_dir)
        if resume is not None:
            mlflow.set_tags({TAG_RESUMED_FROM: resume.run_id,
                             TAG_RESUMED_EPOCH: str(resume.epoch),
                             TAG_RESUMED_CHECKPOINT: resume.artifact})
            print(f"resuming from run {resume.run_id}: checkpoint {resume.artifact} "
                  f"(epoch {resume.epoch + 1} of {cfg.epochs} done)", flush=True)
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.path if resume else None)
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


TAG_RESUMED_FROM = "lightcycle.resumed_from"
TAG_RESUMED_EPOCH = "lightcycle.resumed_from_epoch"
TAG_RESUMED_CHECKPOINT = "lightcycle.resumed_checkpoint"
_CHECKPOINT_TAG = "mlflow.latest_checkpoint_artifact"
_RESUME_PARAMS = ("model", "epochs", "batch_size", "learning_rate", "weight_decay", "seed",
                  "data_dir", "precision", "val_fraction", "width", "depth")


@dataclass(frozen=True)
class Resume:
    run_id: str
    artifact: str
    path: str
    epoch: int  # 0-based epoch the checkpoint was taken after


def find_resumable_checkpoint(run_id: str, dst: str) -> Resume | None:
    """The newest checkpoint of an earlier train run that died (FAILED or KILLED) in this
    experiment with the same parameters and code version; downloaded to `dst`.

    Autolog logs a full Lightning checkpoint (weights, optimizer, scheduler, epoch) after each
    epoch, so resuming from it loses at most the epoch in progress. The tag naming the latest
    checkpoint is set before its file is uploaded: a file that is missing or unreadable falls
    back to the epoch before it. Checkpoints are pickles: only this experiment's own train runs,
    on the same tracking server, are ever loaded.
    """
    import torch
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    current = client.get_run(run_id)
    params = {k: current.data.params.get(k) for k in _RESUME_PARAMS}
    query = (f"tags.`{tracking.TAG_ENTRY_POINT}` = 'train' "
             f"and tags.`{tracking.TAG_CODE_VERSION}` = "
             f"'{current.data.tags.get(tracking.TAG_CODE_VERSION, '')}'")
    candidates = client.search_runs([current.info.experiment_id], query,
                                    order_by=["attributes.start_time DESC"], max_results=50)
    for run in candidates:
        if (run.info.run_id == run_id or run.info.status not in ("FAILED", "KILLED")
                or _CHECKPOINT_TAG not in run.data.tags
                or any(run.data.params.get(k) != v for k, v in params.items())):
            continue
        filename = run.data.tags[_CHECKPOINT_TAG].rsplit("/", 1)[-1]
        try:
            epochs = sorted((int(f.path.rsplit("_", 1)[-1])
                             for f in client.list_artifacts(run.info.run_id, "checkpoints")
                             if f.is_dir and f.path.rsplit("/", 1)[-1].startswith("epoch_")),
                            reverse=True)
        except MlflowException:
            continue
        for epoch in epochs:
            artifact = f"checkpoints/epoch_{epoch}/{filename}"
            try:
                path = client.download_artifacts(run.info.run_id, artifact, dst)
                # Loading it here proves the upload is whole before Lightning relies on it.
                torch.load(path, map_location="cpu", weights_only=False)
            except Exception:  # noqa: BLE001 - a torn upload may fail in many ways: try older
                continue
            return Resume(run.info.run_id, artifact, path, epoch)
    return None


def _log_dataset(split: data.Split, data_dir: str, context: str, digest: str) -> None:
    dataset = mlflow.data.from_numpy(
        split.images,
        targets=split.labels,
        source=os.path.abspath(data.raw_dir(data_dir)),
        name=f"fashion-mnist-{'train' if context == 'training' else 'test'}",
        digest=digest,
    )
    # Two train runs logging the same dataset at once race inside MLflow's server (it looks the
    # dataset up, then inserts it): the loser gets a unique-constraint error. Once the winner's
    # row exists, logging again only links it to this run.
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except mlflow.exceptions.MlflowException as exc:
            text = str(exc).lower()
            if attempt == 2 or not ("unique" in text or "duplicate" in text):
                raise
            time.sleep(0.5 * (attempt + 1))
