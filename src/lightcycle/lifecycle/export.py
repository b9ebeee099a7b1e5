"""Convert the registered eager net to a deployable, prove parity, log and register it.

Two formats: TorchScript (`script` or `trace`, then freeze and optimize_for_inference where
they keep parity) and torch.export's pt2 (`export`, TorchScript's upstream successor). Both are
logged behind the same pyfunc and input contract. A converted model that does not match eager
on every held-out image is never logged.

Conv nets are converted with their weights in channels_last (NHWC) memory format: oneDNN's
convolutions run about 1.5-1.9x faster that way on x86 CPUs, with float32 results equal to
eager within 1e-5 (`python -m bench.serving.served --variant deployables`).

A third method, `quantize`, makes an int8 TorchScript deployable (post-training static
quantization, x86 backend, calibrated on training images; the first conv and the linear head
stay float32). Its logits cannot match eager to 1e-4, so its parity is judged differently
(`Parity.quantized`): argmax agreement with eager on the held-out images and on a larger set of
shifted and mirrored copies of them, and held-out accuracy no more than 0.5 point below eager.
It is logged behind the same pyfunc (artifact key `torchscript`), so serving needs no change.

A fourth, `onnx`, exports the net with `torch.onnx.export` (the dynamo exporter, batch dimension
dynamic) and checks parity on the reloaded file run by ONNX Runtime, the runtime that serves it.
Its pyfunc imports onnxruntime instead of torch, and its logged requirements name no torch, so
a serving process or image for it never loads torch.

`optimize_for_inference` is tried after `freeze` but cannot survive the archive round trip:
its oneDNN weight constants (`prim::ConstantMKLDNNTensor`) are not serializable, so the
reloaded archive fails ("required keyword attribute 'value' is undefined"); on the CNN it also
fails before that, because oneDNN's adaptive average pool refuses 7x7 -> 3x3. The loop keeps
`frozen` in that case.
"""

from __future__ import annotations

import copy
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lightcycle.lifecycle import model_io, registry, tracking
from lightcycle.model import data
from lightcycle.errors import UserError
from lightcycle.model.evaluate import images_tensor, predict_logits

# Conversion method -> the deployable's format (its artifact key and registered-name suffix).
FORMATS = {"script": "torchscript", "trace": "torchscript", "export": "pt2",
           "quantize": "torchscript", "onnx": "onnx"}
METHODS = tuple(FORMATS)
QUANTIZED_METHODS = ("quantize",)
# Registered-name suffix of the int8 deployable (it is TorchScript, but not the float one).
INT8_SUFFIX = registry.INT8_SUFFIX
# Max abs logit difference allowed between eager and converted (float32, same CPU kernels).
PARITY_ATOL = 1e-4
# An int8 deployable instead must predict eager's class on at least this share of the held-out
# images and of their shifted/mirrored copies, and lose at most this much held-out accuracy.
QUANT_MIN_AGREEMENT = 0.98
QUANT_MAX_ACCURACY_DROP = 0.005
# Training images used to calibrate the int8 activation ranges (at most).
CALIBRATION_IMAGES = 1024
MAX_BATCH = 1024
# The ONNX graph's input and output names (the pyfunc feeds and reads them by name).
ONNX_INPUT, ONNX_OUTPUT = "pixels", "logits"
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
    # Set only for a quantized deployable (see QUANT_MIN_AGREEMENT): then these decide.
    quantized: bool = False
    synthetic_mismatches: int = 0
    synthetic_images: int = 0
    accuracy_drop: float = 0.0

    @property
    def agreement(self) -> float:
        return 1 - self.argmax_mismatches / self.images

    @property
    def synthetic_agreement(self) -> float:
        return 1 - self.synthetic_mismatches / self.synthetic_images if self.synthetic_images else 1.0

    @property
    def ok(self) -> bool:
        if self.quantized:
            return (self.agreement >= QUANT_MIN_AGREEMENT
                    and self.synthetic_agreement >= QUANT_MIN_AGREEMENT
                    and self.accuracy_drop <= QUANT_MAX_ACCURACY_DROP + 1e-9)
        return self.argmax_mismatches == 0 and self.max_abs_diff <= PARITY_ATOL

    def describe(self) -> str:
        if self.quantized:
            return (f"int8: argmax agreement {self.agreement:.4f} on {self.images} held-out images "
                    f"and {self.synthetic_agreement:.4f} on {self.synthetic_images} shifted/mirrored "
                    f"copies (minimum {QUANT_MIN_AGREEMENT:g}), held-out accuracy "
                    f"{-self.accuracy_drop:+.4f} vs eager (at most -{QUANT_MAX_ACCURACY_DROP:g}), "
                    f"max |logit diff| {self.max_abs_diff:.3g}")
        return (f"max |logit diff| {self.max_abs_diff:.3g} (tolerance {PARITY_ATOL:g}), "
                f"{self.argmax_mismatches} of {self.images} predictions differ")


