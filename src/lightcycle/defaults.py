"""Every parameter default, in one place: MLproject, the step scripts and the code read these.

Values are written as Python prints them (0.005, not 5e-3): MLflow stores parameters as
strings, and `tests/test_code.py` checks that MLproject's defaults equal these.
"""

AUTO = "auto"  # "work it out": a derived name or location, never an empty string
DATA_DIR = "data/sample"  # relative to the project root: the bundled 900-image sample
MODEL_NAME = "lightcycle-fashion"
PROMOTE_VERSION = "challenger"  # promote gates the version holding this alias by default

TRAIN = {
    "model": "cnn",
    "epochs": 40,
    "batch_size": 32,
    "learning_rate": 0.005,
    "weight_decay": 0.0001,
    "seed": 42,
    "data_dir": DATA_DIR,
    "download": False,
    "data_mirror": AUTO,  # download=true: torchvision's mirrors, or the URL of a copy
    "precision": "32",
    "accelerator": "cpu",
    "devices": "1",
    "strategy": "auto",
    "num_workers": 0,
    "num_nodes": 1,
    "width": 0,  # 0: the net's default
    "depth": 0,
    "engine": "local",  # spark: num_processes Spark barrier tasks (TorchDistributor)
    "num_processes": 2,  # engine=spark only
    "spark_master": AUTO,  # engine=spark: spark-submit's master, else local[num_processes]
    "spark_conf": "none",
}
VAL_FRACTION = 0.1

# What `main` adds to the train parameters (and `tune` with train_best=true).
CHAIN = {
    "model_name": MODEL_NAME,
    "min_accuracy": 0.5,
    "method": "script",
    "deployable": "torchscript",
    "force": False,
}

TUNE = {
    "n_trials": 20,
    "timeout": 0.0,
    "study_name": MODEL_NAME,
    "optuna_storage": AUTO,
    "epochs": 5,
    "models": "cnn,mlp",
    "pruner": "median",
    "train_epochs": 0,
    "train_best": False,
}

SERVE = {"model_uri": f"models:/{MODEL_NAME}-scripted@champion", "host": "127.0.0.1",
         "port": 5001, "workers": 1, "follow": False, "poll_seconds": 10, "webhook_port": 5002,
         "webhook_url": AUTO}
PREDICT = {"output": AUTO, "batch_size": 256, "engine": "local", "spark_master": AUTO,
           "spark_conf": "none"}
