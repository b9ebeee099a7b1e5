"""Convert the registered eager net to a deployable, prove parity, log and register it.

Two formats: TorchScript (`script` or `trace`, then freeze and optimize_for_inference where
they keep parity) and torch.export's pt2 (`export`, TorchScript's upstream successor). Both are
logged behind the same pyfunc and input contract. A converted model that does not match eager
on every held-out image is never logged.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient

from lightcycle.lifecycle import model_io, registry, tracking
from lightcycle.model import data
from lightcycle.errors import UserError
from lightcycle.model.evaluate import images_tensor, predict_logits

# Conversion method -> the deployable's format (its artifact key and registered-name suffix).
FORMATS = {"script": "torchscript", "trace": "torchscript", "export": "pt2"}
METHODS = tuple(FORMATS)
# Max abs logit difference allowed between eager and converted (float32, same CPU kernels).
PARITY_ATOL = 1e-4
MAX_BATCH = 1024
SERVING_MODEL_CODE = Path(__file__).parents[1] / "serving" / "serving_model.py"

TAG_PARITY_MAX_DIFF = "lightcycle.parity_max_abs_diff"
TAG_PARITY_ARGMAX = "lightcycle.parity_argmax_mismatches"
TAG_METHOD = "lightcycle.conversion"


class ParityError(UserError):
    pass


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    argmax_mismatches: int
    images: int

    @property
    def ok(self) -> bool:
        return self.argmax_mismatches == 0 and self.max_abs_diff <= PARITY_ATOL

    def describe(self) -> str:
        return (f"max |logit diff| {self.max_abs_diff:.3g} (tolerance {PARITY_ATOL:g}), "
                f"{self.argmax_mismatches} of {self.images} predictions differ")


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> Parity:
    return Parity(
        max_abs_diff=float((reference - candidate).abs().max()),
        argmax_mismatches=int((reference.argmax(1) != candidate.argmax(1)).sum()),
        images=len(reference),
    )


def convert(net: torch.nn.Module, method: str, example: torch.Tensor):
    """A ScriptModule for script/trace, an ExportedProgram (batch dimension dynamic) for export."""
    if method not in METHODS:
        raise UserError(f"Unknown conversion method {method!r}: choose one of {', '.join(METHODS)}.")
    net = net.eval()
    if method == "export":
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        return torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        if method == "script":
            return torch.jit.script(net)
        return torch.jit.trace(net, example)


def save_archive(converted, path) -> None:
    if isinstance(converted, torch.export.ExportedProgram):
        torch.export.save(converted, path)
    else:
        torch.jit.save(converted, path)


def roundtrip(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Save and load again: what is served is the archive, so parity is checked on it."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer, map_location="cpu")


def roundtrip_program(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


def check_program(program: torch.export.ExportedProgram, images: torch.Tensor,
                  reference: torch.Tensor) -> tuple[torch.export.ExportedProgram, str, Parity]:
    """pt2 has no freeze/optimize passes to try: parity of the reloaded archive is all."""
    reloaded = roundtrip_program(program)
    return reloaded, "exported", compare(reference, predict_logits(reloaded.module(), images))


def optimize(
    scripted: torch.jit.ScriptModule, images: torch.Tensor, reference: torch.Tensor
) -> tuple[torch.jit.ScriptModule, str, Parity]:
    """Apply freeze, then optimize_for_inference, keeping each only where the saved archive
    still loads and its outputs stay equal to eager."""
    best, stage = roundtrip(scripted), "scripted"
    parity = compare(reference, predict_logits(best, images))
    if not parity.ok:
        return best, stage, parity
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for name, step in (("frozen", torch.jit.freeze),
                           ("optimized", torch.jit.optimize_for_inference)):
            try:
                # Both passes may rewrite their argument in place: give them a copy.
                candidate = roundtrip(step(roundtrip(best)))
                candidate_parity = compare(reference, predict_logits(candidate, images))
            except RuntimeError:
                break
            if not candidate_parity.ok:
                break
            best, stage, parity = candidate, name, candidate_parity
    return best, stage, parity


@dataclass(frozen=True)
class Deployable:
    source: registry.ModelRef
    version: registry.ModelRef
    parity: Parity
    stage: str
    run_id: str


def publish(
    model_uri: str,
    method: str = "script",
    data_dir: str | os.PathLike = data.default_data_dir(),
    deployable_name: str | None = None,
) -> Deployable:
    """Convert, check parity, log and register. Must run inside an active MLflow run."""
    client = MlflowClient()
    source = registry.resolve(model_uri, client)
    name = deployable_name or registry.deployable_name(source.name, FORMATS.get(method, ""))
    test_split = data.load_split(data_dir, "test")
    images = images_tensor(test_split)

    eager = model_io.load_eager_net(source.uri)
    reference = predict_logits(eager, images)
    converted = convert(eager, method, images[:2])
    if FORMATS[method] == "pt2":
        best, stage, parity = check_program(converted, images, reference)
    else:
        best, stage, parity = optimize(converted, images, reference)
    mlflow.log_metrics({"parity_max_abs_diff": parity.max_abs_diff,
                        "parity_argmax_mismatches": parity.argmax_mismatches})
    mlflow.log_params({"parity_images": parity.images, "parity_atol": PARITY_ATOL,
                       "source_version": source.uri, "optimization": stage})
    if not parity.ok:
        raise ParityError(
            f"The {FORMATS[method]} model ({method}) does not match eager {source.uri} on the {parity.images} "
            f"held-out test images: {parity.describe()}. Nothing was logged or registered."
        )

    accuracy = float((reference.argmax(1).numpy() == test_split.labels).mean())
    info = log_deployable(best, method, source, parity, accuracy)
    run_id = mlflow.active_run().info.run_id
    mlflow.set_tag(tracking.TAG_MODEL_ID, info.model_id)

    source_mv = client.get_model_version(source.name, source.version)
    tags = {
        registry.TAG_SOURCE_VERSION: source.uri,
        registry.TAG_SOURCE_RUN: source_mv.run_id or "",
        TAG_METHOD: f"{method}/{stage}",
        TAG_PARITY_MAX_DIFF: f"{parity.max_abs_diff:.6g}",
        TAG_PARITY_ARGMAX: str(parity.argmax_mismatches),
        tracking.TAG_CODE_VERSION: tracking.code_version(),
        tracking.TAG_DATA_DIGEST: source_mv.tags.get(tracking.TAG_DATA_DIGEST, ""),
        registry.TAG_TEST_ACCURACY: f"{accuracy:.6g}",
    }
    mv, _ = registry.register_model(info.model_uri, name, run_id, tags, client)
    client.set_registered_model_alias(name, registry.CHALLENGER, mv.version)
    mlflow.set_tag(tracking.TAG_OUTPUT_URI, f"models:/{name}/{mv.version}")
    return Deployable(source, registry.ModelRef(name, mv.version), parity, stage, run_id)


def deployable_model_kwargs(archive: str, artifact: str) -> dict:
    """The pyfunc around a converted archive; `artifact` names its format for the loader."""
    return dict(
        python_model=str(SERVING_MODEL_CODE),
        artifacts={artifact: archive},
        model_config={"class_names": list(data.CLASS_NAMES), "max_batch": MAX_BATCH},
        signature=model_io.deployable_signature(),
        input_example=model_io.input_example(),
        pip_requirements=model_io.torch_requirements()
        + [f"pandas=={model_io.package_version('pandas')}"],
    )


def log_deployable(converted, method: str, source: registry.ModelRef, parity: Parity,
                   accuracy: float):
    fmt = FORMATS[method]
    with tempfile.TemporaryDirectory(prefix="lightcycle-deployable-") as tmp:
        archive = os.path.join(tmp, "model.pt2" if fmt == "pt2" else "model.pt")
        save_archive(converted, archive)
        return mlflow.pyfunc.log_model(
            name="model",
            **deployable_model_kwargs(archive, fmt),
            metadata=model_io.model_metadata(
                format=fmt, torch_version=model_io.package_version("torch"), conversion=method, source_version=source.uri,
                parity_max_abs_diff=parity.max_abs_diff, test_accuracy=accuracy,
                max_batch=MAX_BATCH, input=model_io.SERVING_INPUT,
            ),
        )
