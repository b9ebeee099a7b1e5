"""The `tune` entry point: an Optuna study as one parent run with one nested run per trial."""

from __future__ import annotations

import io
import json

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import SAMPLE_DIR, check, mlflow_run, runs_of
from lightcycle.errors import UserError

# The cheapest real trial: an MLP, one epoch on the 648-image sample split.
TRIAL = {"epochs": 1, "models": "mlp"}


def _children(experiment_id: str, parent_id: str):
    return MlflowClient().search_runs(
        [experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1000)


def _trial_runs(experiment_id: str, parent_id: str):
    runs = [r for r in _children(experiment_id, parent_id) if "lightcycle.trial.number" in r.data.tags]
    return sorted(runs, key=lambda r: int(r.data.tags["lightcycle.trial.number"]))


def _trials_csv(run_id: str) -> pd.DataFrame:
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/trials.csv")
    return pd.read_csv(io.StringIO(text))


@pytest.fixture(scope="module")
def tuned(tracking_server, tmp_path_factory):
    """`tune` with n_trials=2, then again with n_trials=3 and train_best=true, same study."""
    mlflow.set_tracking_uri(tracking_server.url)
    experiment_id = mlflow.create_experiment("tune-entry-point")
    storage = tmp_path_factory.mktemp("optuna") / "optuna.db"
    env = {"MLFLOW_TRACKING_URI": tracking_server.url}
    common = {**TRIAL, "study_name": "acceptance", "optuna_storage": storage}
    check(mlflow_run("tune", {**common, "n_trials": 2}, experiment_id, env=env))
    first = runs_of(experiment_id, "tune")
    second_result = check(mlflow_run(
        "tune", {**common, "n_trials": 3, "train_best": "true", "min_accuracy": 0.0},
        experiment_id, env=env))
    parents = sorted(runs_of(experiment_id, "tune"), key=lambda r: r.info.start_time)
    yield {"experiment_id": experiment_id, "storage": storage, "first": first,
           "parents": parents, "second_stdout": second_result.stdout}
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_first_run_is_one_parent_with_two_nested_trial_runs(tuned, tracking_uri):
    assert len(tuned["first"]) == 1
    parent = tuned["first"][0]
    assert parent.info.status == "FINISHED"
    trials = _trial_runs(tuned["experiment_id"], parent.info.run_id)
    assert len(trials) == 2
    assert len(_children(tuned["experiment_id"], parent.info.run_id)) == 2
    client = MlflowClient()
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.tags["lightcycle.trial.state"] == "COMPLETE"
        assert run.data.tags["lightcycle.study_name"] == "acceptance"
        for key in ("model", "learning_rate", "weight_decay", "batch_size", "width", "depth",
                    "epochs"):
            assert key in run.data.params, key
        assert run.data.params["model"] == "mlp"
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == [0]  # one value per epoch, from the trial only
        assert "val_acc" in run.data.metrics


@pytest.mark.slow
def test_parent_logs_best_params_history_plot_and_trials_table(tuned, tracking_uri, tmp_path):
    parent = tuned["first"][0]
    trials = _trial_runs(tuned["experiment_id"], parent.info.run_id)
    losses = {r.info.run_id: r.data.metrics["val_loss"] for r in trials}
    best_run = min(losses, key=losses.get)
    best = json.loads(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/best_params.json"))
    assert best["mlflow_run_id"] == best_run
    assert parent.data.tags["lightcycle.best_trial_run"] == best_run
    assert parent.data.metrics["best_val_loss"] == pytest.approx(losses[best_run])
    best_trial = MlflowClient().get_run(best_run).data.params
    assert parent.data.params["best_learning_rate"] == best_trial["learning_rate"]
    assert parent.data.params["best_batch_size"] == best_trial["batch_size"]
    table = _trials_csv(parent.info.run_id)
    assert list(table["number"]) == [0, 1]
    assert set(table["state"]) == {"COMPLETE"}
    assert set(table["user_attrs_mlflow_run_id"]) == set(losses)
    png = mlflow.artifacts.download_artifacts(
        f"runs:/{parent.info.run_id}/plots/optimization_history.png", dst_path=str(tmp_path))
    with open(png, "rb") as f:
        assert f.read(4) == b"\x89PNG"


@pytest.mark.slow
def test_rerun_with_larger_n_trials_continues_the_same_study(tuned, tracking_uri):
    first, second = tuned["parents"]
    assert first.info.run_id == tuned["first"][0].info.run_id
    new_trials = _trial_runs(tuned["experiment_id"], second.info.run_id)
    assert [r.data.tags["lightcycle.trial.number"] for r in new_trials] == ["2"]
    study = optuna.load_study(study_name="acceptance", storage=f"sqlite:///{tuned['storage']}")
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert list(_trials_csv(second.info.run_id)["number"]) == [0, 1, 2]
    assert second.data.tags["lightcycle.optuna_storage"] == f"sqlite:///{tuned['storage']}"


@pytest.mark.slow
def test_train_best_sends_the_best_trial_down_the_chain(tuned, tracking_uri):
    second = tuned["parents"][1]
    steps = {r.data.tags.get("mlflow.project.entryPoint"): r
             for r in _children(tuned["experiment_id"], second.info.run_id)
             if "lightcycle.trial.number" not in r.data.tags}
    assert set(steps) == {"train", "register", "torchscript", "promote"}
    assert all(r.info.status == "FINISHED" for r in steps.values())
    best = json.loads(mlflow.artifacts.load_text(f"runs:/{second.info.run_id}/best_params.json"))
    train = steps["train"].data.params
    for key, value in best["train_params"].items():
        assert train[key] == str(value), key
    assert second.data.tags["lightcycle.output_uri"] == steps["train"].data.tags["lightcycle.output_uri"]
    # The gate ran on the best trial's model, and its verdict is in the registry.
    client = MlflowClient()
    gate = steps["promote"].data.tags
    assert gate["lightcycle.gate.decision"] == "promoted", gate  # min_accuracy=0.0
    champion = client.get_model_version_by_alias("lightcycle-fashion-scripted", "champion")
    assert gate["lightcycle.gate.candidate"] == f"models:/{champion.name}/{champion.version}"
    eager = client.get_model_version(*champion.tags["lightcycle.source_version"]
                                     .removeprefix("models:/").split("/"))
    assert eager.tags["lightcycle.source_run_id"] == steps["train"].info.run_id
    assert f"models:/{champion.name}/{champion.version}: PROMOTED to champion" \
        in tuned["second_stdout"], tuned["second_stdout"][-3000:]


@pytest.mark.slow
def test_pruned_trial_ends_killed_and_tagged(experiment, tmp_path):
    from lightcycle.training.tune import TuneConfig, tune

    cfg = TuneConfig(n_trials=1, epochs=2, models="mlp", data_dir=str(SAMPLE_DIR),
                     study_name="pruned", optuna_storage=str(tmp_path / "optuna.db"))
    # Any positive validation loss after the first epoch prunes: a real pruner, a sure outcome.
    always = optuna.pruners.ThresholdPruner(upper=0.0)
    with mlflow.start_run() as parent:
        with pytest.raises(UserError, match="no completed trial"):
            tune(cfg, pruner=always)
    (trial,) = _trial_runs(experiment, parent.info.run_id)
    assert trial.info.status == "KILLED"
    assert trial.data.tags["lightcycle.trial.state"] == "PRUNED"
    assert [m.step for m in MlflowClient().get_metric_history(trial.info.run_id, "val_loss")] == [0]
    assert list(_trials_csv(parent.info.run_id)["state"]) == ["PRUNED"]
    study = optuna.load_study(study_name="pruned", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED]


@pytest.mark.slow
@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_the_documented_pruners_run_and_timeout_ends_the_study(experiment, tmp_path, pruner):
    """The study `tune` builds from `pruner=` (median by default), consulted after every epoch;
    `timeout=1` ends the study once the trial in progress is done, however many were asked."""
    from lightcycle.training.tune import TuneConfig, tune

    cfg = TuneConfig(n_trials=50, timeout=1, epochs=2, models="mlp", data_dir=str(SAMPLE_DIR),
                     study_name="timed", optuna_storage=str(tmp_path / "optuna.db"),
                     **({} if pruner == "median" else {"pruner": pruner}))
    assert cfg.pruner == pruner
    with mlflow.start_run() as parent:
        study = tune(cfg)
    if pruner == "median":
        assert isinstance(study.pruner, optuna.pruners.MedianPruner)
        assert (study.pruner._n_startup_trials, study.pruner._n_warmup_steps) == (3, 1)
    else:
        assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)
        assert (study.pruner._min_resource, study.pruner._max_resource) == (1, 2)
    # Optuna checks the timeout before each trial: a quick machine fits a few trials in the
    # first second, a loaded one only the first, and no machine all fifty.
    assert 1 <= len(study.trials) < 50, len(study.trials)
    started = [(t.datetime_start - study.trials[0].datetime_start).total_seconds()
               for t in study.trials]
    assert max(started) < cfg.timeout + 0.5, started
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert {t.state for t in study.trials} <= {optuna.trial.TrialState.COMPLETE,
                                               optuna.trial.TrialState.PRUNED}
    assert sorted(study.trials[0].intermediate_values) == [0, 1]  # reported to the pruner
    assert len(_trial_runs(experiment, parent.info.run_id)) == len(study.trials)
    assert MlflowClient().get_run(parent.info.run_id).data.params["pruner"] == pruner


def test_continuing_with_other_settings_is_refused(tmp_path):
    from synthetic import synthetic_data_dir

    from lightcycle.training.tune import TuneConfig, open_study

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    base = {"epochs": 1, "data_dir": str(SAMPLE_DIR), "study_name": "s"}
    open_study(TuneConfig(**base), storage)
    other_data = str(synthetic_data_dir(tmp_path / "other", train=64, test=32))
    for change, detail in [({"epochs": 2}, "epochs: study has 1, this run asks 2"),
                           ({"models": "cnn"}, "models: study has 'cnn,mlp', this run asks 'cnn'"),
                           ({"seed": 7}, "seed: study has 42, this run asks 7"),
                           ({"data_dir": other_data}, "data_digest: study has ")]:
        with pytest.raises(UserError) as refused:
            open_study(TuneConfig(**{**base, **change}), storage)
        assert detail in str(refused.value) and "new study_name" in str(refused.value), \
            (change, str(refused.value))
    # The same settings continue it.
    assert open_study(TuneConfig(**base), storage).study_name == "s"


def test_default_storage_sits_next_to_a_sqlite_tracking_store(tmp_path, monkeypatch):
    from lightcycle.training.tune import default_storage, storage_url

    assert default_storage(f"sqlite:///{tmp_path}/mlflow.db") == f"sqlite:///{tmp_path}/optuna.db"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "share"))
    assert default_storage("http://127.0.0.1:5000") == \
        f"sqlite:///{tmp_path}/share/lightcycle/optuna.db"
    assert storage_url(str(tmp_path / "x" / "s.db"), "ignored") == f"sqlite:///{tmp_path}/x/s.db"
    assert (tmp_path / "x").is_dir()


