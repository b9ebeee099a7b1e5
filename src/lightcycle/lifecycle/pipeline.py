"""`main`: chain train -> register -> torchscript -> promote, reusing finished steps.

Every step runs as its own MLflow project run (the entry point's command, in its own process)
under this run. What a step produced is read back from the tracking server (the step run's
`lightcycle.output_uri` tag) and the registry, never from files on disk.

When a finished step run may stand in for running the step again: see step_cache.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Callable

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run

from lightcycle.errors import UserError
from lightcycle.lifecycle import registry, step_cache, tracking
from lightcycle.lifecycle.promote import TAG_CHAMPION_AFTER



class StepFailed(UserError):
    pass


@dataclass
class StepResult:
    entry_point: str
    run: Run
    cached: bool

    @property
    def output_uri(self) -> str:
        return self.run.data.tags[tracking.TAG_OUTPUT_URI]


DEPLOYABLES = {"torchscript": ("torchscript",), "pt2": ("pt2",), "int8": ("int8",),
               "onnx": ("onnx",), "both": ("torchscript", "pt2")}
# The conversion method behind each deployable (torchscript's is main's `method`).
FORMAT_METHODS = {"pt2": "export", "int8": "quantize", "onnx": "onnx"}


def parse_deployable(choice: str) -> tuple[str, ...]:
    if choice not in DEPLOYABLES:
        raise UserError(f"Unknown deployable {choice!r}: choose one of {', '.join(DEPLOYABLES)} "
                        "(torchscript is the default; pt2 is torch.export's format, onnx runs on "
                        "ONNX Runtime without torch).")
    return DEPLOYABLES[choice]


@dataclass
class PipelineResult:
    """`steps` keys: train, register, then `<format>` (conversion) and `promote:<format>` for each
    deployable built; `champions` maps each format to its champion after the gate, if any."""

    steps: dict[str, StepResult] = field(default_factory=dict)
    champions: dict[str, registry.ModelRef | None] = field(default_factory=dict)

    @property
    def champion(self) -> registry.ModelRef | None:
        """The first deployable's champion (TorchScript unless only pt2 was built)."""
        return next(iter(self.champions.values()), None)


class Pipeline:
    def __init__(self, project_uri: str, parent: Run, force: bool = False) -> None:
        self.client = MlflowClient()
        self.project_uri = project_uri
        self.parent = parent
        self.force = force
        self.code_version = tracking.code_version()

    def step(self, entry_point: str, params: dict[str, object],
             still_valid: Callable[[Run], bool] | None = None) -> StepResult:
        params = {k: str(v) for k, v in params.items()}
        experiment_id = self.parent.info.experiment_id
        if not self.force:
            cached = step_cache.find_cached_run(
                self.client, experiment_id, entry_point, params, self.code_version,
                step_cache.data_digest(params), still_valid)
            if cached is not None:
                print(f"[main] {entry_point}: reusing finished run {cached.info.run_id}", flush=True)
                mlflow.set_tag(f"lightcycle.step.{entry_point}", cached.info.run_id)
                return StepResult(entry_point, cached, cached=True)
        print(f"[main] {entry_point}: starting", flush=True)
        # Inside the active `main` run, MLflow creates the step run as its child and logs the
        # parameters exactly as passed: the strings the cache compares.
        # MLflow makes a directory per project run for `path` parameters (lightcycle has none)
        # and never removes it: one stays behind in /tmp per step, unless it is made in ours.
        with tempfile.TemporaryDirectory(prefix="lightcycle-step-") as storage_dir:
            try:
                submitted = start_entry_point(self.project_uri, entry_point, params,
                                              experiment_id, storage_dir)
            except mlflow.projects.ExecutionException as exc:
                raise StepFailed(f"Step {entry_point} could not start: {exc}") from exc
            run_id = submitted.run_id
            mlflow.set_tag(f"lightcycle.step.{entry_point}", run_id)
            try:
                succeeded = submitted.wait()
            except BaseException:
                submitted.cancel()
                self._terminate(run_id, "KILLED")
                raise
        # A step that died before its own start_run() exited would stay RUNNING: settle it.
        self._terminate(run_id, "FINISHED" if succeeded else "FAILED")
        if not succeeded:
            raise StepFailed(
                f"Step {entry_point} failed (run {run_id}); its output is above. Fix the cause "
                "and re-run the same command: finished steps are reused."
            )
        run = self.client.get_run(run_id)
        if tracking.TAG_OUTPUT_URI not in run.data.tags:
            raise StepFailed(f"Step {entry_point} (run {run_id}) finished without recording "
                             "its output.")
        return StepResult(entry_point, run, cached=False)

    def _terminate(self, run_id: str, status: str) -> None:
        if self.client.get_run(run_id).info.status == "RUNNING":
            self.client.set_terminated(run_id, status)


