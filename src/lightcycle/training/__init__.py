"""Training: Lightning runs under MLflow tracking (train, resume, tune). The one place where the model meets MLflow."""
