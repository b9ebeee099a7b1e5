"""Resuming a train run that died: find the newest readable checkpoint of an equivalent failed run."""

from __future__ import annotations

import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Resume:
    run_id: str
    artifact: str
    path: str
    epoch: int  # 0-based epoch the checkpoint was taken after


def find_resumable_checkpoint(experiment_id: str, params: dict[str, object], data_digest: str,
                              dst: str) -> Resume | None:
    """The newest checkpoint of an earlier train run that died (FAILED or KILLED) in this
    experiment with the same RESUME_PARAMS (canonical strings), data digest and code version;
    downloaded to `dst`. Every rank calls this; see ENV_CHOICE.

    Autolog logs a full Lightning checkpoint (weights, optimizer, scheduler, epoch) after each
    epoch, so resuming from it loses at most the epoch in progress. The tag naming the latest
    checkpoint is set before its file is uploaded: a file that is missing or unreadable falls
    back to the epoch before it. Checkpoints are pickles: only this experiment's own train runs,
    on the same tracking server, are ever loaded.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    chosen = os.environ.get(ENV_CHOICE)
    if chosen is not None:
        if not chosen:
            return None
        run_id, artifact = chosen.split(":", 1)
        return _download(client, run_id, [artifact], dst)
    query = (f"tags.`{tracking.TAG_ENTRY_POINT}` = 'train' "
             f"and tags.`{tracking.TAG_CODE_VERSION}` = '{tracking.code_version()}' "
             f"and tags.`{tracking.TAG_DATA_DIGEST}` = '{data_digest}'")
    candidates = client.search_runs([experiment_id], query,
                                    order_by=["attributes.start_time DESC"], max_results=50)
    expected = {k: tracking.canonical_param(params[k], params[k]) for k in RESUME_PARAMS}
    for run in candidates:
        if (run.info.status not in ("FAILED", "KILLED") or _CHECKPOINT_TAG not in run.data.tags
                or any(tracking.canonical_param(run.data.params.get(k), params[k]) != expected[k]
                       for k in RESUME_PARAMS)):
            continue
        filename = run.data.tags[_CHECKPOINT_TAG].rsplit("/", 1)[-1]
        try:
            epochs = sorted((int(f.path.rsplit("_", 1)[-1])
                             for f in client.list_artifacts(run.info.run_id, "checkpoints")
                             if f.is_dir and f.path.rsplit("/", 1)[-1].startswith("epoch_")),
                            reverse=True)
        except MlflowException:
            continue
        found = _download(client, run.info.run_id,
                          [f"checkpoints/epoch_{epoch}/{filename}" for epoch in epochs], dst)
        if found is not None:
            return found
    return None


def _download(client, run_id: str, artifacts: list[str], dst: str) -> Resume | None:
    """The first of `artifacts` that downloads and loads whole."""
    import torch

    for artifact in artifacts:
        try:
            path = client.download_artifacts(run_id, artifact, dst)
            # Loading it here proves the upload is whole before Lightning relies on it.
            torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - a torn upload may fail in many ways: try older
            continue
        return Resume(run_id, artifact, path, int(artifact.split("/")[1].rsplit("_", 1)[-1]))
    return None


def share_choice(resume: Resume | None) -> None:
    """Rank 0: hand its choice to the rank processes Lightning is about to start."""
    os.environ[ENV_CHOICE] = f"{resume.run_id}:{resume.artifact}" if resume else ""
