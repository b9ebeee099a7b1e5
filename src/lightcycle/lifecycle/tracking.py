"""What every step run records: code version, step tags, params logged once, the global rank.

Standard library only at import time, so that non-training steps start fast.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[3]

# Tags every step run carries; later steps and the cache read them back from the server.
TAG_ENTRY_POINT = "mlflow.project.entryPoint"
TAG_CODE_VERSION = "lightcycle.code_version"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_DATA_DIGEST = "lightcycle.data_digest"
TAG_OUTPUT_URI = "lightcycle.output_uri"  # what a step run produced, for the next step
TAG_MODEL_ID = "lightcycle.model_id"
# The MLflow UI picks its pages by this experiment tag: without it, 3.17 opens an experiment as
# a GenAI one (traces, judges, prompts); with this value, as model training (runs, models).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The names MLflow gives runs nobody named ("lyrical-turtle-630"): a step renames only these, so
# a name given with `mlflow run --run-name` stays.
_GENERATED_RUN_NAME = re.compile(r"^[a-z]+-[a-z]+-\d+$")

# The files that decide what a step does. README, tests/, bench/ and the data sample are left
# out on purpose: editing them must not invalidate cached runs. The git commit is recorded
# beside the code version (mlflow.source.git.commit) for lineage, not compared.
SOURCE_GLOBS = ("src/lightcycle/**/*.py", "steps/*.py", "MLproject", "requirements.txt")


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def code_version(root: Path = PROJECT_ROOT) -> str:
    """A content hash of SOURCE_GLOBS: the same on every clone and commit whose step code is
    the same, different as soon as one line of it changes (committed or not)."""
    digest = hashlib.sha256()
    files = sorted({p for pattern in SOURCE_GLOBS for p in root.glob(pattern) if p.is_file()})
    for path in files:
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return "src-" + digest.hexdigest()[:16]


def canonical_param(value: object, like: object) -> str:
    """`value` written the way Python prints a value of `like`'s type ("1e-3" -> "0.001",
    "40.0" -> "40", "True" -> "true"), so that parameters typed by people and parameters
    logged by code compare equal when they mean the same; anything unparsable stays as is."""
    text = str(value).strip()
    try:
        if isinstance(like, bool) or str(like).lower() in ("true", "false"):
            return {"true": "true", "1": "true", "yes": "true",
                    "false": "false", "0": "false", "no": "false"}[text.lower()]
        if isinstance(like, int):
            number = float(text)
            return str(int(number)) if number.is_integer() else text
        if isinstance(like, float):
            return repr(float(text))
    except (KeyError, ValueError):
        pass
    return text


_SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "secret", "token", "key", "sslpassword")


def redact_url(url: str) -> str:
    """`url` with its password (user:PASSWORD@host, or a password-like query argument)
    replaced by ***: what may be logged, tagged or printed. Anything else is left as is."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc, query = parts.netloc, parts.query
    userinfo, _, hostport = netloc.rpartition("@")
    if ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(any(s in k.lower() for s in _SECRET_QUERY_KEYS) for k, _ in pairs):
        query = urlencode([(k, "***" if any(s in k.lower() for s in _SECRET_QUERY_KEYS) else v)
                           for k, v in pairs], safe="*/:")
    if not parts.scheme or (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing secret: exactly as given (urlunsplit would rewrite sqlite:////)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def step_tags(entry_point: str) -> dict[str, str]:
    tags = {TAG_ENTRY_POINT: entry_point, TAG_CODE_VERSION: code_version()}
    commit = git_commit()
    if commit:
        tags[TAG_GIT_COMMIT] = commit
    return tags


def step_run_name(entry_point: str, detail: str = "") -> str:
    """`train-cnn-40ep`, `promote-lightcycle-fashion-scripted`: the step first, as the UI lists it."""
    return f"{entry_point}-{detail}" if detail else entry_point


def label_step_run(entry_point: str, detail: str = "", tags: dict[str, str] | None = None) -> None:
    """Make a step run readable in the UI: the step tags (plus `tags`), a name that starts with
    the step, and its experiment marked as a model-training one.

    Works on the active run, else on the run `mlflow run` made (MLFLOW_RUN_ID) for steps that
    start none (`serve`, `lineage`); outside both it does nothing."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    active = mlflow.active_run()
    run_id = active.info.run_id if active else os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    client = MlflowClient()
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in
                                   {**step_tags(entry_point), **(tags or {})}.items()])
    run = client.get_run(run_id)
    if not run.info.run_name or _GENERATED_RUN_NAME.match(run.info.run_name):
        client.update_run(run_id, name=step_run_name(entry_point, detail))
    mark_experiment(client, run.info.experiment_id)


def mark_experiment(client, experiment_id: str) -> None:
    """Tag the experiment as model training, unless someone gave it another kind."""
    if TAG_EXPERIMENT_KIND not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)


# Every step prints its own progress; MLflow's per-artifact download bars (tqdm, thousands of
# lines a second in a log) and its per-launch "Created directory ... for downloading remote
# URIs" line only bury it. A value the user exported wins.
QUIET_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def quiet_mlflow_console() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    logging.getLogger("mlflow.projects.utils").setLevel(logging.WARNING)


def is_global_rank_zero() -> bool:
    """True outside distributed launches and on global rank 0 inside them.

    Lightning's subprocess launcher sets LOCAL_RANK/NODE_RANK in its children, torchrun sets
    RANK, SLURM sets SLURM_PROCID: any non-zero value means "not the process that logs".
    """
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True


def log_params_once(params: dict[str, object]) -> None:
    """Log params the active run does not have yet.

    `mlflow run` has already logged the entry point's parameters as the user typed them
    (e.g. "1e-3"); logging them again as Python prints them ("0.001") would be refused.
    """
    import mlflow

    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    fresh = {k: str(v) for k, v in params.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)
