"""How models are logged to and loaded from MLflow: signatures, examples, explicit requirements."""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile

import numpy as np

from lightcycle.model.data import CLASS_NAMES

INPUT_SHAPE = (-1, 1, 28, 28)


def package_version(package: str) -> str:
    # Local builds carry a suffix ("2.14.1+cpu"); requirements want the release.
    return importlib.metadata.version(package).split("+")[0]


def torch_requirements(with_torchvision: bool = False) -> list[str]:
    """Explicit pins: inferring requirements costs 8-15 s per logged model."""
    reqs = [f"torch=={package_version('torch')}", f"numpy=={package_version('numpy')}"]
    if with_torchvision:
        reqs.append(f"torchvision=={package_version('torchvision')}")
    return reqs


def input_example(batch: int = 2) -> np.ndarray:
    """Raw pixels in the serving contract: float32, 0-255, (N, 1, 28, 28)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(batch, 1, 28, 28)).astype(np.float32)


def logits_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), INPUT_SHAPE)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(CLASS_NAMES)))]),
    )


SERVING_INPUT = "raw pixels 0-255, (N, 1, 28, 28) or (N, 28, 28), JSON numbers"


def deployable_signature():
    """Outputs only: the serving wrapper checks inputs itself, because a tensor schema would
    refuse the (N, 28, 28) form of the contract before the wrapper sees it."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema
    from mlflow.types.schema import Array, ColSpec

    return ModelSignature(outputs=Schema([
        ColSpec("long", "class_id"),
        ColSpec("string", "label"),
        ColSpec(Array("double"), "probabilities"),
    ]))


def model_metadata(**extra) -> dict:
    return {"class_names": list(CLASS_NAMES), "input": "raw pixels 0-255, float32, (N, 1, 28, 28)",
            **extra}


def mlflow_pytorch():
    """`mlflow.pytorch`, imported without Lightning.

    The module ends with `try: from ._lightning_autolog import ...` only to export a checkpoint
    callback for autolog; that import pulls in pytorch_lightning, torchmetrics and torchvision's
    models (about 8 s per process here). Logging and loading a plain net needs none of it, so
    while mlflow.pytorch is first imported, `pytorch_lightning` is marked absent and the optional
    import fails fast. A process that has already imported Lightning (train) is left as it is.
    """
    if "mlflow.pytorch" not in sys.modules and "pytorch_lightning" not in sys.modules:
        sys.modules["pytorch_lightning"] = None  # makes `import pytorch_lightning` raise ImportError
        try:
            import mlflow.pytorch  # noqa: F401
        finally:
            del sys.modules["pytorch_lightning"]
    import mlflow.pytorch

    return mlflow.pytorch


def log_eager_model(net, name: str = "model", **metadata):
    """Log the trained plain net as float32 (even after bf16 training), with a signature.

    Pickle format keeps the `nn.Module` itself, which the conversion step scripts; torch.export's
    pt2 would hand back a graph module that `torch.jit.script` cannot take. Unpickling needs
    `lightcycle` importable (this project's venv, or `pip install -e .`).
    """
    net = net.float().cpu().eval()
    return mlflow_pytorch().log_model(
        net,
        name=name,
        serialization_format="pickle",
        signature=logits_signature(),
        input_example=input_example(),
        pip_requirements=torch_requirements(with_torchvision=True),
        metadata=model_metadata(**metadata),
    )


# MLflow downloads a model URI into a new temporary directory on each load and never removes it:
# without a dst_path, every step run would leave a copy of its models in /tmp. Both loaders
# below read everything into memory, so the download can go as soon as they return.

def load_eager_net(model_uri: str):
    """The plain `nn.Module` behind an eager model URI, in eval mode on the CPU."""
    with tempfile.TemporaryDirectory(prefix="lightcycle-model-") as download:
        net = mlflow_pytorch().load_model(model_uri, dst_path=download, map_location="cpu",
                                          weights_only=False)
    return net.float().eval()


def load_pyfunc(model_uri: str):
    """`mlflow.pyfunc.load_model`, leaving no download behind (deployables load their archive
    into memory in `load_context`). A local model directory is loaded where it is: MLflow
    copies nothing for one."""
    import mlflow.pyfunc

    if os.path.isdir(model_uri):
        return mlflow.pyfunc.load_model(model_uri)
    with tempfile.TemporaryDirectory(prefix="lightcycle-model-") as download:
        return mlflow.pyfunc.load_model(model_uri, dst_path=download)