def start_entry_point(project_uri: str, entry_point: str, params: dict[str, str],
                      experiment_id: str, storage_dir: str | None = None,
                      ) -> "mlflow.projects.SubmittedRun":
    """Start `mlflow run <project> -e <entry_point> --env-manager local` without waiting for it.

    `mlflow.projects.run(synchronous=False)` would start the step through a second `mlflow run`
    CLI process, about 6 s of imports per step before the step's own command starts;
    `synchronous=True` would block without a handle to cancel the step on an interrupt. The
    helper both wrap starts the entry point's command directly and returns its handle: the step
    run, its parameters and its tags are the same as `mlflow run` makes.

    `_run` is private: no public MLflow API starts an entry point in this process and returns
    its handle. tests/test_code.py checks its keyword arguments, so an MLflow that renames or
    reshapes it fails the suite, not a user's chain.
    """
    from mlflow.projects import _run

    return _run(uri=project_uri, experiment_id=experiment_id, entry_point=entry_point,
                version=None, parameters=params, docker_args=None, backend_name="local",
                backend_config={}, env_manager="local", storage_dir=storage_dir, synchronous=True,
                run_name=None, build_image=False, docker_auth=None)


def run_pipeline(project_uri: str, train_params: dict[str, object], model_name: str,
                 min_accuracy: float, method: str, force: bool,
                 deployable: str = "torchscript") -> PipelineResult:
    """Run the chain inside the active run (the `main` run). Returns what each step produced."""
    formats = parse_deployable(deployable)
    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("run_pipeline needs an active MLflow run")
    pipeline = Pipeline(project_uri, mlflow.get_run(parent.info.run_id), force)
    result = PipelineResult()
    data_dir = str(train_params["data_dir"])

    # force re-runs every step, and a forced train starts from scratch instead of resuming.
    train = pipeline.step("train", {**train_params, **({"resume": "false"} if force else {})})
    result.steps["train"] = train
    register = pipeline.step("register", {"run_id": train.run.info.run_id,
                                          "model_name": model_name})
    result.steps["register"] = register
    for fmt in formats:
        name = registry.deployable_name(model_name, fmt)
        conversion = pipeline.step("torchscript", {
            "model_uri": register.output_uri, "method": FORMAT_METHODS.get(fmt, method),
            "data_dir": data_dir, "deployable_name": name})
        result.steps[fmt] = conversion
        converted = registry.resolve(conversion.output_uri, pipeline.client)
        result.steps[f"promote:{fmt}"] = pipeline.step("promote", {
            "model_name": name, "min_accuracy": min_accuracy, "version": converted.version,
            "data_dir": data_dir}, still_valid=lambda run, name=name: _champion_unmoved(
                pipeline.client, name, run))
        champion = registry.alias_version(pipeline.client, name, registry.CHAMPION)
        result.champions[fmt] = registry.ModelRef(name, champion.version) if champion else None
    return result


def _champion_unmoved(client: MlflowClient, name: str, gate_run: Run) -> bool:
    """A gate's verdict stands only while `champion` is where that gate left it."""
    champion = registry.alias_version(client, name, registry.CHAMPION)
    left = gate_run.data.tags.get(TAG_CHAMPION_AFTER)
    return left is not None and left == (champion.version if champion else "")


def summary(result: PipelineResult) -> str:
    def origin(step: StepResult) -> str:
        return "reused" if step.cached else "new"

    train, register = result.steps["train"], result.steps["register"]
    metrics = train.run.data.metrics
    lines = [
        "lightcycle summary",
        f"  train       run {train.run.info.run_id} ({origin(train)}): "
        f"test_accuracy={metrics.get('test_accuracy', float('nan')):.4f}",
        f"  register    {register.output_uri} ({origin(register)})",
    ]
    for fmt, champion in result.champions.items():
        conversion, gate = result.steps[fmt], result.steps[f"promote:{fmt}"]
        conversion_metrics = conversion.run.data.metrics
        lines += [
            f"  {fmt:<11} {conversion.output_uri} ({origin(conversion)}): parity max|diff|="
            f"{conversion_metrics.get('parity_max_abs_diff', float('nan')):.3g}, argmax "
            f"mismatches={int(conversion_metrics.get('parity_argmax_mismatches', -1))}",
            f"  promote     {gate.run.data.tags.get('lightcycle.gate.decision', '?')} "
            f"({origin(gate)}): {gate.run.data.tags.get('lightcycle.gate.reason', '')}",
        ]
        if champion:
            lines += [
                f"  champion    {champion.uri}",
                f"  serve it:   mlflow models serve -m models:/{champion.name}@champion "
                "--env-manager local -p 5001",
            ]
        else:
            lines.append("  champion    none yet (the gate refused this challenger)")
    return "\n".join(lines)
