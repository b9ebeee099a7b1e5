"""Model registry: idempotent registration with lineage tags, alias moves, URI resolution.

No torch, no Lightning: registering and promoting must start fast.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from lightcycle.lifecycle import connection, tracking
from lightcycle.errors import UserError

DEFAULT_MODEL_NAME = "lightcycle-fashion"
SCRIPTED_SUFFIX = "-scripted"
PT2_SUFFIX = "-pt2"
INT8_SUFFIX = "-int8"
ONNX_SUFFIX = "-onnx"

# Lineage tags on model versions.
TAG_SOURCE_RUN = "lightcycle.source_run_id"
TAG_SOURCE_VERSION = "lightcycle.source_version"  # eager version a deployable was made from
TAG_TEST_ACCURACY = "lightcycle.test_accuracy"

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def deployable_name(model_name: str, fmt: str = "torchscript") -> str:
    """`<name>-scripted` for TorchScript, `<name>-pt2` for torch.export, `<name>-int8` for the
    int8 TorchScript, `<name>-onnx` for ONNX: each has its own versions and its own champion,
    so serving one never picks up another by accident."""
    return model_name + {"pt2": PT2_SUFFIX, "int8": INT8_SUFFIX,
                         "onnx": ONNX_SUFFIX}.get(fmt, SCRIPTED_SUFFIX)


# What the Models page shows a person choosing which version to move `champion` to.
_FORMAT_WORDS = {"torchscript": "a TorchScript archive (`torch.jit`)",
                 "pt2": "a torch.export (pt2) archive",
                 "int8": "an int8 TorchScript archive (post-training static quantization)",
                 "onnx": "an ONNX graph (`torch.onnx.export`) run by ONNX Runtime"}
GATE_LINE = "- Gate: "


def registered_model_description(name: str, fmt: str | None = None, source: str = "") -> str:
    """What the registered model `name` holds, its input contract and how to serve it; `fmt`
    None for the eager net, else the deployable's format (`source`: its eager model's name)."""
    if fmt is None:
        return (
            "lightcycle's FashionMNIST classifier as trained: the eager PyTorch net "
            "(`mlflow.pytorch`, pickle format), one version per `train` run, registered by the "
            "`register` step.\n\n"
            "**Input**: float32 raw pixels 0-255, shape (N, 1, 28, 28); the net normalizes "
            "them itself. **Output**: (N, 10) logits, classes T-shirt/top ... Ankle boot.\n\n"
            f"**Serving**: serve its deployable, `{name}{SCRIPTED_SUFFIX}` (made by `mlflow run . "
            f"-e torchscript -P model_uri=models:/{name}/<version>`), not this model: loading "
            "it unpickles code, so load only versions you trust.")
    runtime = ("onnxruntime, numpy and pandas: no torch" if fmt == "onnx"
               else "torch, numpy and pandas only")
    return (
        f"lightcycle's FashionMNIST classifier, deployable: {_FORMAT_WORDS[fmt]} behind a small "
        f"pyfunc ({runtime}), converted from a version of `{source}` by the "
        "`torchscript` step, with parity checked against it. The `promote` step gates each "
        "version on the held-out test set and moves the `champion` alias.\n\n"
        "**Input** (`POST /invocations`, JSON): `{\"inputs\": [[[[...]]]]}`, raw pixels 0-255 "
        "as (N, 1, 28, 28) or (N, 28, 28), integers or floats, at most 1,024 images; or "
        "`{\"inputs\": {\"pixels_uint8_b64\": \"...\"}}`, N x 784 uint8 bytes in row-major "
        "order, base64. **Output**: one row per image: `class_id`, `label`, `probabilities`.\n\n"
        f"**Serve**: `mlflow run . -e serve --env-manager local -P model_uri=models:/{name}@champion`"
        f" or `mlflow models serve -m models:/{name}@champion --env-manager local -p 5001`.")


def describe_registered_model(client: MlflowClient, name: str, description: str) -> None:
    """Give `name` its description once; one a person wrote in the UI stays."""
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=description)


def with_gate_line(description: str, gate: str) -> str:
    """The version description with its gate line replaced (the step that gates knows it)."""
    kept = [line for line in (description or "").splitlines() if not line.startswith(GATE_LINE)]
    return "\n".join([*kept, GATE_LINE + gate])


def not_found(exc: MlflowException) -> bool:
    # A missing alias comes back as INVALID_PARAMETER_VALUE "... alias champion not found".
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or (
        "not found" in str(exc).lower()
    )


def alias_of(model_uri: str) -> tuple[str, str] | None:
    """(name, alias) of `models:/<name>@<alias>`; None for any other URI."""
    match = _MODELS_URI.match(model_uri.strip())
    return (match["name"], match["alias"]) if match and match["alias"] else None


def resolve(model_uri: str, client: MlflowClient | None = None) -> ModelRef:
    """Turn `models:/<name>/<version>` or `models:/<name>@<alias>` into a concrete version.

    Aliases are resolved now, at use time: a user may have moved one in the UI.
    """
    client = client or MlflowClient()
    match = _MODELS_URI.match(model_uri.strip())
    if not match:
        raise UserError(
            f"Cannot use model URI {model_uri!r}: expected models:/<name>/<version> or "
            "models:/<name>@<alias> (for example models:/lightcycle-fashion-scripted@champion)."
        )
    name = match["name"]
    try:
        if match["alias"]:
            mv = client.get_model_version_by_alias(name, match["alias"])
        else:
            mv = client.get_model_version(name, match["version"])
    except MlflowException as exc:
        if not_found(exc):
            raise UserError(
                f"{model_uri} does not exist in the registry at {connection.tracking_uri()}. "
                f"List what does with: mlflow models ... or the UI's Models page; "
                f"run `mlflow run .` to produce one."
            ) from None
        raise
    return ModelRef(name, mv.version)


def wait_until_ready(client: MlflowClient, name: str, version: str, timeout: float = 300) -> ModelVersion:
    deadline = time.monotonic() + timeout
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return mv
        if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RuntimeError(
                f"Model version {name}/{version} did not become READY "
                f"(status {mv.status}: {mv.status_message})."
            )
        time.sleep(0.5)


def find_version_for_run(client: MlflowClient, name: str, run_id: str,
                         ready_only: bool = True) -> ModelVersion | None:
    """The oldest live version of `name` registered from `run_id`, if any."""
    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException as exc:
        if not_found(exc):
            return None
        raise
    live = [v for v in versions if v.status == "READY" or not ready_only]
    return min(live, key=lambda v: int(v.version)) if live else None


def register_model(
    model_uri: str, name: str, run_id: str, tags: dict[str, str], client: MlflowClient | None = None,
    model_description: str = "", description: str = "",
) -> tuple[ModelVersion, bool]:
    """Register `model_uri` (produced by `run_id`) under `name`; idempotent per run.

    Returns (version, created). The version is created with all its tags and its description
    in one call, and deleted again if it never becomes READY, so no half-registered version is
    left behind. `model_description` describes the registered model, if it has none yet.
    """
    client = client or MlflowClient()
    existing = find_version_for_run(client, name, run_id)
    if existing is not None:
        return existing, False
    try:
        client.create_registered_model(name, description=model_description or None)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
        if model_description:
            describe_registered_model(client, name, model_description)
    # Over REST, a models:/m-<id> source must name its logged model explicitly.
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    try:
        mv = client.create_model_version(name, model_uri, run_id=run_id, tags=tags,
                                         model_id=model_id, description=description or None)
    except MlflowException:
        # The server may have committed the version and died before answering: look first.
        mv = find_version_for_run(client, name, run_id, ready_only=False)
        if mv is None:
            raise
    try:
        mv = wait_until_ready(client, name, mv.version)
    except BaseException:
        _delete_quietly(client, name, mv.version)
        raise
    return _drop_duplicates(client, name, run_id, mv), True


def _drop_duplicates(client: MlflowClient, name: str, run_id: str,
                     mine: ModelVersion) -> ModelVersion:
    """Keep one version per run: the oldest. MLflow's client retries a POST whose answer was
    lost (server restart), and each retry that reached the server made another version."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    keep = min(versions, key=lambda v: int(v.version), default=mine)
    for version in versions:
        if version.version != keep.version:
            _delete_quietly(client, name, version.version)
    return keep if keep.version == mine.version else wait_until_ready(client, name, keep.version)


