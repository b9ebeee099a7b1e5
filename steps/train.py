"""Entry point `train`: fit a net on FashionMNIST and log the run, the model and its reports."""

from lightcycle.cli import dataclass_parser, run_step


def main(argv=None):
    from lightcycle.training.config import TrainConfig
    from lightcycle.training.train import train

    args = dataclass_parser(TrainConfig, __doc__).parse_args(argv)
    train(TrainConfig(**vars(args)))


if __name__ == "__main__":
    run_step(main)