def test_bad_tune_parameters_say_what_to_choose():
    from lightcycle.training.tune import TuneConfig

    with pytest.raises(UserError, match="comma-separated subset of cnn, mlp, resnet18"):
        TuneConfig(models="cnn,vgg").validate()
    with pytest.raises(UserError, match="choose one of median, hyperband, none"):
        TuneConfig(pruner="asha").validate()
    with pytest.raises(UserError, match="Unknown deployable 'tflite'.*onnx"):
        TuneConfig(train_best=True, deployable="tflite").validate()
    TuneConfig(train_best=True, deployable="onnx").validate()


def test_train_best_sends_the_spark_engine_down_the_chain():
    """`tune -P train_best=true -P engine=spark ...` trains the best trial on Spark as `train`
    would (the chain itself on Spark: test_spark's main engine=spark)."""
    import yaml

    from conftest import PROJECT_ROOT
    from lightcycle.training.tune import TuneConfig, best_train_params

    best = optuna.trial.create_trial(
        params={"model": "mlp", "learning_rate": 0.002, "weight_decay": 0.0001,
                "batch_size": 32, "mlp_width": 128, "mlp_depth": 2},
        distributions={"model": optuna.distributions.CategoricalDistribution(["cnn", "mlp"]),
                       "learning_rate": optuna.distributions.FloatDistribution(1e-4, 0.03),
                       "weight_decay": optuna.distributions.FloatDistribution(1e-6, 0.01),
                       "batch_size": optuna.distributions.CategoricalDistribution([16, 32]),
                       "mlp_width": optuna.distributions.CategoricalDistribution([64, 128]),
                       "mlp_depth": optuna.distributions.CategoricalDistribution([1, 2])},
        value=0.5)
    cfg = TuneConfig(train_best=True, engine="spark", num_processes=3,
                     spark_master="spark://127.0.0.1:7077", spark_conf="spark.executor.cores=1",
                     train_epochs=4)
    params = best_train_params(cfg, best)
    assert {k: params[k] for k in ("engine", "num_processes", "spark_master", "spark_conf")} == {
        "engine": "spark", "num_processes": "3", "spark_master": "spark://127.0.0.1:7077",
        "spark_conf": "spark.executor.cores=1"}
    assert (params["model"], params["width"], params["depth"], params["epochs"]) == \
        ("mlp", "128", "2", "4")
    train_params = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())[
        "entry_points"]["train"]["parameters"]
    assert set(params) <= set(train_params), set(params) - set(train_params)


