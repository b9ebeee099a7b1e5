"""The lifecycle chain through `mlflow run .` against a real tracking server over HTTP.

Every test here runs once per tracking backend (sqlite, postgresql) through the same code;
`@pytest.mark.backends("sqlite")` marks the few whose subject does not depend on the backend
and that cost a full chain run.
"""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import SAMPLE_DIR, check, mlflow_run, runs_of
from lightcycle.lifecycle import export, promote, registry, step_cache
from lightcycle.model import data

pytestmark = pytest.mark.slow


def versions(name):
    try:
        return sorted(int(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'"))
    except mlflow.exceptions.MlflowException:
        return []


@pytest.fixture(scope="module")
def tracking_server(backend_server):
    """This module's tests (and tracking_uri, experiment) use the server of each backend."""
    return backend_server


@pytest.fixture(scope="module")
def chain(tracking_server):
    """One full `mlflow run .` (1 epoch) that the module's tests inspect."""
    mlflow.set_tracking_uri(tracking_server.url)
    experiment_id = mlflow.create_experiment("chain")
    name = "chain-fashion"
    result = check(mlflow_run("main", {"epochs": 1, "model_name": name, "min_accuracy": 0.2},
                              experiment_id, env={"MLFLOW_TRACKING_URI": tracking_server.url}))
    yield {"experiment": experiment_id, "name": name, "deployable": name + "-scripted",
           "stdout": result.stdout, "server": tracking_server}
    mlflow.set_tracking_uri(None)


def test_main_ends_with_one_champion_that_predicts_raw_pixels(chain, tracking_uri):
    assert versions(chain["name"]) == [1]
    assert versions(chain["deployable"]) == [1]
    model = mlflow.pyfunc.load_model(f"models:/{chain['deployable']}@champion")
    test = data.load_split(SAMPLE_DIR, "test")
    out = model.predict(test.images[:, None].astype(np.float32))
    assert list(out.columns) == ["class_id", "label", "probabilities"]
    assert np.allclose(np.stack(out["probabilities"]).sum(1), 1.0, atol=1e-5)
    assert (out["class_id"].to_numpy() == test.labels).mean() > 0.2
    assert out["label"][0] == data.CLASS_NAMES[out["class_id"][0]]


def test_steps_are_children_of_main_and_summary_is_printed(chain, tracking_uri):
    runs = runs_of(chain["experiment"])
    main = [r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "main"]
    assert len(main) == 1
    children = {r.data.tags["mlflow.project.entryPoint"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == main[0].info.run_id}
    assert set(children) == {"train", "register", "torchscript", "promote"}
    assert all(r.info.status == "FINISHED" for r in runs)
    out = chain["stdout"]
    assert "parity max|diff|" in out and "promoted" in out
    assert f"mlflow models serve -m models:/{chain['deployable']}@champion --env-manager local" in out


def test_lineage_tags_on_versions(chain, tracking_uri):
    client = MlflowClient()
    eager = client.get_model_version(chain["name"], "1")
    for key in ("lightcycle.source_run_id", "mlflow.source.git.commit" if "mlflow.source.git.commit" in eager.tags else "lightcycle.code_version",
                "lightcycle.data_digest", "lightcycle.test_accuracy"):
        assert eager.tags.get(key), key
    scripted = client.get_model_version(chain["deployable"], "1")
    assert scripted.tags["lightcycle.source_version"] == f"models:/{chain['name']}/1"
    assert float(scripted.tags["lightcycle.parity_max_abs_diff"]) <= export.PARITY_ATOL
    assert scripted.tags["lightcycle.parity_argmax_mismatches"] == "0"
    assert scripted.tags["lightcycle.gate.decision"] == "promoted"
    assert scripted.aliases and "champion" in scripted.aliases


def test_deployable_is_torchscript_with_metadata(chain, tracking_uri, tmp_path):
    uri = f"models:/{chain['deployable']}/1"
    info = mlflow.models.get_model_info(uri)
    assert info.metadata["class_names"] == list(data.CLASS_NAMES)
    assert info.metadata["format"] == "torchscript"
    local = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path))
    archive = next(p for p in (tmp_path).rglob("model.pt"))
    assert isinstance(torch.jit.load(str(archive)), torch.jit.ScriptModule)
    requirements = (tmp_path / "requirements.txt").read_text() if (tmp_path / "requirements.txt").exists() else \
        next(tmp_path.rglob("requirements.txt")).read_text()
    assert "torch==" in requirements and "lightning" not in requirements
    assert local


def test_rerun_reuses_every_step(chain, tracking_uri):
    before = len(runs_of(chain["experiment"], "train"))
    result = check(mlflow_run("main", {"epochs": 1, "model_name": chain["name"], "min_accuracy": 0.2},
                              chain["experiment"]))
    assert result.stdout.count("reusing finished run") == 4
    assert len(runs_of(chain["experiment"], "train")) == before
    assert versions(chain["name"]) == [1] and versions(chain["deployable"]) == [1]


@pytest.mark.backends("sqlite")
def test_a_gate_is_not_reused_once_the_champion_has_moved(chain, tracking_uri):
    """Someone moves `champion` (here: removes it, as the UI does); the same `main` then gates
    again instead of reporting the old verdict, and the earlier steps stay reused."""
    client = MlflowClient()
    client.delete_registered_model_alias(chain["deployable"], "champion")
    params = {"epochs": 1, "model_name": chain["name"], "min_accuracy": 0.2}
    result = check(mlflow_run("main", params, chain["experiment"]))
    assert "train: reusing" in result.stdout and "torchscript: reusing" in result.stdout
    assert "promote: starting" in result.stdout
    assert client.get_model_version_by_alias(chain["deployable"], "champion").version == "1"
    # Where that gate left the champion is where it is now: the next run reuses it.
    again = check(mlflow_run("main", params, chain["experiment"]))
    assert again.stdout.count("reusing finished run") == 4


def test_changed_gate_param_reuses_earlier_steps_only(chain, tracking_uri):
    result = check(mlflow_run("main", {"epochs": 1, "model_name": chain["name"], "min_accuracy": 0.99},
                              chain["experiment"]))
    assert "train: reusing" in result.stdout and "torchscript: reusing" in result.stdout
    assert "promote: starting" in result.stdout
    assert "rejected" in result.stdout
    assert versions(chain["deployable"]) == [1]
    champion = MlflowClient().get_model_version_by_alias(chain["deployable"], "champion")
    assert champion.version == "1"


def test_cache_compares_the_effective_params_canonically(chain, tracking_uri):
    client = MlflowClient()
    train = runs_of(chain["experiment"], "train", "FINISHED")[0]
    code_version = train.data.tags["lightcycle.code_version"]
    digest = train.data.tags["lightcycle.data_digest"]
    params = {k: train.data.params[k] for k in step_cache.effective_params("train", {})}

    def find(params, code=code_version, data=digest):
        return step_cache.find_cached_run(client, chain["experiment"], "train", params, code, data)

    assert find(params).info.run_id == train.info.run_id
    # The same values written another way are the same parameters.
    assert find({**params, "epochs": "1.0", "learning_rate": "5e-3", "download": "False"}) \
        .info.run_id == train.info.run_id
    different = {"model": "mlp", "epochs": "2", "batch_size": "64", "learning_rate": "0.01",
                 "weight_decay": "0.001", "seed": "7", "data_dir": "data/other", "download": "true",
                 "precision": "bf16-mixed", "accelerator": "gpu", "devices": "2",
                 "strategy": "ddp", "num_workers": "2", "num_nodes": "2", "width": "64",
                 "depth": "3", "engine": "spark", "num_processes": "4"}
    assert set(different) == set(params)
    for key, value in different.items():
        assert find({**params, key: value}) is None, key
    assert find(params, code="another-code-version") is None
    assert find(params, data="another-digest") is None


def test_a_train_run_with_other_settings_is_not_reused_by_default_main(chain, tracking_uri):
    """`mlflow run . -e train -P width=64` logs width=64; main passes no width (default 0), so
    that run must not stand in for main's train step, even though every parameter main
    passes matches."""
    client = MlflowClient()
    train = runs_of(chain["experiment"], "train", "FINISHED")[0]
    wide = client.create_run(chain["experiment"], tags={
        k: v for k, v in train.data.tags.items() if k.startswith("lightcycle.")
        or k == "mlflow.project.entryPoint"})
    client.log_batch(wide.info.run_id, params=[
        mlflow.entities.Param(k, "64" if k == "width" else v) for k, v in train.data.params.items()])
    client.set_terminated(wide.info.run_id, "FINISHED")
    passed_by_main = {k: train.data.params[k] for k in ("model", "epochs", "seed", "data_dir")}
    found = step_cache.find_cached_run(client, chain["experiment"], "train", passed_by_main,
                                       train.data.tags["lightcycle.code_version"],
                                       train.data.tags["lightcycle.data_digest"])
    assert found.info.run_id == train.info.run_id  # the older, default-width run


def test_cache_takes_newest_match_across_pages(chain, tracking_uri, experiment):
    client = MlflowClient()
    ids = []
    for i in range(105):  # more than one page of 100
        run = client.create_run(experiment, tags={"mlflow.project.entryPoint": "train",
                                                  "lightcycle.code_version": "v1",
                                                  "lightcycle.output_uri": "models:/m-missing"})
        logged = step_cache.effective_params("train", {"seed": "7" if i < 2 else "8"})
        client.log_batch(run.info.run_id,
                         params=[mlflow.entities.Param(k, v) for k, v in logged.items()])
        client.set_terminated(run.info.run_id, "FINISHED")
        ids.append(run.info.run_id)
    # Only the two oldest runs (on the last page) match, and their model is gone: a miss.
    assert step_cache.find_cached_run(client, experiment, "train", {"seed": "7"}, "v1") is None
    # Give both a live output: the newer of the two wins, found on the second page.
    for run_id in ids[:2]:
        client.set_tag(run_id, "lightcycle.output_uri", f"models:/{chain['name']}/1")
    found = step_cache.find_cached_run(client, experiment, "train", {"seed": "7"}, "v1")
    assert found.info.run_id == ids[1]


@pytest.mark.backends("sqlite")
def test_promote_gates_on_a_full_size_test_set(chain, tracking_uri, full_size_data, tmp_path):
    """10,000 test images: more than one request's worth (1,024), so the gate must chunk.
    The challenger and the champion it loads leave no copy behind in the temp dir."""
    result = check(mlflow_run("promote", {"model_name": chain["deployable"], "min_accuracy": 0.0,
                                          "data_dir": full_size_data}, chain["experiment"],
                              env={"TMPDIR": str(tmp_path)}))
    assert "per request" not in result.stderr
    assert not list(tmp_path.rglob("MLmodel")), "promote left a downloaded model in TMPDIR"
    gate = runs_of(chain["experiment"], "promote", "FINISHED")[0]
    assert gate.data.tags["lightcycle.data_digest"] == data.dataset_digest(full_size_data)
    assert 0.2 < gate.data.metrics["gate_accuracy"] <= 1.0


def test_register_is_idempotent(chain, tracking_uri, model_name):
    train = runs_of(chain["experiment"], "train", "FINISHED")[0]
    first = check(mlflow_run("register", {"run_id": train.info.run_id, "model_name": model_name},
                             chain["experiment"]))
    second = check(mlflow_run("register", {"run_id": train.info.run_id, "model_name": model_name},
                              chain["experiment"]))
    assert f"registered: models:/{model_name}/1" in first.stdout
    assert f"already registered: models:/{model_name}/1" in second.stdout
    assert versions(model_name) == [1]


def test_register_refuses_unknown_run_clearly(chain, tracking_uri, model_name):
    result = mlflow_run("register", {"run_id": "0" * 32, "model_name": model_name},
                        chain["experiment"])
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert versions(model_name) == []


def test_parity_failure_blocks_logging_and_registration(chain, tracking_uri, experiment, model_name,
                                                         monkeypatch):
    def perturb(module):
        class Shifted(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(x) + 0.01

        return torch.jit.script(Shifted(module))

    # The fault is injected where the product converts: every converted module is off by 0.01.
    convert = export.convert
    monkeypatch.setattr(export, "convert", lambda *args: perturb(convert(*args)))
    with pytest.raises(export.ParityError, match=r"max \|logit diff\| 0.01"):
        with mlflow.start_run() as run:
            export.publish(f"models:/{chain['name']}/1", "script", SAMPLE_DIR, model_name)
    finished = mlflow.get_run(run.info.run_id)
    assert finished.info.status == "FAILED"
    assert finished.outputs is None or not finished.outputs.model_outputs
    assert versions(model_name) == []
    assert finished.data.metrics["parity_max_abs_diff"] == pytest.approx(0.01, rel=1e-3)


def _untrained_deployable(name: str, tmp_path) -> str:
    """A deployable of an untrained `cnn` (about 10% accurate), saved as the chain saves one,
    registered as the next version of `name`."""
    import warnings

    from lightcycle.model.nets import build_net

    torch.manual_seed(0)
    archive = str(tmp_path / "model.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        export.save_archive(torch.jit.freeze(torch.jit.script(build_net("cnn").eval())), archive)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", registered_model_name=name,
                                       **export.deployable_model_kwargs(archive, "torchscript"))
    return str(info.registered_model_version)


def test_gate_refuses_worse_challenger_and_keeps_previous(chain, tracking_uri, experiment,
                                                          model_name, tmp_path):
    client = MlflowClient()
    # Two deployables from the chain's eager version: v1 promoted, then v2 promoted (equal
    # accuracy is "not worse").
    for _ in range(2):
        with mlflow.start_run():
            export.publish(f"models:/{chain['name']}/1", "script", SAMPLE_DIR, model_name)
        with mlflow.start_run():
            result = promote.promote(model_name, 0.1, data_dir=SAMPLE_DIR)
        assert result.promoted, result.reason
    assert client.get_model_version_by_alias(model_name, "champion").version == "2"
    assert client.get_model_version_by_alias(model_name, "previous").version == "1"

    # v3, an untrained net: it clears min_accuracy=0 but is worse than the champion.
    worse = _untrained_deployable(model_name, tmp_path)
    with mlflow.start_run() as run:
        refused = promote.promote(model_name, 0.0, version=worse, data_dir=SAMPLE_DIR)
    assert not refused.promoted and "is worse than the champion's" in refused.reason, refused.reason
    assert refused.accuracy < refused.champion_accuracy and refused.champion.version == "2"
    assert client.get_model_version_by_alias(model_name, "champion").version == "2"
    assert client.get_model_version_by_alias(model_name, "previous").version == "1"
    tags = client.get_model_version(model_name, worse).tags
    assert tags["lightcycle.gate.decision"] == "rejected"
    assert tags["lightcycle.gate.champion_accuracy"] == f"{refused.champion_accuracy:.6g}"
    assert mlflow.get_run(run.info.run_id).data.metrics["gate_promoted"] == 0.0

    # And one that does not clear min_accuracy is refused for that.
    with mlflow.start_run():
        low = promote.promote(model_name, 0.999, version="1", data_dir=SAMPLE_DIR)
    assert not low.promoted and "does not beat min_accuracy" in low.reason
    assert client.get_model_version_by_alias(model_name, "champion").version == "2"


def test_gate_decision_rules():
    assert promote.decide(0.8, 0.5, None)[0]
    assert promote.decide(0.8, 0.5, 0.8)[0]
    assert not promote.decide(0.79, 0.5, 0.8)[0]
    assert not promote.decide(0.5, 0.5, None)[0]


def test_failed_step_then_rerun_reuses_finished_steps(chain, tracking_uri):
    failed = mlflow_run("main", {"epochs": 1, "model_name": chain["name"], "min_accuracy": 0.2,
                                 "method": "bogus"}, chain["experiment"])
    assert failed.returncode != 0
    assert "Unknown conversion method 'bogus'" in failed.stderr + failed.stdout
    assert "train: reusing" in failed.stdout
    bad = [r for r in runs_of(chain["experiment"], "torchscript")
           if r.data.params.get("method") == "bogus"]
    assert bad and all(r.info.status == "FAILED" for r in bad)
    assert versions(chain["deployable"]) == [1]
    # The same command with the typo fixed reuses what finished and redoes nothing.
    trains = len(runs_of(chain["experiment"], "train"))
    rerun = check(mlflow_run("main", {"epochs": 1, "model_name": chain["name"],
                                      "min_accuracy": 0.2}, chain["experiment"]))
    for step in ("train", "register", "torchscript"):
        assert f"{step}: reusing finished run" in rerun.stdout, (step, rerun.stdout[-3000:])
    assert len(runs_of(chain["experiment"], "train")) == trains
    assert versions(chain["name"]) == [1] and versions(chain["deployable"]) == [1]


@pytest.mark.backends("sqlite")  # the artifact store, not the database, is what matters here
def test_cache_miss_when_artifacts_were_deleted(tracking_uri, experiment, model_name, tracking_server):
    """A finished `train` run whose logged model is gone is not reused: `main` trains again."""
    params = {"epochs": 1, "model_name": model_name, "min_accuracy": 0.1}
    check(mlflow_run("train", {"epochs": 1}, experiment))
    train = runs_of(experiment, "train", "FINISHED")[0]

    def cached():  # what main's train step looks up, with main's effective train parameters
        return step_cache.find_cached_run(
            MlflowClient(), experiment, "train", {"epochs": 1},
            train.data.tags["lightcycle.code_version"], train.data.tags["lightcycle.data_digest"])

    assert cached().info.run_id == train.info.run_id  # main would reuse it as it stands
    model_id = train.data.tags["lightcycle.output_uri"].removeprefix("models:/")
    stored = [p for p in tracking_server.artifacts.rglob(model_id) if p.is_dir()]
    assert stored, "logged model files not found under the server's artifact store"
    for path in stored:
        shutil.rmtree(path)
    assert cached() is None
    result = check(mlflow_run("main", params, experiment))
    assert "train: starting" in result.stdout
    assert len(runs_of(experiment, "train", "FINISHED")) == 2


@pytest.mark.backends("sqlite")  # a full re-run; the flag is read before any store call
def test_force_reruns_everything(chain, tracking_uri, tmp_path, model_name):
    """And a whole chain leaves nothing of its own in the temp dir: no model downloads, no
    per-step directories (only the one the `mlflow run` CLI itself makes, and torch's cache).
    Under a model name of its own, so the chain's versions stay [1] for the other tests."""
    before = len(runs_of(chain["experiment"], "train"))
    result = check(mlflow_run("main", {"epochs": 1, "model_name": model_name, "min_accuracy": 0.2,
                                       "force": "true"}, chain["experiment"],
                              env={"TMPDIR": str(tmp_path)}))
    assert "reusing" not in result.stdout
    assert len(runs_of(chain["experiment"], "train")) == before + 1
    # and its train step starts over instead of resuming a failed run's checkpoint
    assert runs_of(chain["experiment"], "train")[0].data.params["resume"] == "false"
    assert versions(model_name) == [1] and versions(chain["name"]) == [1]
    assert not list(tmp_path.rglob("MLmodel")), "a step left a downloaded model in TMPDIR"
    left = [p.name for p in tmp_path.iterdir() if not p.name.startswith("torchinductor_")]
    assert len(left) <= 1 and not any(list(tmp_path.joinpath(name).iterdir()) for name in left), left


def test_lineage_prints_the_whole_chain(chain, tracking_uri):
    """Every line carries the values the registry and the training run hold, not just labels."""
    client = MlflowClient()
    champion = client.get_model_version_by_alias(chain["deployable"], "champion")
    tags = champion.tags
    eager_uri = tags["lightcycle.source_version"]
    eager = client.get_model_version(*eager_uri.removeprefix("models:/").split("/"))
    train = client.get_run(eager.tags["lightcycle.source_run_id"])
    result = check(mlflow_run("lineage", {"model_uri": f"models:/{chain['deployable']}@champion"},
                              chain["experiment"]))
    lines = result.stdout.splitlines()
    expected = [
        f"models:/{chain['deployable']}@champion -> models:/{chain['deployable']}/{champion.version} "
        "(aliases: ",
        f"  deployable   models:/{chain['deployable']}/{champion.version}: "
        f"{tags['lightcycle.conversion']}, parity max|diff|={tags['lightcycle.parity_max_abs_diff']}, "
        "argmax mismatches=0",
        f"  gate         {tags['lightcycle.gate.decision']}: accuracy {tags['lightcycle.gate.accuracy']} "
        f"(min {tags['lightcycle.gate.min_accuracy']}, champion had "
        f"{tags['lightcycle.gate.champion_accuracy'] or 'none'}), run {tags['lightcycle.gate.run_id']}",
        f"  eager        {eager_uri}: test accuracy {eager.tags['lightcycle.test_accuracy']}",
        f"  training run {train.info.run_id} (FINISHED): model=cnn, epochs=1, ",
        "  git commit   " + train.data.tags.get("mlflow.source.git.commit",
                                               "none (not a git checkout)"),
        f"  code version {train.data.tags['lightcycle.code_version']}",
        f"  data digest  {train.data.tags['lightcycle.data_digest']}",
    ]
    for line in expected:
        assert any(printed.startswith(line) for printed in lines), (line, result.stdout[-3000:])
    # Earlier tests in this module gate the champion again (min_accuracy 0.99 rejects it in
    # place, or finds it already champion), so the verdict is whichever gate ran last; lineage
    # must print that one.
    assert tags["lightcycle.gate.decision"] in ("promoted", "rejected", "champion")
    assert train.data.tags["lightcycle.data_digest"] == data.dataset_digest(SAMPLE_DIR)


def test_resolve_rejects_bad_uris(tracking_uri):
    with pytest.raises(registry.UserError, match="expected models:/<name>/<version>"):
        registry.resolve("runs:/abc/model")
    with pytest.raises(registry.UserError, match="does not exist"):
        registry.resolve("models:/no-such-model@champion")
