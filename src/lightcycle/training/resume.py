"""Resuming a train run that died: find the newest readable checkpoint of an equivalent failed run."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field

from mlflow.exceptions import MlflowException

from lightcycle.lifecycle import tracking

TAG_RESUMED_FROM = "lightcycle.resumed_from"
TAG_RESUMED_EPOCH = "lightcycle.resumed_from_epoch"
TAG_RESUMED_CHECKPOINT = "lightcycle.resumed_checkpoint"
_CHECKPOINT_TAG = "mlflow.latest_checkpoint_artifact"
# What a failed run must share with this one to be continued: the data (by digest, not by the
# data_dir string), the code version and every setting that changes the optimization.
RESUME_PARAMS = ("model", "epochs", "batch_size", "learning_rate", "weight_decay", "seed",
                 "precision", "val_fraction", "width", "depth", "devices", "num_nodes",
                 "engine", "num_processes")
# Rank 0 chooses; the processes Lightning starts for the other ranks inherit its environment
# and load exactly that checkpoint. Ranks started by another launcher (torchrun, SLURM) run the
# same search against the same server.
ENV_CHOICE = "LIGHTCYCLE_RESUME_CHOICE"
# Globals a checkpoint may name beyond tensors and plain containers. Lightning's checkpoint of
# this project's module (epoch, loops, optimizer and scheduler state, hyper_parameters as a dict)
# names none: torch.serialization.get_unsafe_globals_in_checkpoint returns [] for it. Anything
# else would run code while unpickling, and a checkpoint comes from a server other people write
# to (the code version and data digest that select it are hashes of public files).
CHECKPOINT_SAFE_GLOBALS: list = []
_PAGE = 500
_REPORTED = 10  # skipped checkpoints named one by one; the rest are counted


@dataclass(frozen=True)
class Resume:
    run_id: str
    artifact: str
    path: str
    epoch: int  # 0-based epoch the checkpoint was taken after


@dataclass
class Search:
    """What the search found, and every checkpoint or run it passed over, with the reason."""
    resume: Resume | None = None
    candidates: int = 0  # failed runs with the same settings, data and code
    skipped: list[str] = field(default_factory=list)

    def report(self) -> list[str]:
        lines = [f"resume: skipped {s}" for s in self.skipped[:_REPORTED]]
        if len(self.skipped) > _REPORTED:
            lines.append(f"resume: skipped {len(self.skipped) - _REPORTED} more")
        if self.resume is None:
            why = ("no earlier FAILED or KILLED train run has these settings, data and code"
                   if not self.candidates else
                   f"none of the {self.candidates} matching failed run(s) has a checkpoint "
                   "that loads safely (see above)")
            lines.append(f"resume: starting fresh: {why}")
        return lines


def load_checkpoint(path: str):
    """A Lightning checkpoint, unpickled with weights_only=True: tensors, plain containers and
    CHECKPOINT_SAFE_GLOBALS only. Raises pickle.UnpicklingError for anything else."""
    import torch

    with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def find_resumable_checkpoint(experiment_id: str, params: dict[str, object], data_digest: str,
                              dst: str) -> Search:
    """The newest checkpoint of an earlier train run that died (FAILED or KILLED) in this
    experiment with the same RESUME_PARAMS (canonical strings), data digest and code version;
    downloaded to `dst`. Every rank calls this; see ENV_CHOICE.

    Autolog logs a full Lightning checkpoint (weights, optimizer, scheduler, epoch) after each
    epoch, so resuming from it loses at most the epoch in progress. The tag naming the latest
    checkpoint is set before its file is uploaded: a file that is missing or unreadable falls
    back to the epoch before it. Every matching run is searched, page by page, newest first.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    search = Search()
    chosen = os.environ.get(ENV_CHOICE)
    if chosen is not None:
        if chosen:
            run_id, artifact = chosen.split(":", 1)
            search.candidates = 1
            search.resume = _download(client, run_id, [artifact], dst, search.skipped)
        return search
    query = (f"tags.`{tracking.TAG_ENTRY_POINT}` = 'train' "
             f"and tags.`{tracking.TAG_CODE_VERSION}` = '{tracking.code_version()}' "
             f"and tags.`{tracking.TAG_DATA_DIGEST}` = '{data_digest}'")
    expected = {k: tracking.canonical_param(params[k], params[k]) for k in RESUME_PARAMS}
    token = None
    while True:
        page = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"],
                                  max_results=_PAGE, page_token=token)
        for run in page:
            if run.info.status not in ("FAILED", "KILLED") or any(
                    tracking.canonical_param(run.data.params.get(k), params[k]) != expected[k]
                    for k in RESUME_PARAMS):
                continue
            search.candidates += 1
            search.resume = _resume_run(client, run, dst, search.skipped)
            if search.resume is not None:
                return search
        token = page.token
        if not token:
            return search