def test_tune_imports_only_what_it_needs():
    import subprocess
    import sys

    def loaded(imports):
        code = f"import sys, {imports}; print('\\n'.join(sys.modules))"
        return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True).stdout.split())

    # Lightning itself loads torchvision and matplotlib; these are the ones tune could avoid.
    tune = loaded("lightcycle.training.tune")
    for heavy in ("lightcycle.training.train", "lightcycle.lifecycle.pipeline", "mlflow.pytorch", "tensorboard",
                  "plotly"):
        assert heavy not in tune, heavy
    assert "optuna" not in loaded("lightcycle.training.train, lightcycle.lifecycle.pipeline")


def test_a_trial_run_whose_id_was_never_recorded_is_settled_by_its_tags(experiment, tmp_path):
    """The moment the killed-tune test below cannot aim at: a worker created the trial's MLflow
    run and died before recording its id in the trial. The next tune on this machine finds the
    run by its tags and fails it with the trial; another worker's running trial is left alone."""
    import socket
    import subprocess

    from lightcycle.training import tune

    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid now names no process
    study = optuna.create_study(study_name="window", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    client = MlflowClient()
    orphans = {}
    for worker in (f"{socket.gethostname()}:{gone.pid}", tune._this_process()):
        trial = study.ask()
        trial.set_user_attr(tune.TRIAL_WORKER, worker)
        orphans[worker] = client.create_run(experiment, tags=tune.trial_run_tags(trial, "window"))
    with mlflow.start_run():  # the next tune's parent run
        tune.fail_dead_local_trials(study)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING]
    dead_run, live_run = (client.get_run(r.info.run_id) for r in orphans.values())
    assert dead_run.info.status == "FAILED" and dead_run.data.tags[tune.TAG_TRIAL_STATE] == "FAIL"
    assert live_run.info.status == "RUNNING"


