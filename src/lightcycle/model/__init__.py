"""The model: data, nets, the LightningModule that trains them, evaluation and plots. Never imports mlflow."""
