"""The promotion gate: evaluate the challenger on held-out data; move `champion` only if it earns it.

Challenger and champion are both evaluated here, now, through the same pyfunc path that
serving uses, on the same test set, so the comparison is like for like even if a user moved
an alias by hand since the last promotion. No Lightning is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlflow
import numpy as np
from mlflow import MlflowClient

from lightcycle.lifecycle import model_io, promotion_lock, registry, tracking
from lightcycle.model import data

MAX_REQUEST = 1024  # the deployable refuses larger batches (serving_model.DEFAULT_MAX_BATCH)
TAG_DECISION = "lightcycle.gate.decision"
TAG_ACCURACY = "lightcycle.gate.accuracy"
TAG_MIN_ACCURACY = "lightcycle.gate.min_accuracy"
TAG_CHAMPION_ACCURACY = "lightcycle.gate.champion_accuracy"
TAG_GATE_RUN = "lightcycle.gate.run_id"
TAG_CHAMPION_AFTER = "lightcycle.gate.champion_after"  # on the promote run: "" for none


@dataclass(frozen=True)
class GateResult:
    candidate: registry.ModelRef
    accuracy: float
    champion: registry.ModelRef | None
    champion_accuracy: float | None
    promoted: bool
    reason: str


def pyfunc_accuracy(model_uri: str, split: data.Split, batch_size: int = MAX_REQUEST) -> float:
    """Accuracy through the served pyfunc, in requests it accepts (at most MAX_REQUEST images)."""
    model = model_io.load_pyfunc(model_uri)
    pixels = split.images[:, None].astype(np.float32)
    class_ids = []
    for start in range(0, len(pixels), batch_size):
        predictions = model.predict(pixels[start:start + batch_size])
        class_ids.append(np.asarray(predictions["class_id"] if hasattr(predictions, "columns")
                                    else np.asarray(predictions).argmax(1)))
    return float((np.concatenate(class_ids) == split.labels).mean())


def decide(accuracy: float, min_accuracy: float, champion_accuracy: float | None) -> tuple[bool, str]:
    if not accuracy > min_accuracy:
        return False, f"accuracy {accuracy:.4f} does not beat min_accuracy {min_accuracy:.4f}"
    if champion_accuracy is not None and accuracy < champion_accuracy:
        return False, (f"accuracy {accuracy:.4f} is worse than the champion's "
                       f"{champion_accuracy:.4f}")
    if champion_accuracy is None:
        return True, f"accuracy {accuracy:.4f} beats min_accuracy {min_accuracy:.4f}; no champion yet"
    return True, (f"accuracy {accuracy:.4f} beats min_accuracy {min_accuracy:.4f} and is not "
                  f"worse than the champion's {champion_accuracy:.4f}")


def promote(
    model_name: str,
    min_accuracy: float,
    version: str = "",
    data_dir: str | os.PathLike = data.default_data_dir(),
) -> GateResult:
    """Gate `version` (default: the version holding `challenger`). Needs an active run."""
    client = MlflowClient()
    version = version or registry.CHALLENGER
    uri = f"models:/{model_name}/{version}" if version.isdigit() else f"models:/{model_name}@{version}"
    candidate = registry.resolve(uri, client)
    split = data.load_split(data_dir, "test")

    accuracy = pyfunc_accuracy(candidate.uri, split)
    run_id = mlflow.active_run().info.run_id
    # Read champion, compare, move: under the registry-side lock, so two promotes at once
    # cannot both compare against the same old champion and let the later, worse one win.
    with promotion_lock.promotion_lock(client, model_name, run_id) as lease:
        return _gate(client, model_name, candidate, accuracy, min_accuracy, split, run_id, lease)


def _gate(client: MlflowClient, model_name: str, candidate: registry.ModelRef, accuracy: float,
          min_accuracy: float, split: data.Split, run_id: str,
          lease: promotion_lock.Lease) -> GateResult:
    current = registry.alias_version(client, model_name, registry.CHAMPION)
    champion = registry.ModelRef(model_name, current.version) if current else None
    champion_accuracy = None
    if champion and champion.version != candidate.version:
        champion_accuracy = pyfunc_accuracy(champion.uri, split)
    promoted, reason = decide(accuracy, min_accuracy, champion_accuracy)
    already_champion = champion is not None and champion.version == candidate.version
    if already_champion:
        promoted, reason = False, f"version {candidate.version} already holds champion ({reason})"

    metrics = {"gate_accuracy": accuracy, "gate_min_accuracy": min_accuracy,
               "gate_promoted": float(promoted)}
    if champion_accuracy is not None:
        metrics["gate_champion_accuracy"] = champion_accuracy
    mv = client.get_model_version(model_name, candidate.version)
    # Linked to the version's logged model too, so its page shows the accuracy. The version's
    # `model_id` comes back empty here (3.17); its source is the logged model's URI.
    model_id = mv.source.removeprefix("models:/") if mv.source.startswith("models:/m-") else None
    mlflow.log_metrics(metrics, model_id=model_id)
    mlflow.set_tags({TAG_DECISION: "promoted" if promoted else "rejected",
                     "lightcycle.gate.reason": reason,
                     "lightcycle.gate.candidate": candidate.uri,
                     tracking.TAG_OUTPUT_URI: candidate.uri})
    decision_tags = {
        TAG_DECISION: "promoted" if promoted else ("champion" if already_champion else "rejected"),
        TAG_ACCURACY: f"{accuracy:.6g}",
        TAG_MIN_ACCURACY: f"{min_accuracy:g}",
        TAG_CHAMPION_ACCURACY: "" if champion_accuracy is None else f"{champion_accuracy:.6g}",
        TAG_GATE_RUN: run_id,
    }
    for key, value in decision_tags.items():
        client.set_model_version_tag(model_name, candidate.version, key, value)
    # The version's description gets the verdict: where a person choosing a champion looks.
    client.update_model_version(model_name, candidate.version, description=registry.with_gate_line(
        mv.description, f"{decision_tags[TAG_DECISION]}: {reason} (promote run {run_id})"))
    if promoted:
        lease.check()  # fencing: the lock may have been broken while the champion was evaluated
        # `previous` first: if the second call fails, champion still points at a good version.
        if champion:
            client.set_registered_model_alias(model_name, registry.PREVIOUS, champion.version)
        client.set_registered_model_alias(model_name, registry.CHAMPION, candidate.version)
    after = candidate if promoted else champion
    mlflow.set_tag(TAG_CHAMPION_AFTER, after.version if after else "")
    return GateResult(candidate, accuracy, champion, champion_accuracy, promoted, reason)

