"""Scaling settings: Trainer arguments, 16-bit, multi-node under torchrun, unreachable server."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from conftest import PROJECT_ROOT, check, free_port, runs_of
from lightcycle.errors import UserError
from lightcycle.training.config import TrainConfig
from lightcycle.training.trainer import build_trainer, trainer_kwargs

TRAIN = [sys.executable, str(PROJECT_ROOT / "steps/train.py")]
# Two torchrun "nodes" on this machine, one process each: an MLP for one epoch keeps it cheap.
NODE_ARGS = ["--model", "mlp", "--epochs", "1", "--devices", "1", "--num_nodes", "2",
             "--strategy", "ddp"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_gpu_settings_reach_the_trainer_arguments():
    cfg = TrainConfig(accelerator="gpu", devices="4", num_nodes=2, strategy="ddp",
                      precision="16-mixed", epochs=3)
    assert trainer_kwargs(cfg) == {"max_epochs": 3, "accelerator": "gpu", "devices": 4,
                                   "num_nodes": 2, "strategy": "ddp", "precision": "16-mixed",
                                   "deterministic": "warn"}
    # A device list (CUDA_VISIBLE_DEVICES style) stays a string, which Lightning parses.
    assert trainer_kwargs(TrainConfig(accelerator="gpu", devices="0,1"))["devices"] == "0,1"


def test_devices_nodes_strategy_and_precision_reach_a_built_trainer(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    cfg = TrainConfig(devices="2", num_nodes=2, strategy="ddp", precision="bf16-mixed")
    trainer = build_trainer(cfg, str(tmp_path), interactive=False)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.num_devices == 2 and trainer.num_nodes == 2 and trainer.world_size == 4
    assert trainer.precision == "bf16-mixed"
    assert type(trainer.accelerator).__name__ == "CPUAccelerator"


@pytest.mark.parametrize("accelerator, expected", [("cpu", True), ("gpu", "warn"),
                                                   ("cuda", "warn")])
def test_determinism_is_chosen_per_accelerator(accelerator, expected):
    # CUDA has no deterministic AdaptiveAvgPool2d backward (the cnn's head, resnet18's pool):
    # deterministic=True would raise there at the first backward.
    assert trainer_kwargs(TrainConfig(accelerator=accelerator))["deterministic"] == expected


def test_a_cpu_trainer_makes_torch_deterministic(tmp_path):
    import torch

    build_trainer(TrainConfig(accelerator="cpu"), str(tmp_path), interactive=False)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_a_gpu_trainer_warns_instead_of_raising(tmp_path):
    import torch

    trainer = build_trainer(TrainConfig(accelerator="gpu"), str(tmp_path), interactive=False)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    # The cnn's AdaptiveAvgPool2d backward, which raises under deterministic=True on CUDA.
    from lightcycle.training.trainer import build_model

    module, datamodule = build_model(TrainConfig(accelerator="gpu", epochs=1))
    trainer.fit_loop.max_batches = 2
    trainer.fit(module, datamodule=datamodule)


@pytest.mark.skipif(_cuda(), reason="checks the message on machines without a GPU")
def test_gpu_on_a_machine_without_one_is_a_clear_error():
    with pytest.raises(UserError, match="no usable CUDA GPU.*use accelerator=cpu"):
        TrainConfig(accelerator="gpu").validate()


@pytest.mark.skipif(_cuda(), reason="on a GPU machine accelerator=auto picks the GPU")
@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_16_mixed_on_the_cpu_is_a_clear_error(accelerator):
    # Lightning would quietly train in bf16-mixed instead; the user asked for fp16.
    with pytest.raises(UserError, match="16-mixed needs a GPU.*use bf16-mixed"):
        TrainConfig(precision="16-mixed", accelerator=accelerator).validate()


def test_launcher_world_size_must_match_devices_times_nodes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--devices 1 --num_nodes 2"):
        TrainConfig(devices="1", num_nodes=1).validate()
    TrainConfig(devices="1", num_nodes=2).validate()


def _closed_port_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # bound then released: nothing listens there


def test_unreachable_tracking_server_fails_before_training():
    uri = _closed_port_uri()
    start = time.monotonic()
    result = subprocess.run(TRAIN + ["--epochs", "1"], capture_output=True, text=True,
                            timeout=300, cwd=PROJECT_ROOT,
                            env={**_env(), "MLFLOW_TRACKING_URI": uri})
    elapsed = time.monotonic() - start
    assert result.returncode == 2
    assert f"error: Cannot reach the MLflow tracking server at {uri}" in result.stderr
    assert "set MLFLOW_TRACKING_URI" in result.stderr
    assert "Traceback" not in result.stderr
    assert "epoch " not in result.stdout  # no training happened
    # MLflow's own HTTP retries would take minutes; the check answers in seconds. The bound
    # only separates those two, it is not a timing measurement.
    assert elapsed < 120, elapsed


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def _torchrun_nodes(extra_env: dict[str, str], timeout: float = 600):
    """Two torchrun invocations, node ranks 0 and 1, meeting at a static master address."""
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}",
               str(PROJECT_ROOT / "steps/train.py"), *NODE_ARGS]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=PROJECT_ROOT, start_new_session=True,
                                      env={**_env(), **extra_env}))
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            outputs.append((proc.returncode, out, err))
    finally:
        from conftest import stop_process

        for proc in procs:
            stop_process(proc)
    return outputs


@pytest.mark.slow
def test_torchrun_two_nodes_make_one_run_and_one_model(experiment, tracking_uri):
    outputs = _torchrun_nodes({})
    for code, out, err in outputs:
        assert code == 0, f"{out[-3000:]}\n{err[-5000:]}"
    (node0_out, node1_out) = (outputs[0][1], outputs[1][1])
    assert node0_out.count("run_id=") == 1 and "run_id=" not in node1_out
    runs = runs_of(experiment)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2" and run.data.params["num_nodes"] == "2"
    assert len(run.outputs.model_outputs) == 1
    # Rank 1 logged nothing: one value per epoch, not one per rank.
    assert len(MlflowClient().get_metric_history(run.info.run_id, "val_loss")) == 1
    assert "test_accuracy" in run.data.metrics


@pytest.mark.slow
def test_torchrun_with_unreachable_server_stops_every_node_before_training():
    uri = _closed_port_uri()
    outputs = _torchrun_nodes({"MLFLOW_TRACKING_URI": uri}, timeout=300)
    for code, out, err in outputs:
        assert code != 0
        assert f"Cannot reach the MLflow tracking server at {uri}" in err
        assert "epoch " not in out