def _delete_quietly(client: MlflowClient, name: str, version: str) -> None:
    try:
        client.delete_model_version(name, version)
    except MlflowException:
        pass


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if not_found(exc):
            return None
        raise


def register_training_run(run_id: str, model_name: str = DEFAULT_MODEL_NAME) -> tuple[ModelVersion, bool]:
    """Register the eager model that training run `run_id` logged, with lineage tags."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if not_found(exc):
            raise UserError(
                f"Run {run_id!r} does not exist at {connection.tracking_uri()}. Pass the run id a "
                "`train` run printed (or find it in the MLflow UI)."
            ) from None
        raise
    if run.info.status != "FINISHED":
        raise UserError(
            f"Run {run_id} is {run.info.status}, not FINISHED: only a finished training run can "
            "be registered. Re-run training (`mlflow run . -e train`)."
        )
    model_uri = run.data.tags.get(tracking.TAG_OUTPUT_URI)
    if not model_uri:
        outputs = run.outputs.model_outputs if run.outputs else []
        if not outputs:
            raise UserError(
                f"Run {run_id} logged no model: is it a `train` run? "
                f"(entry point: {run.data.tags.get(tracking.TAG_ENTRY_POINT, 'unknown')})"
            )
        model_uri = f"models:/{outputs[0].model_id}"
    tags = {
        TAG_SOURCE_RUN: run_id,
        tracking.TAG_CODE_VERSION: run.data.tags.get(tracking.TAG_CODE_VERSION, ""),
        tracking.TAG_GIT_COMMIT: run.data.tags.get(tracking.TAG_GIT_COMMIT, ""),
        tracking.TAG_DATA_DIGEST: run.data.tags.get(tracking.TAG_DATA_DIGEST, ""),
        TAG_TEST_ACCURACY: str(run.data.metrics.get("test_accuracy", "")),
    }
    accuracy = run.data.metrics.get("test_accuracy")
    description = "\n".join([
        f"Eager `{run.data.params.get('model', 'net')}` from train run {run_id} "
        f"({run.data.params.get('epochs', '?')} epochs).",
        "- Accuracy: " + (f"{accuracy:.4f} on the held-out test set" if accuracy is not None
                          else "not measured"),
        "- Parity and gate: judged on the deployables made from this version.",
    ])
    return register_model(model_uri, model_name, run_id, tags, client,
                          registered_model_description(model_name), description)
