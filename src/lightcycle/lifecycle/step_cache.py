"""main's step cache: when a finished step run may stand in for running the step again.

A run is reused when it is FINISHED, ran the same entry point with the same code version
(tracking.code_version: a hash of the step code only), has the same effective parameters
(the step's defaults filled in, compared canonically, so `-P learning_rate=5e-3` equals 0.005
and a `train -P width=64` run is not taken for a default one), was made from data with the
same digest, its outputs still exist, and a step-specific check still holds (a `promote` is
stale once the champion has moved). The newest such run wins; every result page is searched.
"""

from __future__ import annotations

from typing import Callable

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from lightcycle import defaults
from lightcycle.errors import UserError
from lightcycle.lifecycle import registry, tracking

# Each entry point's parameters and defaults as its step script sees them.
STEP_DEFAULTS: dict[str, dict[str, object]] = {
    "train": {**defaults.TRAIN, "resume": True},
    "register": {"model_name": defaults.MODEL_NAME},
    "torchscript": {"method": defaults.CHAIN["method"], "data_dir": defaults.DATA_DIR,
                    "deployable_name": defaults.AUTO},
    "promote": {"min_accuracy": defaults.CHAIN["min_accuracy"],
                "version": defaults.PROMOTE_VERSION, "data_dir": defaults.DATA_DIR},
}
# Parameters that change how or where a step runs, not what it produces (the data is compared by
# its digest, wherever it was downloaded from; a Spark master or conf gives the same result).
NOT_COMPARED = {"resume", "data_mirror", "spark_master", "spark_conf"}


def effective_params(entry_point: str, params: dict[str, object]) -> dict[str, str]:
    """What the step will run with: its defaults, overridden by `params`, canonical strings."""
    merged = {**STEP_DEFAULTS.get(entry_point, {}), **params}
    like = STEP_DEFAULTS.get(entry_point, {})
    return {k: tracking.canonical_param(v, like.get(k, v)) for k, v in merged.items()
            if k not in NOT_COMPARED}


def data_digest(params: dict[str, object]) -> str | None:
    """The digest of the data a step reads, or None if it has none (yet: download=true)."""
    if "data_dir" not in params:
        return None
    from lightcycle.model import data

    try:
        return data.dataset_digest(params["data_dir"])
    except (OSError, UserError):
        return "missing"  # matches no run: the step runs, and downloads or fails clearly


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def find_cached_run(client: MlflowClient, experiment_id: str, entry_point: str,
                    params: dict[str, object], code_version: str, digest: str | None = None,
                    still_valid: Callable[[Run], bool] | None = None) -> Run | None:
    expected = effective_params(entry_point, params)
    like = STEP_DEFAULTS.get(entry_point, {})
    query = (f"tags.`{tracking.TAG_ENTRY_POINT}` = '{_quote(entry_point)}' "
             f"and attributes.status = 'FINISHED' "
             f"and tags.`{tracking.TAG_CODE_VERSION}` = '{_quote(code_version)}'")
    if digest is not None:
        query += f" and tags.`{tracking.TAG_DATA_DIGEST}` = '{_quote(digest)}'"
    page_token = None
    while True:
        page = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"],
                                  max_results=100, page_token=page_token)
        for run in page:
            logged = run.data.params
            if (all(k in logged and tracking.canonical_param(logged[k], like.get(k, v)) == v
                    for k, v in expected.items())
                    and outputs_exist(client, run)
                    and (still_valid is None or still_valid(run))):
                return run
        page_token = page.token
        if not page_token:
            return None


def outputs_exist(client: MlflowClient, run: Run) -> bool:
    """The step's output is still there: the model version is live and its files are stored."""
    uri = run.data.tags.get(tracking.TAG_OUTPUT_URI)
    if not uri:
        return False
    try:
        if not uri.startswith("models:/m-"):
            ref = registry.resolve(uri, client)
            mv = client.get_model_version(ref.name, ref.version)
            if mv.status != "READY":
                return False
            uri = mv.source  # the logged model behind the version: models:/m-<id>
        if not uri.startswith("models:/m-"):
            return False
        files = client.list_logged_model_artifacts(uri.removeprefix("models:/"))
    except (MlflowException, UserError, OSError):
        return False
    return any(f.path.rsplit("/", 1)[-1] == "MLmodel" for f in files)


