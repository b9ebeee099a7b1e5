"""tune's search space: what a trial may choose, and how a finished trial maps back to train parameters."""

from __future__ import annotations

import optuna

# Per-net capacity choices. Separate parameter names per net: Optuna refuses a parameter whose
# categorical choices change between trials, and TPE models each name on its own.
WIDTHS = {"cnn": (8, 16, 32, 48), "mlp": (64, 128, 256, 512)}
MLP_DEPTHS = (1, 2, 3)
BATCH_SIZES = (16, 32, 64, 128)
LR_RANGE = (0.0001, 0.03)
WD_RANGE = (0.000001, 0.01)


def suggest(trial: optuna.Trial, models: tuple[str, ...]) -> dict[str, object]:
    """The search space. Returns train-step parameters (width/depth 0: the net's default)."""
    model = trial.suggest_categorical("model", list(models))
    params: dict[str, object] = {
        "model": model,
        "learning_rate": trial.suggest_float("learning_rate", *LR_RANGE, log=True),
        "weight_decay": trial.suggest_float("weight_decay", *WD_RANGE, log=True),
        "batch_size": trial.suggest_categorical("batch_size", list(BATCH_SIZES)),
        "width": 0,
        "depth": 0,
    }
    if model in WIDTHS:
        params["width"] = trial.suggest_categorical(f"{model}_width", list(WIDTHS[model]))
    if model == "mlp":
        params["depth"] = trial.suggest_categorical("mlp_depth", list(MLP_DEPTHS))
    return params


def train_params_of(trial: optuna.trial.FrozenTrial) -> dict[str, object]:
    """The train-step parameters a finished trial used, rebuilt from its Optuna params."""
    p = trial.params
    model = p["model"]
    return {"model": model, "learning_rate": p["learning_rate"],
            "weight_decay": p["weight_decay"], "batch_size": p["batch_size"],
            "width": p.get(f"{model}_width", 0), "depth": p.get("mlp_depth", 0)}
