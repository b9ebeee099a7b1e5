"""What the parent `tune` run shows of a study: the trials table, the history plot, the best trial."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import optuna
from optuna.trial import TrialState

from lightcycle.training.search_space import train_params_of
from lightcycle.training.trial_reporter import OBJECTIVE


def history_figure(study: optuna.Study):
    """Objective per trial, best so far, and pruned trials at their last reported value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    if complete:
        xs = [t.number for t in complete]
        ys = [t.value for t in complete]
        ax.scatter(xs, ys, label="complete", color="tab:blue", zorder=3)
        best, best_line = math.inf, []
        for y in ys:
            best = min(best, y)
            best_line.append(best)
        ax.step(xs, best_line, where="post", color="tab:red", label="best so far")
    reported = [(t.number, t.intermediate_values[max(t.intermediate_values)])
                for t in pruned if t.intermediate_values]
    if reported:
        ax.scatter(*zip(*reported), marker="x", color="tab:gray", label="pruned (last epoch)")
    ax.set_xlabel("trial")
    ax.set_ylabel(OBJECTIVE)
    ax.set_title(f"Optimization history: {study.study_name}")
    if complete or reported:
        ax.legend()
    fig.tight_layout()
    return fig


def log_summary(study: optuna.Study, out_dir: Path) -> optuna.trial.FrozenTrial | None:
    """Log the trials table, the history plot and the best trial to the active (parent) run."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs",
                                          "datetime_start", "datetime_complete", "duration"))
    table = out_dir / "trials.csv"
    frame.to_csv(table, index=False)
    mlflow.log_artifact(str(table))
    fig = history_figure(study)
    mlflow.log_figure(fig, "plots/optimization_history.png")
    import matplotlib.pyplot as plt

    plt.close(fig)

    counts = {state: len(study.get_trials(deepcopy=False, states=(state,)))
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    mlflow.log_metrics({"trials_complete": counts[TrialState.COMPLETE],
                        "trials_pruned": counts[TrialState.PRUNED],
                        "trials_failed": counts[TrialState.FAIL]})
    if not counts[TrialState.COMPLETE]:
        return None
    best = study.best_trial
    best_params = train_params_of(best)
    mlflow.log_params({f"best_{k}": v for k, v in best_params.items()})
    mlflow.log_metrics({f"best_{OBJECTIVE}": best.value, "best_trial": best.number,
                        **({"best_val_acc": best.user_attrs["val_acc"]}
                           if "val_acc" in best.user_attrs else {})})
    mlflow.log_dict({"trial": best.number, OBJECTIVE: best.value,
                     "mlflow_run_id": best.user_attrs.get("mlflow_run_id"),
                     "optuna_params": best.params, "train_params": best_params},
                    "best_params.json")
    mlflow.set_tag("lightcycle.best_trial_run", best.user_attrs.get("mlflow_run_id", ""))
    return best
