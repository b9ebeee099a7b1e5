"""Entry point `tune`: an Optuna study over the training hyperparameters, one nested run per trial."""

import argparse
import dataclasses

from lightcycle.tracking import run_step


def main(argv=None):
    from lightcycle.cli import boolean
    from lightcycle.tune import TuneConfig

    defaults = TuneConfig()
    parser = argparse.ArgumentParser(description=__doc__)
    for field in dataclasses.fields(TuneConfig):
        default = getattr(defaults, field.name)
        kind = boolean if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{field.name}", type=kind, default=default)
    cfg = TuneConfig(**vars(parser.parse_args(argv)))

    import mlflow

    from lightcycle import tracking
    from lightcycle.tune import tune

    cfg.validate()
    tracking.check_tracking_server()  # before start_run, which would retry for minutes
    with mlflow.start_run():
        mlflow.set_tags(tracking.step_tags("tune"))
        tune(cfg)


if __name__ == "__main__":
    run_step(main)
