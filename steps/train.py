"""Entry point `train`: fit a net on FashionMNIST and log the run, the model and its reports."""

import argparse
import dataclasses

from lightcycle.cli import boolean
from lightcycle.tracking import run_step


def main(argv=None):
    from lightcycle.train import TrainConfig, train

    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__)
    for field in dataclasses.fields(TrainConfig):
        default = getattr(defaults, field.name)
        kind = boolean if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{field.name}", type=kind, default=default)
    train(TrainConfig(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    run_step(main)
