"""Entry point `train`: fit a net on FashionMNIST and log the run, the model and its reports."""

from lightcycle.cli import dataclass_parser, run_step


def main(argv=None):
    from lightcycle.training.config import TrainConfig

    args = dataclass_parser(TrainConfig, __doc__).parse_args(argv)
    cfg = TrainConfig(**vars(args))
    # Two engines, one training function: Spark's tasks each run lightcycle.training.train.
    if cfg.on_spark:
        from lightcycle.training.spark_train import train_on_spark

        train_on_spark(cfg)
    else:
        from lightcycle.training.train import train

        train(cfg)


if __name__ == "__main__":
    run_step(main)
