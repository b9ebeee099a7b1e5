"""`tune`: an Optuna study over the training hyperparameters, tracked as nested MLflow runs.

One parent run (the `tune` run) holds the study's summary: best params, an optimization
history PNG and a CSV of every trial. Each trial is a child run with its params and per-epoch
validation metrics; a pruned trial ends KILLED with tag `lightcycle.trial.state=PRUNED` (MLflow
has no "pruned" status; KILLED is the one that means "stopped on purpose before the end").

The study lives in an Optuna RDB storage (sqlite by default), so it outlives this process:
`n_trials` is the number of finished (complete or pruned) trials the study should hold, and
re-running the same command after a crash runs only the trials still missing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from lightcycle import defaults
from lightcycle.errors import UserError
from lightcycle.lifecycle import connection, tracking
from lightcycle.lifecycle.promotion_lock import registry_lock
from lightcycle.model import data
from lightcycle.model.nets import NET_NAMES
from lightcycle.training.config import TrainConfig
from lightcycle.training.search_space import suggest, train_params_of
from lightcycle.training.study_report import log_summary
from lightcycle.training.trainer import build_model, build_trainer
from lightcycle.training.trial_reporter import OBJECTIVE, TrialReporter

TAG_STUDY = "lightcycle.study_name"
TAG_STORAGE = "lightcycle.optuna_storage"
TAG_TRIAL = "lightcycle.trial.number"
TAG_TRIAL_STATE = "lightcycle.trial.state"
TAG_WORKER_INDEX = "lightcycle.tune.worker_index"
TAG_SAMPLER_SEED = "lightcycle.tune.sampler_seed"

PRUNERS = ("median", "hyperband", "none")

# Settings a continued study must keep: trials trained differently are not comparable.
_STUDY_SETTINGS = ("epochs", "models", "seed", "data_digest", "objective")


@dataclass
class TuneConfig:
    n_trials: int = defaults.TUNE["n_trials"]
    timeout: float = defaults.TUNE["timeout"]  # seconds for this invocation; 0: no limit
    study_name: str = defaults.TUNE["study_name"]
    # An Optuna storage URL or a sqlite file path; "auto": default_storage()
    optuna_storage: str = defaults.TUNE["optuna_storage"]
    epochs: int = defaults.TUNE["epochs"]  # per trial
    models: str = defaults.TUNE["models"]  # nets to choose from, comma-separated
    pruner: str = defaults.TUNE["pruner"]
    seed: int = defaults.TRAIN["seed"]
    data_dir: str = defaults.TRAIN["data_dir"]
    download: bool = defaults.TRAIN["download"]
    data_mirror: str = defaults.TRAIN["data_mirror"]  # for download: a URL, or auto
    precision: str = defaults.TRAIN["precision"]
    accelerator: str = defaults.TRAIN["accelerator"]
    num_workers: int = defaults.TRAIN["num_workers"]
    train_best: bool = defaults.TUNE["train_best"]
    train_epochs: int = defaults.TUNE["train_epochs"]  # for train_best; 0: the per-trial epochs
    model_name: str = defaults.CHAIN["model_name"]
    min_accuracy: float = defaults.CHAIN["min_accuracy"]
    method: str = defaults.CHAIN["method"]
    deployable: str = defaults.CHAIN["deployable"]  # for train_best, as main's
    # for train_best: where the best trial's training runs (the trials run here)
    engine: str = defaults.TRAIN["engine"]
    num_processes: int = defaults.TRAIN["num_processes"]
    spark_master: str = defaults.TRAIN["spark_master"]
    spark_conf: str = defaults.TRAIN["spark_conf"]

    @property
    def model_choices(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.models.split(",") if m.strip())

    def validate(self) -> None:
        unknown = [m for m in self.model_choices if m not in NET_NAMES]
        if unknown or not self.model_choices:
            raise UserError(f"models={self.models!r}: give a comma-separated subset of "
                            f"{', '.join(NET_NAMES)}.")
        if self.pruner not in PRUNERS:
            raise UserError(f"Unknown pruner {self.pruner!r}: choose one of {', '.join(PRUNERS)}.")
        for name in ("n_trials", "epochs"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.timeout < 0 or self.train_epochs < 0:
            raise UserError("timeout and train_epochs must not be negative.")
        if not self.study_name.strip():
            raise UserError("study_name must not be empty.")
        if self.precision == "16-mixed" and self.accelerator != "gpu":
            raise UserError("precision=16-mixed needs accelerator=gpu; on the CPU use bf16-mixed.")
        data.check_mirror(self.data_mirror)
        if self.train_best:
            from lightcycle.lifecycle.pipeline import parse_deployable

            parse_deployable(self.deployable)  # a typo fails before the study, not after it


def default_storage(tracking_uri: str) -> str:
    """sqlite next to a sqlite tracking store; otherwise one file under the user's data dir.

    A remote tracking server has no directory we can write next to, and the current directory
    changes between invocations, so the fallback is a fixed per-user path.
    """
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        return f"sqlite:///{db.parent / 'optuna.db'}"
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return f"sqlite:///{base / 'lightcycle' / 'optuna.db'}"


ENV_PREFIX = "env:"


def storage_url(value: str, tracking_uri: str) -> str:
    """The Optuna storage URL `value` names. `env:NAME` reads it from environment variable
    NAME, so a URL with a password never becomes a parameter: `mlflow run` logs every -P value
    as one, readable by everyone with READ on the experiment."""
    if value.startswith(ENV_PREFIX):
        name = value.removeprefix(ENV_PREFIX)
        if not os.environ.get(name):
            raise UserError(f"optuna_storage={value}: environment variable {name} is not set. "
                            f"Set it to the storage URL (export {name}=postgresql://...).")
        value = os.environ[name]
    if value == defaults.AUTO:
        value = default_storage(tracking_uri)
    elif "://" not in value:
        value = f"sqlite:///{Path(value).resolve()}"
    if value.startswith("sqlite:///"):
        Path(value.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return value


def fit_trial(cfg: TuneConfig, trial: optuna.Trial, params: dict[str, object],
              run_id: str) -> tuple[float, dict[str, float]]:
    """Train one trial's net; returns the objective and the last epoch's metrics."""
    trial_cfg = TrainConfig(
        model=str(params["model"]), epochs=cfg.epochs, batch_size=int(params["batch_size"]),
        learning_rate=float(params["learning_rate"]),
        weight_decay=float(params["weight_decay"]), seed=cfg.seed, data_dir=cfg.data_dir,
        precision=cfg.precision, accelerator=cfg.accelerator, num_workers=cfg.num_workers,
        width=int(params["width"]), depth=int(params["depth"]))
    module, datamodule = build_model(trial_cfg)
    reporter = TrialReporter(trial, run_id)
    trainer = build_trainer(trial_cfg, log_dir=None, interactive=False, callbacks=(reporter,))
    MlflowClient().log_param(run_id, "net_parameters",
                             sum(p.numel() for p in module.net.parameters()))
    trainer.fit(module, datamodule=datamodule)
    if reporter.pruned:
        raise optuna.TrialPruned(f"pruned after epoch {trainer.current_epoch}")
    last = reporter.history[-1] if reporter.history else {}
    return last.get(OBJECTIVE, math.nan), last


def make_objective(cfg: TuneConfig, study_name: str):
    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(TRIAL_WORKER, _this_process())
        params = suggest(trial, cfg.model_choices)
        # Explicit start/end rather than `with`: a pruned trial must end KILLED, and the
        # context manager would end it (or, once popped, the parent) with its own status.
        run_id = start_trial_run(trial, study_name)
        status = "FAILED"
        try:
            mlflow.log_params({**params, "epochs": cfg.epochs, "seed": cfg.seed,
                               "data_dir": cfg.data_dir, "precision": cfg.precision})
            start = time.perf_counter()
            value, last = fit_trial(cfg, trial, params, run_id)
            mlflow.log_metric("fit_seconds", time.perf_counter() - start)
            if "val_acc" in last:
                trial.set_user_attr("val_acc", last["val_acc"])
            state = "COMPLETE" if math.isfinite(value) else "FAIL"
            mlflow.set_tag(TAG_TRIAL_STATE, state)
            status = "FINISHED" if state == "COMPLETE" else "FAILED"
            return value
        except optuna.TrialPruned:
            mlflow.set_tag(TAG_TRIAL_STATE, "PRUNED")
            status = "KILLED"
            raise
        except BaseException:
            mlflow.set_tag(TAG_TRIAL_STATE, "FAIL")
            raise
        finally:
            mlflow.end_run(status)
    return objective


# "<host>:<pid>" of the process running a trial: lets a worker on the same machine tell that a
# RUNNING trial's process is gone, instead of waiting out the heartbeat grace period.
TRIAL_WORKER = "lightcycle_worker"
TAG_TRIAL_WORKER = "lightcycle.trial.worker"


def trial_run_tags(trial: optuna.Trial, study_name: str) -> dict[str, str]:
    return {TAG_STUDY: study_name, TAG_TRIAL: str(trial.number), TAG_TRIAL_STATE: "RUNNING",
            TAG_TRIAL_WORKER: trial.user_attrs.get(TRIAL_WORKER, _this_process())}


def start_trial_run(trial: optuna.Trial, study_name: str) -> str:
    """The trial's nested MLflow run, created with the tags that find it again, then recorded
    in the trial. A process killed between the two leaves a run that only its tags name."""
    run = mlflow.start_run(run_name=f"trial-{trial.number}", nested=True,
                           tags=trial_run_tags(trial, study_name))
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    return run.info.run_id


def _this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_local_trials(study: optuna.Study) -> None:
    """FAIL the RUNNING trials whose process ran on this machine and is gone (a killed `tune`),
    at once rather than two minutes later when their heartbeat goes stale. Trials of other
    machines are left to the heartbeat."""
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get(TRIAL_WORKER, "")).rpartition(":")
        if worker_host != host or not pid.isdigit() or _process_alive(int(pid)):
            continue
        # skip_if_finished: another worker may have settled it a moment ago.
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        _fail_stale_trial_run(study, trial)
        print(f"[tune] trial {trial.number} was left RUNNING by process {pid}, which is gone: "
              "marked FAIL", flush=True)


def _fail_stale_trial_run(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose process died (no heartbeat) is FAIL in Optuna: settle its MLflow run too.
    Without a recorded run id (the process died just after creating the run), the run is
    looked up by its tags in this tune's experiment."""
    client = MlflowClient()
    try:
        run_id = trial.user_attrs.get("mlflow_run_id")
        worker = trial.user_attrs.get(TRIAL_WORKER)
        active = mlflow.active_run()
        if run_id:
            run_ids = [run_id]
        elif worker and active is not None:
            run_ids = [r.info.run_id for r in client.search_runs(
                [active.info.experiment_id],
                f"tags.`{TAG_STUDY}` = '{study.study_name}' and tags.`{TAG_TRIAL}` = "
                f"'{trial.number}' and tags.`{TAG_TRIAL_WORKER}` = '{worker}' "
                "and attributes.status = 'RUNNING'")]
        else:
            return
        for run_id in run_ids:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, TAG_TRIAL_STATE, "FAIL")
                client.set_terminated(run_id, "FAILED")
    except mlflow.exceptions.MlflowException:
        pass


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        # Never on the first epoch: one-epoch losses mostly reflect the learning-rate warm-up.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()


