"""Train a net with Lightning, MLflow autolog and everything autolog misses."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time

import mlflow
import mlflow.pytorch

from lightcycle.lifecycle import connection, model_io, tracking
from lightcycle.model import data, reports
from lightcycle.model.evaluate import evaluate
from lightcycle.training import resume as resuming
from lightcycle.training.config import TrainConfig
from lightcycle.training.trainer import build_model, build_trainer


def train(cfg: TrainConfig) -> str | None:
    """Train, evaluate on the held-out test set and log it all. Returns the run id on rank 0.

    This process's part of the training: all of it, or its rank's under a launcher or in a
    Spark task (lightcycle.training.spark_train calls this; this module never imports it)."""
    cfg.validate()
    rank_zero = tracking.is_global_rank_zero()
    # Every rank checks, before any of them trains or joins the process group: an unreachable
    # server then stops each node at once with the same message, instead of rank 0 failing
    # alone after an epoch and the others waiting on it.
    connection.check_tracking_server()
    # Every rank: local rank 0 of each node downloads, the others wait for it, so no rank
    # hashes or reads a file that is still being written.
    data.prepare_once(cfg.data_dir, cfg.download, cfg.data_mirror)
    module, datamodule = build_model(cfg)
    interactive = sys.stderr.isatty()
    with tempfile.TemporaryDirectory(prefix="lightcycle-train-") as log_dir:
        trainer = build_trainer(cfg, log_dir, interactive)
        if not rank_zero:
            # Other ranks train and nothing else: one run, one model, metrics from rank 0.
            # They resume from the checkpoint rank 0 chose, or their weights and epoch
            # counters would part from rank 0's.
            search = _find_resume(cfg, data.dataset_digest(cfg.data_dir), log_dir)
            _announce(search, cfg, trainer.global_rank)
            _fit(trainer, module, datamodule, search)
            return None
        return _train_and_log(cfg, trainer, module, datamodule, log_dir)


def _find_resume(cfg: TrainConfig, digest: str, log_dir: str) -> resuming.Search:
    if not cfg.resume:
        return resuming.Search()
    # Private, and kept on purpose: the search runs before this step's run starts, and MLflow
    # has no public "the experiment a new run would go to" (MLFLOW_EXPERIMENT_ID/_NAME, the
    # `mlflow run --experiment-*` choice, else Default). tests/test_code.py fails if it moves.
    from mlflow.tracking.fluent import _get_experiment_id

    return resuming.find_resumable_checkpoint(_get_experiment_id(), dataclasses.asdict(cfg),
                                              digest, log_dir)


def _announce(search: resuming.Search, cfg: TrainConfig, rank: int) -> None:
    resume = search.resume
    if resume is not None:
        print(f"rank {rank}: resuming from run {resume.run_id}: checkpoint {resume.artifact} "
              f"(epoch {resume.epoch + 1} of {cfg.epochs} done)", flush=True)
    if rank == 0:
        lines = search.report() if cfg.resume else ["resume: off (resume=false): starting fresh"]
        for line in lines:
            print(line, flush=True)


def _fit(trainer, module, datamodule, search: resuming.Search) -> None:
    # weights_only: Lightning's own default for a local checkpoint is False (it would unpickle
    # anything); the file came from the tracking server, so only plain weights are loaded.
    import torch

    with torch.serialization.safe_globals(resuming.CHECKPOINT_SAFE_GLOBALS):
        trainer.fit(module, datamodule=datamodule,
                    ckpt_path=search.resume.path if search.resume else None, weights_only=True)


def _train_and_log(cfg, trainer, module, datamodule, log_dir) -> str:
    digest = data.dataset_digest(cfg.data_dir)
    with mlflow.start_run() as run:
        tracking.label_step_run("train", f"{cfg.model}-{cfg.epochs}ep")
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

        search = _find_resume(cfg, digest, log_dir)
        resume = search.resume
        resuming.share_choice(resume)
        if resume is not None:
            mlflow.set_tags({resuming.TAG_RESUMED_FROM: resume.run_id,
                             resuming.TAG_RESUMED_EPOCH: str(resume.epoch),
                             resuming.TAG_RESUMED_CHECKPOINT: resume.artifact})
        _announce(search, cfg, trainer.global_rank)
        start = time.perf_counter()
        _fit(trainer, module, datamodule, search)
        mlflow.log_metric("fit_seconds", time.perf_counter() - start)

        net = module.net.float().cpu().eval()
        result = evaluate(net, test_split)
        mlflow.log_metrics(result.metrics("test"))
        mlflow.log_figure(reports.confusion_matrix_figure(result.confusion),
                          "plots/confusion_matrix.png")
        mlflow.log_figure(reports.misclassified_figure(test_split, result.predictions),
                          "plots/misclassified.png")
        mlflow.log_artifacts(os.path.join(log_dir, "tensorboard"), "tensorboard")

        info = model_io.log_eager_model(net, cfg.model, test_accuracy=result.accuracy,
                                        data_digest=digest)
        mlflow.set_tags({tracking.TAG_OUTPUT_URI: info.model_uri,
                         tracking.TAG_MODEL_ID: info.model_id})
        print(resuming.prune_checkpoints(run.info.run_id), flush=True)
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