@pytest.mark.slow
def test_a_killed_tune_resumes_its_study_instead_of_starting_over(experiment, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import PROJECT_ROOT, stop_process
    from lightcycle.training.tune import TRIAL_WORKER

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # Ten MLP epochs per trial leave a few seconds to kill it inside trial 1, even on a quiet
    # machine (two epochs took under a second there: the kill came after tune had finished).
    cmd = [sys.executable, str(PROJECT_ROOT / "steps/tune.py"), "--n_trials", "2",
           "--epochs", "10", "--models", "mlp", "--study_name", "crash",
           "--optuna_storage", str(tmp_path / "optuna.db"), "--data_dir", str(SAMPLE_DIR)]
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Kill it (no clean-up runs) once the first trial is done and the second has begun.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                trials = optuna.load_study(study_name="crash", storage=storage).trials
            except KeyError:  # the study is not created yet
                trials = []
            if len(trials) >= 2 and {TRIAL_WORKER, "mlflow_run_id"} <= trials[1].user_attrs.keys():
                break
            time.sleep(0.2)
        assert proc.poll() is None, "tune finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        stop_process(proc)
    rerun = subprocess.run(cmd, cwd=PROJECT_ROOT, check=True, capture_output=True, text=True,
                           timeout=600)
    trials = optuna.load_study(study_name="crash", storage=storage).trials
    states = [t.state for t in trials]
    # Trial 0 kept; trial 1, left RUNNING by the killed process on this machine, marked FAIL
    # at once (not after the two-minute heartbeat grace); one new trial reaches n_trials=2.
    assert states[0] == states[2] == optuna.trial.TrialState.COMPLETE
    assert states[1] == optuna.trial.TrialState.FAIL
    assert len(states) == 3
    assert "trial 1 was left RUNNING by process" in rerun.stdout
    assert MlflowClient().get_run(trials[1].user_attrs["mlflow_run_id"]).info.status == "FAILED"


@pytest.mark.slow
def test_two_tune_workers_share_one_postgresql_study(postgresql_cluster, experiment, model_name,
                                                     monkeypatch):
    """Two `mlflow run . -e tune` processes started at once on one study in PostgreSQL: they
    share the trials (no trial number twice, n_trials in all), each parent run's summary
    counts every trial, and the best is trained once."""
    import subprocess

    from conftest import PROJECT_ROOT, stop_process

    postgresql_cluster.create_database("optuna")
    storage = postgresql_cluster.uri("optuna")  # no password in it: PGPASSFILE holds it
    monkeypatch.setenv("PGPASSFILE", postgresql_cluster.env()["PGPASSFILE"])
    params = {**TRIAL, "n_trials": 4, "study_name": "shared", "optuna_storage": storage,
              "train_best": "true", "model_name": model_name, "min_accuracy": 0.0,
              "deployable": "onnx"}
    cmd = ["mlflow", "run", str(PROJECT_ROOT), "-e", "tune", "--env-manager", "local",
           "--experiment-id", experiment, *[a for k, v in params.items() for a in ("-P", f"{k}={v}")]]
    workers = [subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
               for _ in range(2)]
    try:
        outputs = [w.communicate(timeout=900)[0] for w in workers]
    finally:
        for worker in workers:
            stop_process(worker)
    assert [w.returncode for w in workers] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)

    study = optuna.load_study(study_name="shared", storage=storage)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)]
    # n_trials in all; a worker may start one more only if both start their last at once.
    assert 4 <= len(finished) <= 5 and len(study.trials) == len(finished)
    parents = runs_of(experiment, "tune", "FINISHED")
    assert len(parents) == 2
    trial_numbers = []
    for parent in parents:
        metrics = parent.data.metrics
        assert metrics["trials_complete"] + metrics["trials_pruned"] == len(finished)
        trial_numbers += [int(r.data.tags["lightcycle.trial.number"])
                          for r in _trial_runs(experiment, parent.info.run_id)]
    assert sorted(trial_numbers) == sorted(numbers)  # each trial ran once, in one worker
    assert len(runs_of(experiment, "train")) == 1  # train_best trained once
    assert sum("train: reusing finished run" in out for out in outputs) == 1
    # The best went down the chain as `-P deployable=onnx` says: an onnx champion, gated.
    champion = MlflowClient().get_model_version_by_alias(f"{model_name}-onnx", "champion")
    assert champion.tags["lightcycle.conversion"] == "onnx/exported"