def open_study(cfg: TuneConfig, storage: str,
               pruner: optuna.pruners.BasePruner | None = None,
               worker_index: int = 0) -> optuna.Study:
    """Create or continue the study. `worker_index` (0 for the first of several workers that
    share a study, see worker_index) keeps their samplers apart."""
    with warnings.catch_warnings():
        # Optuna flags heartbeats as experimental; they are what turns the trial of a
        # crashed process into FAIL instead of leaving it RUNNING forever.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        rdb = _rdb_storage(storage)
    existing = cfg.study_name in optuna.get_all_study_names(rdb)
    settings = {"epochs": cfg.epochs, "models": ",".join(cfg.model_choices), "seed": cfg.seed,
                "data_digest": data.dataset_digest(cfg.data_dir), "objective": OBJECTIVE}
    n_before = 0
    if existing:
        n_before = len(optuna.load_study(study_name=cfg.study_name, storage=rdb).trials)
    # `seed` decides the trials: a fresh study's first worker samples with `seed` itself. A
    # sampler seeded the same on every invocation would replay the first run's random start-up
    # trials, so a continuation is offset by the trials already there, and each further worker
    # by its index (never by anything random, such as a run id).
    seed = cfg.seed + n_before + worker_index
    sampler = optuna.samplers.TPESampler(seed=seed)
    if mlflow.active_run() is not None:
        mlflow.set_tags({TAG_WORKER_INDEX: str(worker_index), TAG_SAMPLER_SEED: str(seed)})
    study = optuna.create_study(
        storage=rdb, study_name=cfg.study_name, direction="minimize", sampler=sampler,
        pruner=pruner or make_pruner(cfg.pruner, cfg.epochs), load_if_exists=True)
    # Record what is not recorded yet, then compare what the study holds: a worker started at
    # the same moment may have created the study and be writing its settings one by one.
    recorded = study.user_attrs
    for key, value in settings.items():
        if recorded.get(key) is None:
            study.set_user_attr(key, value)
    recorded = study.user_attrs
    differ = {k: (recorded.get(k), settings[k]) for k in _STUDY_SETTINGS
              if recorded.get(k) != settings[k]}
    if differ:
        detail = ", ".join(f"{k}: study has {old!r}, this run asks {new!r}"
                           for k, (old, new) in differ.items())
        raise UserError(
            f"Study {cfg.study_name!r} in {tracking.redact_url(storage)} was run with other "
            f"settings ({detail}); "
            "its trials would not be comparable. Use the same settings to continue it, or "
            "a new study_name.")
    return study


