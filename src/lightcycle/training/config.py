"""The train step's settings and their checks; what a user can get wrong fails here, before training."""

from __future__ import annotations

import os
from dataclasses import dataclass

from lightcycle import defaults
from lightcycle.errors import UserError

PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true")
ENGINES = ("local", "spark")


@dataclass
class TrainConfig:
    model: str = defaults.TRAIN["model"]
    epochs: int = defaults.TRAIN["epochs"]
    batch_size: int = defaults.TRAIN["batch_size"]
    learning_rate: float = defaults.TRAIN["learning_rate"]
    weight_decay: float = defaults.TRAIN["weight_decay"]
    seed: int = defaults.TRAIN["seed"]
    data_dir: str = defaults.TRAIN["data_dir"]
    download: bool = defaults.TRAIN["download"]
    # Where download=true fetches the .gz files: a URL (a copy behind a firewall), or auto
    # for torchvision's mirrors.
    data_mirror: str = defaults.TRAIN["data_mirror"]
    precision: str = defaults.TRAIN["precision"]
    accelerator: str = defaults.TRAIN["accelerator"]
    devices: str = defaults.TRAIN["devices"]
    strategy: str = defaults.TRAIN["strategy"]
    num_workers: int = defaults.TRAIN["num_workers"]
    num_nodes: int = defaults.TRAIN["num_nodes"]
    width: int = defaults.TRAIN["width"]
    depth: int = defaults.TRAIN["depth"]
    engine: str = defaults.TRAIN["engine"]
    num_processes: int = defaults.TRAIN["num_processes"]
    spark_master: str = defaults.TRAIN["spark_master"]
    spark_conf: str = defaults.TRAIN["spark_conf"]
    val_fraction: float = defaults.VAL_FRACTION
    resume: bool = True  # continue a failed run with the same settings from its last checkpoint

    def validate(self, this_machine_trains: bool = True) -> None:
        """`this_machine_trains` False: a Spark driver, whose executors have the GPUs (or not)."""
        from lightcycle.model.nets import NET_NAMES

        if self.model not in NET_NAMES:
            raise UserError(f"Unknown model {self.model!r}: choose one of {', '.join(NET_NAMES)}.")
        if self.precision not in PRECISIONS:
            raise UserError(
                f"Unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}."
            )
        gpu_asked = self.accelerator in ("gpu", "cuda")
        if gpu_asked and this_machine_trains and not _cuda_available():
            raise UserError(
                f"accelerator={self.accelerator} but this machine has no usable CUDA GPU "
                "(torch.cuda.is_available() is False): use accelerator=cpu, or run on a GPU node."
            )
        on_cpu = self.accelerator == "cpu" or (self.accelerator == "auto" and not _cuda_available())
        if self.precision == "16-mixed" and on_cpu:
            # Lightning would silently switch to bf16-mixed on the CPU; say so instead.
            raise UserError(
                "precision=16-mixed needs a GPU (accelerator=gpu); on the CPU use bf16-mixed."
            )
        self._check_engine()
        for name in ("epochs", "batch_size", "num_nodes", "num_processes"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be positive, got {self.learning_rate}.")

        from lightcycle.model.data import check_mirror

        check_mirror(self.data_mirror)
        self._check_launcher_world_size()

    def _check_engine(self) -> None:
        if self.engine not in ENGINES:
            raise UserError(f"Unknown engine {self.engine!r}: choose one of {', '.join(ENGINES)}.")
        if self.engine == "spark" and (self.devices != "1" or self.num_nodes != 1):
            raise UserError(
                f"engine=spark starts num_processes={self.num_processes} Spark tasks, one "
                f"training process each (one GPU each with accelerator=gpu); devices="
                f"{self.devices} and num_nodes={self.num_nodes} do not apply: leave them at 1 "
                "and set num_processes to the total number of processes.")

    @property
    def on_spark(self) -> bool:
        return self.engine == "spark"

    def _check_launcher_world_size(self) -> None:
        """Under torchrun (or anything that sets WORLD_SIZE), the launch must match the Trainer.

        Lightning's own message names no launcher flags; this one says which to change.
        """
        world = os.environ.get("WORLD_SIZE")
        if self.on_spark:  # the Spark tasks set the layout (see trainer.trainer_kwargs)
            return
        if not world or not world.isdigit() or not self.devices.isdigit():
            return
        if int(world) != int(self.devices) * self.num_nodes:
            raise UserError(
                f"The launcher started {world} processes (WORLD_SIZE), but devices={self.devices} "
                f"x num_nodes={self.num_nodes} = {int(self.devices) * self.num_nodes}. Pass "
                "--devices <processes per node> --num_nodes <nodes>, e.g. torchrun "
                "--nproc-per-node=1 --nnodes=2 needs --devices 1 --num_nodes 2."
            )

    @property
    def trainer_devices(self) -> int | str:
        return int(self.devices) if self.devices.isdigit() else self.devices


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
