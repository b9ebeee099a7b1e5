"""The deployable's pyfunc: a TorchScript or pt2 archive behind a strict raw-pixel input contract.

This file is logged with the model ("models from code"), so it must stand alone: it imports
only numpy, pandas, torch and mlflow, never the rest of `lightcycle`. The signature declares
no input schema on purpose: MLflow's tensor schema pins one rank, and the contract accepts
both (N, 1, 28, 28) and (N, 28, 28). So this wrapper owns the whole input check (type, shape,
range, NaN/Inf, batch size) and turns logits into probabilities and class names.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

DEFAULT_MAX_BATCH = 1024


class InputError(MlflowException):
    """Answered as HTTP 400 by the scoring server (an unknown error code would be a 500)."""

    def __init__(self, message: str) -> None:
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


EXPECTED = ("expected raw pixels 0-255 with shape (N, 1, 28, 28) or (N, 28, 28), "
            'sent as {"inputs": [...]}')


def validate_pixels(batch, max_batch: int = DEFAULT_MAX_BATCH) -> np.ndarray:
    """Return `batch` as float32 (N, 1, 28, 28) or raise InputError saying what is wrong."""
    if batch is None:
        raise InputError(f"Got null; {EXPECTED}.")
    if isinstance(batch, dict):
        raise InputError(f"Got named inputs {sorted(batch)[:5]}; {EXPECTED} (a list, not an object).")
    if isinstance(batch, pd.DataFrame):
        raise InputError(f"Got a table with columns {list(batch.columns)[:5]}; {EXPECTED}.")
    array = np.asarray(batch)
    if array.dtype == object and array.ndim == 0 and array.item() is None:
        raise InputError(f"Got null; {EXPECTED}.")  # the scoring server wraps null in an array
    if array.dtype == object or array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise InputError(f"Got values of type {array.dtype}; {EXPECTED}.")
    if array.size == 0 and array.ndim <= 1:
        raise InputError(f"Got an empty batch; {EXPECTED} with N >= 1.")
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4 or array.shape[1:] != (1, 28, 28):
        raise InputError(f"Got shape {array.shape}; {EXPECTED}.")
    n = array.shape[0]
    if n == 0:
        raise InputError(f"Got an empty batch; {EXPECTED} with N >= 1.")
    if n > max_batch:
        raise InputError(f"Got a batch of {n} images; at most {max_batch} per request. "
                         "Split the batch.")
    finite = np.isfinite(array)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise InputError(f"Got a non-finite value (NaN or Infinity) at index {where}; {EXPECTED}.")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise InputError(f"Got pixel values in [{low:g}, {high:g}]; {EXPECTED}, in [0, 255] "
                         "(do not normalize on the client).")
    return array.astype(np.float32, copy=False)


class DeployedClassifier(PythonModel):
    """Serves whichever archive the model carries: `torchscript` (torch.jit) or `pt2`
    (torch.export; the exported graph already has eval behaviour baked in)."""

    def load_context(self, context):
        import torch

        self._torch = torch
        if "pt2" in context.artifacts:
            self.module = torch.export.load(context.artifacts["pt2"]).module()
        else:
            self.module = torch.jit.load(context.artifacts["torchscript"],
                                         map_location="cpu").eval()
        config = context.model_config or {}
        self.class_names = list(config.get("class_names", [str(i) for i in range(10)]))
        self.max_batch = int(config.get("max_batch", DEFAULT_MAX_BATCH))
        # The profiling executor specializes on the first calls; pay for them now, not on the
        # first real request.
        with torch.inference_mode():
            for batch in (1, 1, 1, 64, 64):
                self.module(torch.zeros(batch, 1, 28, 28))

    def predict(self, context, model_input, params=None):
        pixels = validate_pixels(model_input, self.max_batch)
        torch = self._torch
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(np.ascontiguousarray(pixels)))
            probabilities = torch.softmax(logits.float(), dim=1).numpy()
        class_ids = probabilities.argmax(axis=1)
        return pd.DataFrame({
            "class_id": class_ids.astype(np.int64),
            "label": [self.class_names[i] for i in class_ids],
            "probabilities": list(probabilities.astype(np.float64)),
        })


set_model(DeployedClassifier())