def differences(reference: torch.Tensor, candidate: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Max |logit difference| and argmax mismatches, computed on `reference`'s device (the
    candidate's logits are moved there): 0-d tensors, so a GPU copies out two numbers."""
    candidate = candidate.to(reference.device)
    return ((reference - candidate).abs().max(),
            (reference.argmax(1) != candidate.argmax(1)).sum())


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> Parity:
    max_abs_diff, mismatches = differences(reference, candidate)
    return Parity(max_abs_diff=float(max_abs_diff), argmax_mismatches=int(mismatches),
                  images=len(reference))


def synthetic_images(images: torch.Tensor, shift: int = 2) -> torch.Tensor:
    """Shifted (by -shift, 0, +shift pixels each way) and mirrored copies of `images`: 18x as
    many plausible inputs, to judge argmax agreement on more than the held-out set alone."""
    return torch.cat([torch.roll(flipped, (dy, dx), (2, 3))
                      for flipped in (images, images.flip(3))
                      for dy in (-shift, 0, shift) for dx in (-shift, 0, shift)])


def accuracy_drop(reference: torch.Tensor, candidate: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """Reference accuracy minus candidate accuracy on `labels`, on the reference's device."""
    candidate = candidate.to(reference.device)
    # float64: a drop of exactly the allowed 0.005 on 10,000 images must compare as 0.005.
    return ((reference.argmax(1) == labels).double().mean()
            - (candidate.argmax(1) == labels).double().mean())


@dataclass(frozen=True)
class Reference:
    """What a candidate is judged against: eager's logits on the held-out images (and, for a
    quantized candidate, on their synthetic copies), with the held-out labels."""

    images: torch.Tensor
    logits: torch.Tensor
    labels: np.ndarray | None = None
    synthetic: torch.Tensor | None = None
    synthetic_logits: torch.Tensor | None = None

    def check(self, module, quantized: bool = False) -> Parity:
        logits = predict_logits(module, self.images)
        parity = compare(self.logits, logits)
        if not quantized:
            return parity
        synthetic = predict_logits(module, self.synthetic)
        _, mismatches = differences(self.synthetic_logits, synthetic)
        labels = torch.as_tensor(self.labels, device=self.logits.device)
        drop = accuracy_drop(self.logits, logits, labels)
        return Parity(parity.max_abs_diff, parity.argmax_mismatches, parity.images, True,
                      int(mismatches), len(synthetic), float(drop))


def channels_last(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of `net` with its 4-d weights in NHWC order (a no-op for nets without convs)."""
    return copy.deepcopy(net).to(memory_format=torch.channels_last)


def quantize_int8(net: torch.nn.Module, calibration: torch.Tensor,
                  example: torch.Tensor) -> torch.jit.ScriptModule:
    """Post-training static int8 quantization (FX graph mode, x86 backend: oneDNN/fbgemm int8
    kernels with VNNI), traced to TorchScript. Activation ranges come from `calibration`.

    The first conv (one input channel, about 1% of the CNN's multiply-adds) and the final
    linear layer stay float32: quantizing them costs argmax agreement and buys no speed.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    net = copy.deepcopy(net).eval()
    mapping = get_default_qconfig_mapping("x86")
    convs = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    for name in convs[:1] + linears[-1:]:
        mapping = mapping.set_module_name(name, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        prepared = prepare_fx(net, mapping, (example,))
        with torch.inference_mode():
            for start in range(0, len(calibration), 64):
                prepared(calibration[start:start + 64])
        quantized = convert_fx(prepared)
        return torch.jit.trace(quantized, example)


def convert(net: torch.nn.Module, method: str, example: torch.Tensor,
            calibration: torch.Tensor | None = None):
    """A ScriptModule for script/trace/quantize, an ExportedProgram (batch dimension dynamic)
    for export, an onnx ModelProto for onnx. `calibration` (raw-pixel images) is needed by
    quantize only."""
    if method not in METHODS:
        raise UserError(f"Unknown conversion method {method!r}: choose one of {', '.join(METHODS)}.")
    net = net.eval()
    if method == "quantize":
        return quantize_int8(net, example if calibration is None else calibration, example)
    if method == "onnx":
        return export_onnx(net, example)
    net = channels_last(net)
    if method == "export":
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        return torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        if method == "script":
            return torch.jit.script(net)
        return torch.jit.trace(net, example)


def export_onnx(net: torch.nn.Module, example: torch.Tensor):
    """The net as an ONNX graph (opset of the installed exporter), batch dimension dynamic,
    after the exporter's own graph optimizations. The weights are in the one file: an onnx
    file keeps them inline up to 2 GB, far above any net here."""
    import contextlib

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(net, (example,), None, dynamo=True,
                                    input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                                    dynamic_shapes=({0: batch},), verbose=False)
    program.optimize()
    return program.model_proto


def onnx_logits(model_bytes: bytes, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """What ONNX Runtime (CPU) answers for `images` with the serialized graph `model_bytes`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    pixels = images.detach().cpu().numpy()
    return torch.from_numpy(np.concatenate([
        session.run([ONNX_OUTPUT], {ONNX_INPUT: pixels[i:i + batch_size]})[0]
        for i in range(0, len(pixels), batch_size)])).to(images.device)


def check_onnx(model, reference: Reference) -> tuple[object, str, Parity]:
    """Parity of the serialized graph as ONNX Runtime runs it (the onnx file is what is served)."""
    serialized = model.SerializeToString()
    return model, "exported", reference.check(lambda x: onnx_logits(serialized, x))


def save_archive(converted, path) -> None:
    if isinstance(converted, torch.export.ExportedProgram):
        torch.export.save(converted, path)
    elif isinstance(converted, torch.jit.ScriptModule):
        torch.jit.save(converted, path)
    else:  # an onnx ModelProto
        Path(path).write_bytes(converted.SerializeToString())


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


def _as_reference(reference, images: torch.Tensor | None) -> Reference:
    return reference if isinstance(reference, Reference) else Reference(images, reference)


def check_program(program: torch.export.ExportedProgram, images: torch.Tensor | None,
                  reference) -> tuple[torch.export.ExportedProgram, str, Parity]:
    """pt2 has no freeze/optimize passes to try: parity of the reloaded archive is all.
    `reference` is a Reference, or eager's logits on `images`."""
    reloaded = roundtrip_program(program)
    return reloaded, "exported", _as_reference(reference, images).check(reloaded.module())


def optimize(
    scripted: torch.jit.ScriptModule, images: torch.Tensor | None, reference,
    quantized: bool = False,
) -> tuple[torch.jit.ScriptModule, str, Parity]:
    """Apply freeze, then optimize_for_inference, keeping each only where the saved archive
    still loads and its outputs stay equal to eager (for a quantized module: agree with eager,
    see Parity.ok). `reference` is a Reference, or eager's logits on `images`."""
    reference = _as_reference(reference, images)
    best, stage = roundtrip(scripted), "scripted"
    parity = reference.check(best, quantized)
    if not parity.ok:
        return best, stage, parity
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for name, step in (("frozen", torch.jit.freeze),
                           ("optimized", torch.jit.optimize_for_inference)):
            try:
                # Both passes may rewrite their argument in place: give them a copy.
                candidate = roundtrip(step(roundtrip(best)))
                candidate_parity = reference.check(candidate, quantized)
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


@dataclass(frozen=True)
class Conversion:
    module: object  # the ScriptModule or ExportedProgram to save
    stage: str  # the last pass that kept parity: scripted, frozen, optimized or exported
    parity: Parity
    eager_accuracy: float  # on the held-out split the parity was measured on
    calibration_images: int  # quantize only, else 0


def convert_and_check(eager: torch.nn.Module, method: str,
                      data_dir: str | os.PathLike) -> Conversion:
    """What `publish` would log for `eager`: the converted module after the passes that keep
    parity, with that parity on the held-out split of `data_dir`. Nothing is logged."""
    quantized = method in QUANTIZED_METHODS
    test_split = data.load_split(data_dir, "test")
    images = images_tensor(test_split)
    reference = Reference(images, predict_logits(eager, images), test_split.labels)
    calibration = None
    if quantized:
        synthetic = synthetic_images(images)
        reference = Reference(images, reference.logits, test_split.labels, synthetic,
                              predict_logits(eager, synthetic))
        calibration = images_tensor(data.load_split(data_dir, "train"))[:CALIBRATION_IMAGES]
    converted = convert(eager, method, images[:64] if quantized else images[:2], calibration)
    if FORMATS[method] == "pt2":
        best, stage, parity = check_program(converted, None, reference)
    elif FORMATS[method] == "onnx":
        best, stage, parity = check_onnx(converted, reference)
    else:
        best, stage, parity = optimize(converted, None, reference, quantized)
    eager_accuracy = float((reference.logits.argmax(1).numpy() == test_split.labels).mean())
    return Conversion(best, stage, parity, eager_accuracy,
                      0 if calibration is None else len(calibration))


def publish(
    model_uri: str,
    method: str = "script",
    data_dir: str | os.PathLike = data.default_data_dir(),
    deployable_name: str | None = None,
) -> Deployable:
    """Convert, check parity, log and register. Must run inside an active MLflow run."""
    if method not in METHODS:
        raise UserError(f"Unknown conversion method {method!r}: choose one of {', '.join(METHODS)}.")
    client = MlflowClient()
    source = registry.resolve(model_uri, client)
    quantized = method in QUANTIZED_METHODS
    name = deployable_name or registry.deployable_name(
        source.name, "int8" if quantized else FORMATS[method])
    eager = model_io.load_eager_net(source.uri)
    conversion = convert_and_check(eager, method, data_dir)
    best, stage, parity = conversion.module, conversion.stage, conversion.parity
    metrics = {"parity_max_abs_diff": parity.max_abs_diff,
               "parity_argmax_mismatches": parity.argmax_mismatches}
    params = {"parity_images": parity.images, "source_version": source.uri, "optimization": stage}
    if quantized:
        metrics.update(parity_argmax_agreement=parity.agreement,
                       parity_synthetic_agreement=parity.synthetic_agreement,
                       parity_accuracy_drop=parity.accuracy_drop)
        params.update(parity_min_agreement=QUANT_MIN_AGREEMENT,
                      parity_max_accuracy_drop=QUANT_MAX_ACCURACY_DROP,
                      parity_synthetic_images=parity.synthetic_images,
                      calibration_images=conversion.calibration_images)
    else:
        params["parity_atol"] = PARITY_ATOL
    mlflow.log_metrics(metrics)
    mlflow.log_params(params)
    if not parity.ok:
        raise ParityError(
            f"The {FORMATS[method]} model ({method}) does not match eager {source.uri} on the {parity.images} "
            f"held-out test images: {parity.describe()}. Nothing was logged or registered."
        )

    # The accuracy the deployable itself has: eager's, or (int8) its own on the same images.
    accuracy = conversion.eager_accuracy - parity.accuracy_drop
    source_mv = client.get_model_version(source.name, source.version)
    fmt = "int8" if quantized else FORMATS[method]
    net = _net_name(client, source_mv)
    info = log_deployable(best, method, source, parity, accuracy,
                          registry.deployable_name(net, fmt))
    run_id = mlflow.active_run().info.run_id
    mlflow.set_tag(tracking.TAG_MODEL_ID, info.model_id)

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
    description = "\n".join([
        f"`{net}` as {fmt} ({method}, {stage}) from {source.uri}"
        + (f" (train run {source_mv.run_id})." if source_mv.run_id else "."),
        f"- Accuracy: {accuracy:.4f} on the {parity.images} held-out test images",
        f"- Parity with eager: {parity.describe()}",
        registry.GATE_LINE + "not gated yet (the `promote` step writes its verdict here)",
    ])
    mv, _ = registry.register_model(
        info.model_uri, name, run_id, tags, client,
        registry.registered_model_description(name, fmt, source.name), description)
    client.set_registered_model_alias(name, registry.CHALLENGER, mv.version)
    mlflow.set_tag(tracking.TAG_OUTPUT_URI, f"models:/{name}/{mv.version}")
    return Deployable(source, registry.ModelRef(name, mv.version), parity, stage, run_id)


# `mlflow models serve -w N` runs `uvicorn --workers N`, whose listener, in uvicorn releases
# before 0.55.0 (its issue 3149), left Nagle's algorithm on for every connection: about 40 ms
# a keep-alive request. A serving environment built from the model's requirements gets the fix.
UVICORN_REQUIREMENT = "uvicorn>=0.55.0"


SERVING_REFERENCE = "serving_reference"
SERVING_REFERENCE_ATOL = 1e-4


def write_serving_reference(archive: str, artifact: str) -> str:
    """What the archive answers for the logged input example, beside the archive: the reference
    `serve -P follow=true` checks a new champion's server against before it takes traffic."""
    pixels = torch.from_numpy(model_io.input_example())
    if artifact == "onnx":
        logits = onnx_logits(Path(archive).read_bytes(), pixels)
    else:
        module = (torch.export.load(archive).module() if artifact == "pt2"
                  else torch.jit.load(archive, map_location="cpu").eval())
        with torch.inference_mode():
            logits = module(pixels)
    probabilities = torch.softmax(logits.float(), dim=1)
    path = Path(archive).with_name(f"{SERVING_REFERENCE}.json")
    path.write_text(json.dumps({
        "class_id": probabilities.argmax(dim=1).tolist(),
        "probabilities": probabilities.double().tolist(),
        "atol": SERVING_REFERENCE_ATOL,
    }))
    return str(path)


def deployable_model_kwargs(archive: str, artifact: str) -> dict:
    """The pyfunc around a converted archive; `artifact` names its format for the loader. An
    onnx deployable requires onnxruntime instead of torch. Its `serving_reference` artifact is
    the answer to its input example, written here from the archive."""
    runtime = ([f"onnxruntime=={model_io.package_version('onnxruntime')}",
                f"numpy=={model_io.package_version('numpy')}"] if artifact == "onnx"
               else model_io.torch_requirements())
    return dict(
        python_model=str(SERVING_MODEL_CODE),
        artifacts={artifact: archive,
                   SERVING_REFERENCE: write_serving_reference(archive, artifact)},
        model_config={"class_names": list(data.CLASS_NAMES), "max_batch": MAX_BATCH},
        signature=model_io.deployable_signature(),
        input_example=model_io.input_example(),
        pip_requirements=runtime + [f"pandas=={model_io.package_version('pandas')}",
                                    UVICORN_REQUIREMENT],
    )


def _net_name(client: MlflowClient, source_mv) -> str:
    """The net a registered eager version holds (`cnn`), from its train run's `model` param."""
    if source_mv.run_id:
        try:
            return client.get_run(source_mv.run_id).data.params.get("model", "net")
        except MlflowException:
            pass
    return "net"


def log_deployable(converted, method: str, source: registry.ModelRef, parity: Parity,
                   accuracy: float, name: str = "deployable"):
    """Log the pyfunc around `converted`; `name` is the logged model's (`cnn-scripted`)."""
    fmt = FORMATS[method]
    with tempfile.TemporaryDirectory(prefix="lightcycle-deployable-") as tmp:
        archive = os.path.join(tmp, {"pt2": "model.pt2", "onnx": "model.onnx"}.get(fmt, "model.pt"))
        save_archive(converted, archive)
        runtime = ({"onnxruntime_version": model_io.package_version("onnxruntime"),
                    "onnx_opset": max(o.version for o in converted.opset_import if o.domain == "")}
                   if fmt == "onnx" else {"torch_version": model_io.package_version("torch")})
        return mlflow.pyfunc.log_model(
            name=name,
            **deployable_model_kwargs(archive, fmt),
            metadata=model_io.model_metadata(
                format=fmt, **runtime, conversion=method, source_version=source.uri,
                parity_max_abs_diff=parity.max_abs_diff, test_accuracy=accuracy,
                max_batch=MAX_BATCH, input=model_io.SERVING_INPUT,
                **({"precision": "int8 (x86 static, first conv and head float32)",
                    "parity_argmax_agreement": parity.agreement,
                    "parity_synthetic_agreement": parity.synthetic_agreement}
                   if parity.quantized else {}),
            ),
        )