def worker_index(parent, study_name: str) -> int:
    """This tune run's place among the tune runs of `study_name` running now in its
    experiment, by start time: 0 for a lone worker, 1, 2, ... for the ones started after it."""
    runs = MlflowClient().search_runs(
        [parent.info.experiment_id],
        f"tags.`{TAG_STUDY}` = '{study_name}' and attributes.status = 'RUNNING' "
        f"and tags.`{tracking.TAG_ENTRY_POINT}` = 'tune'",
        max_results=1000)
    order = sorted((r.info.start_time, r.info.run_id) for r in runs
                   if TAG_TRIAL not in r.data.tags)
    ids = [run_id for _, run_id in order]
    return ids.index(parent.info.run_id) if parent.info.run_id in ids else len(ids)


def _rdb_storage(storage: str) -> optuna.storages.RDBStorage:
    """Optuna's storage, whose first opening creates its tables. Workers started together on a
    new PostgreSQL database race to create them, and the loser gets "already exists" (or a
    duplicate key in PostgreSQL's catalog): by then the tables are there, so open it again."""
    import sqlalchemy.exc

    attempts = 0
    while True:
        try:
            return optuna.storages.RDBStorage(
                storage, heartbeat_interval=30, grace_period=120,
                heartbeat_stale_trial_callback=_fail_stale_trial_run,
            )
        except sqlalchemy.exc.DatabaseError as exc:
            attempts += 1
            text = str(exc).lower()
            if attempts == 3 or not ("already exists" in text or "duplicate key" in text):
                raise
            time.sleep(0.5 * attempts)


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def wait_for_other_workers(study: optuna.Study, poll: float = 2.0) -> None:
    """Until no trial of the study is RUNNING: the summary then counts every worker's trials.

    A trial whose worker died turns FAIL at once when that worker ran on this machine, and
    otherwise once its heartbeat is stale (open_study's grace period), so this ends even then.
    """
    announced = False
    while running := study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not announced:
            print(f"[tune] waiting for {len(running)} trial(s) other workers are running",
                  flush=True)
            announced = True
        fail_dead_local_trials(study)
        optuna.storages.fail_stale_trials(study)
        time.sleep(poll)