def _resume_run(client, run, dst: str, skipped: list[str]) -> Resume | None:
    run_id = run.info.run_id
    if _CHECKPOINT_TAG not in run.data.tags:
        skipped.append(f"run {run_id}: it died before its first checkpoint")
        return None
    filename = run.data.tags[_CHECKPOINT_TAG].rsplit("/", 1)[-1]
    try:
        epochs = sorted((int(f.path.rsplit("_", 1)[-1])
                         for f in client.list_artifacts(run_id, "checkpoints")
                         if f.is_dir and f.path.rsplit("/", 1)[-1].startswith("epoch_")),
                        reverse=True)
    except MlflowException as exc:
        skipped.append(f"run {run_id}: cannot list its checkpoints ({_short(exc)})")
        return None
    if not epochs:
        skipped.append(f"run {run_id}: no checkpoint was uploaded")
        return None
    return _download(client, run_id, [f"checkpoints/epoch_{e}/{filename}" for e in epochs], dst,
                     skipped)


def _download(client, run_id: str, artifacts: list[str], dst: str,
              skipped: list[str]) -> Resume | None:
    """The first of `artifacts` that downloads and loads whole, as weights only."""
    for artifact in artifacts:
        try:
            path = client.download_artifacts(run_id, artifact, dst)
            # Loading it here proves the upload is whole before Lightning relies on it.
            load_checkpoint(path)
        except pickle.UnpicklingError as exc:
            skipped.append(
                f"run {run_id} {artifact}: refused, it is not a plain-weights checkpoint and "
                f"loading it would run code ({_short(exc)}). Delete that run if nobody on your "
                "team made it.")
            continue
        except Exception as exc:  # noqa: BLE001 - a 403, a missing boto3, a full disk, a torn upload
            skipped.append(f"run {run_id} {artifact}: {_short(exc)}")
            continue
        return Resume(run_id, artifact, path, int(artifact.split("/")[1].rsplit("_", 1)[-1]))
    return None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


TAG_BEST_CHECKPOINT = "lightcycle.best_checkpoint"
_MONITOR = "val_loss"  # autolog's checkpoint_monitor in train


def prune_checkpoints(run_id: str) -> str:
    """Once a run has finished, keep its latest checkpoint (what a resume or a fine-tune starts
    from) and its best by val_loss; remove the others. Autolog keeps a full checkpoint with
    optimizer state for every epoch: 40 of them for a 40-epoch run. A run that dies is never
    pruned, so it resumes from its newest checkpoint as before. Returns a line for the log."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = MlflowClient()
    dirs = {int(f.path.rsplit("_", 1)[-1]): f.path
            for f in client.list_artifacts(run_id, "checkpoints")
            if f.is_dir and f.path.rsplit("/", 1)[-1].startswith("epoch_")}
    if not dirs:
        return "checkpoints: none logged"
    losses = {}
    for epoch, path in dirs.items():
        try:
            losses[epoch] = float(mlflow.artifacts.load_dict(
                f"runs:/{run_id}/{path}/checkpoint_metrics.json")[_MONITOR])
        except Exception:  # noqa: BLE001 - no metrics file or no val_loss: never the best
            continue
    latest = max(dirs)
    best = min(losses, key=lambda e: (losses[e], -e)) if losses else latest
    run = client.get_run(run_id)
    filename = run.data.tags.get(_CHECKPOINT_TAG, "checkpoint.pth").rsplit("/", 1)[-1]
    client.set_tag(run_id, TAG_BEST_CHECKPOINT, f"{dirs[best]}/{filename}")
    doomed = [e for e in sorted(dirs) if e not in (latest, best)]
    freed = sum(f.file_size or 0 for e in doomed for f in client.list_artifacts(run_id, dirs[e]))
    repo = get_artifact_repository(run.info.artifact_uri)
    try:
        for epoch in doomed:
            repo.delete_artifacts(dirs[epoch])
    except Exception as exc:  # noqa: BLE001 - a store without delete, or no permission to delete
        return (f"checkpoints: could not remove the older ones ({_short(exc)}); all "
                f"{len(dirs)} kept")
    score = f"{_MONITOR} {losses[best]:.4f}" if best in losses else f"no {_MONITOR}"
    kept = (f"epoch {latest + 1} (latest and best, {score})" if best == latest else
            f"epoch {latest + 1} (latest) and epoch {best + 1} (best, {score})")
    return (f"checkpoints: kept {kept}; removed "
            f"{len(doomed)} older ({freed / 1e6:.1f} MB)")


def share_choice(resume: Resume | None) -> None:
    """Rank 0: hand its choice to the rank processes Lightning is about to start."""
    os.environ[ENV_CHOICE] = f"{resume.run_id}:{resume.artifact}" if resume else ""
