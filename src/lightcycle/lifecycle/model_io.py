"""How models are logged to and loaded from MLflow: signatures, examples, explicit requirements."""

from __future__ import annotations

import importlib.metadata
import os
import pickle
import sys
import tempfile

import numpy as np

from lightcycle.errors import UserError
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


# The eager net is logged as an MLflow model of its own flavor: the architecture's name and
# sizes in MLmodel, the weights as a state_dict. Loading it unpickles nothing but tensors
# (weights_only=True) and rebuilds the class from lightcycle.model.nets, so a model a tracking
# server hands back runs no code, and moving a class to another module breaks no version.
FLAVOR = "lightcycle_net"
WEIGHTS_FILE = "state_dict.pt"


def save_model(net, path: str, mlflow_model=None, signature=None, pip_requirements=()):
    """Write `net` as an MLflow model directory (also the flavor hook `Model.log` calls)."""
    import torch
    from mlflow.models import Model

    from lightcycle.model.nets import spec_of

    mlflow_model = mlflow_model or Model()
    os.makedirs(path, exist_ok=True)
    torch.save(net.state_dict(), os.path.join(path, WEIGHTS_FILE))
    if signature is not None:
        mlflow_model.signature = signature
    mlflow_model.add_flavor(FLAVOR, net=spec_of(net), weights=WEIGHTS_FILE,
                            torch_version=package_version("torch"))
    with open(os.path.join(path, "requirements.txt"), "w") as f:
        f.write("".join(f"{r}\n" for r in pip_requirements))
    mlflow_model.save(os.path.join(path, "MLmodel"))


def log_eager_model(net, name: str = "model", **metadata):
    """Log the trained plain net as float32 (even after bf16 training), with a signature."""
    from mlflow.models import Model

    net = net.float().cpu().eval()
    return Model.log(
        name=name,
        artifact_path=None,
        flavor=sys.modules[__name__],
        flavor_name=FLAVOR,
        net=net,
        signature=logits_signature(),
        pip_requirements=torch_requirements(with_torchvision=True),
        metadata=model_metadata(**metadata),
    )


# MLflow downloads a model URI into a new temporary directory on each load and never removes it:
# without a dst_path, every step run would leave a copy of its models in /tmp. Both loaders
# below read everything into memory, so the download can go as soon as they return.

def load_eager_net(model_uri: str):
    """The plain `nn.Module` behind an eager model URI, in eval mode on the CPU."""
    import mlflow.artifacts
    import torch
    from mlflow.models import Model

    from lightcycle.model.nets import from_spec

    with tempfile.TemporaryDirectory(prefix="lightcycle-model-") as download:
        local = model_uri if os.path.isdir(model_uri) else mlflow.artifacts.download_artifacts(
            artifact_uri=model_uri, dst_path=download)
        flavors = Model.load(local).flavors
        if FLAVOR not in flavors:
            raise UserError(
                f"Refusing to load {model_uri}: it was logged as a pickled nn.Module "
                f"(flavors: {', '.join(flavors)}), and unpickling a model from the tracking "
                "server would run whatever code it holds. Re-register it from weights: train "
                "it again (`mlflow run . -e train`), then `mlflow run . -e register -P "
                "run_id=<the new run>`; or run `mlflow run .` for the whole chain.")
        conf = flavors[FLAVOR]
        net = from_spec(conf["net"])
        try:
            state = torch.load(os.path.join(local, conf["weights"]), map_location="cpu",
                               weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UserError(
                f"Refusing to load {model_uri}: its {conf['weights']} is not a plain state_dict "
                f"and loading it would run code ({type(exc).__name__}). Re-register it from a "
                "run you trust: `mlflow run . -e train`, then `mlflow run . -e register -P "
                "run_id=<the new run>`.") from None
    net.load_state_dict(state)
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