def tune(cfg: TuneConfig, pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Run (or continue) the study inside the active MLflow run; optionally train the best.

    `pruner` replaces the one `cfg.pruner` names, for library callers.
    """
    import tempfile

    cfg.validate()
    connection.check_tracking_server()
    data.prepare_once(cfg.data_dir, cfg.download, cfg.data_mirror)
    storage = storage_url(cfg.optuna_storage, mlflow.get_tracking_uri())
    # Lightning prints its device banner once per Trainer: once per trial is noise.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)

    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("tune needs an active MLflow run (the parent of the trial runs)")
    shown = tracking.redact_url(storage)
    mlflow.set_tags({TAG_STUDY: cfg.study_name, TAG_STORAGE: shown})
    index = worker_index(parent, cfg.study_name)
    study = open_study(cfg, storage, pruner, index)
    fail_dead_local_trials(study)
    _warn_if_logged_secret(parent.info.run_id, cfg.optuna_storage)
    tracking.log_params_once({**dataclasses.asdict(cfg),
                              "optuna_storage": tracking.redact_url(cfg.optuna_storage)})

    remaining = cfg.n_trials - len(finished(study))
    print(f"[tune] study {cfg.study_name!r} in {shown}: {len(finished(study))} finished "
          f"trial(s); running up to {max(remaining, 0)} more", flush=True)
    if remaining > 0:
        # The cap is the study's, read from the shared storage after every trial, so several
        # `tune` processes on one study stop together at n_trials (trials other workers are
        # running count too, or each would start one more).
        enough = optuna.study.MaxTrialsCallback(
            cfg.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        study.optimize(make_objective(cfg, cfg.study_name), n_trials=remaining,
                       timeout=cfg.timeout or None, gc_after_trial=True, callbacks=[enough])
    wait_for_other_workers(study)

    with tempfile.TemporaryDirectory(prefix="lightcycle-tune-") as tmp:
        best = log_summary(study, Path(tmp))
    if best is None:
        raise UserError(f"Study {cfg.study_name!r} has no completed trial yet (all pruned or "
                        "failed): raise n_trials, or use pruner=none.")
    print(f"[tune] best trial {best.number}: {OBJECTIVE}={best.value:.4f} "
          f"params={json.dumps(train_params_of(best))}", flush=True)
    if cfg.train_best:
        # One worker trains the best; the others wait for it and then find every step of
        # the chain finished (main's cache), so the best is trained once.
        with registry_lock(MlflowClient(), f"{cfg.model_name}--train-best",
                           parent.info.run_id, timeout=24 * 3600, stale_after=math.inf):
            _train_best(cfg, best)
    return study


def _warn_if_logged_secret(run_id: str, value: str) -> None:
    """`mlflow run` logged the -P values before this code ran; a password among them can only
    be reported (MLflow cannot change or delete a param), never repeated."""
    if tracking.redact_url(value) == value:
        return
    logged = MlflowClient().get_run(run_id).data.params.get("optuna_storage")
    if logged is not None and tracking.redact_url(logged) != logged:
        print(f"[tune] warning: optuna_storage holds a password, and run {run_id} has it as a "
              "parameter that every user with READ can see: change that password, and pass the "
              "URL as optuna_storage=env:NAME, or keep the password in ~/.pgpass (PGPASSFILE).",
              flush=True)


def best_train_params(cfg: TuneConfig, best: optuna.trial.FrozenTrial) -> dict[str, str]:
    """The `train` params of the chain `train_best` runs: the best trial's hyperparameters,
    and this tune run's data, precision and launch settings (a Spark `engine` included)."""
    return {**{k: str(v) for k, v in train_params_of(best).items()},
            "epochs": str(cfg.train_epochs or cfg.epochs), "seed": str(cfg.seed),
            "data_dir": cfg.data_dir, "download": "false", "precision": cfg.precision,
            "accelerator": cfg.accelerator, "devices": "1", "strategy": "auto",
            "num_workers": str(cfg.num_workers), "engine": cfg.engine,
            "num_processes": str(cfg.num_processes), "spark_master": cfg.spark_master,
            "spark_conf": cfg.spark_conf}


def _train_best(cfg: TuneConfig, best: optuna.trial.FrozenTrial) -> None:
    """Send the best trial's params down the normal chain, as children of the tune run."""
    from lightcycle.lifecycle import pipeline

    params = best_train_params(cfg, best)
    result = pipeline.run_pipeline(str(tracking.PROJECT_ROOT), params, cfg.model_name,
                                   cfg.min_accuracy, cfg.method, force=False,
                                   deployable=cfg.deployable)
    mlflow.set_tag(tracking.TAG_OUTPUT_URI, result.steps["train"].output_uri)
    print(pipeline.summary(result), flush=True)
