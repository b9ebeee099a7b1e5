"""`tune`'s `seed` decides its trials (issue 22): a fresh study with a given seed draws the same
trials every time, and workers sharing a study are seeded apart by their index."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import SAMPLE_DIR
from lightcycle.lifecycle import tracking
from lightcycle.training import tune
from lightcycle.training.search_space import suggest, train_params_of


@pytest.mark.slow
def test_a_fresh_study_with_a_seed_draws_the_same_trials(tracking_uri, experiment, tmp_path):
    drawn = []
    for i in range(2):
        with mlflow.start_run() as parent:  # a new run id each time: it must not matter
            study = tune.tune(tune.TuneConfig(n_trials=2, epochs=1, models="cnn,mlp", seed=7,
                                              study_name=f"fresh-{i}", pruner="none",
                                              optuna_storage=str(tmp_path / f"{i}.db"),
                                              data_dir=str(SAMPLE_DIR)))
        drawn.append([train_params_of(t) for t in study.trials])
        tags = MlflowClient().get_run(parent.info.run_id).data.tags
        assert (tags[tune.TAG_WORKER_INDEX], tags[tune.TAG_SAMPLER_SEED]) == ("0", "7")
    assert drawn[0] == drawn[1] and len(drawn[0]) == 2


def _sampled(cfg: tune.TuneConfig, storage: str, index: int) -> list[dict]:
    study = tune.open_study(cfg, storage, worker_index=index)
    params = []
    for _ in range(3):
        trial = study.ask()
        params.append(suggest(trial, cfg.model_choices))
        study.tell(trial, 1.0)
    return params


def test_workers_sharing_a_study_are_seeded_apart_by_worker_index(tracking_uri, experiment,
                                                                 tmp_path):
    client = MlflowClient()
    tags = {tracking.TAG_ENTRY_POINT: "tune", tune.TAG_STUDY: "shared"}
    first = client.create_run(experiment, tags=tags, start_time=1_000)
    second = client.create_run(experiment, tags=tags, start_time=2_000)
    done = client.create_run(experiment, tags=tags, start_time=500)
    client.set_terminated(done.info.run_id, "FINISHED")  # a finished worker holds no index
    client.create_run(experiment, tags={**tags, tune.TAG_TRIAL: "0"}, start_time=1)  # a trial
    assert [tune.worker_index(r, "shared") for r in (first, second)] == [0, 1]

    cfg = tune.TuneConfig(epochs=1, models="cnn,mlp", seed=7, study_name="s",
                          data_dir=str(SAMPLE_DIR))
    again = _sampled(cfg, f"sqlite:///{tmp_path / 'a.db'}", 1)
    assert _sampled(cfg, f"sqlite:///{tmp_path / 'b.db'}", 1) == again  # reproducible...
    assert _sampled(cfg, f"sqlite:///{tmp_path / 'c.db'}", 0) != again  # ...and apart
