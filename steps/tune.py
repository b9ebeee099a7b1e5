"""Entry point `tune`: an Optuna study over the training hyperparameters, one nested run per trial."""

from lightcycle.cli import dataclass_parser, run_step


def main(argv=None):
    from lightcycle.training.tune import TuneConfig

    cfg = TuneConfig(**vars(dataclass_parser(TuneConfig, __doc__).parse_args(argv)))

    import mlflow

    from lightcycle.lifecycle import connection, tracking
    from lightcycle.training.tune import tune

    cfg.validate()
    connection.check_tracking_server()  # before start_run, which would retry for minutes
    with mlflow.start_run():
        tracking.label_step_run("tune", cfg.study_name)
        tune(cfg)


if __name__ == "__main__":
    run_step(main)
