"""`tune` cost per trial, a two-"node" torchrun epoch, and how fast an unreachable server fails.

    PATH=.venv/bin:$PATH python -m bench.scale.scale
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from bench.common import ROOT, child_env, free_port, markdown_table, save, sqlite_store

TRAIN = str(ROOT / "steps/train.py")


def timed(cmd, env, check=True, timeout=None) -> tuple[float, int | None]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, None
    if check and proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start, proc.returncode


def tune_figures(env, tmp) -> dict:
    import mlflow
    from mlflow import MlflowClient

    figures = {}
    for models in ("mlp", "cnn"):
        storage = f"{tmp}/optuna-{models}.db"
        cmd = ["mlflow", "run", ".", "-e", "tune", "--env-manager", "local", "-P", "n_trials=3",
               "-P", "epochs=2", "-P", f"models={models}", "-P", f"optuna_storage={storage}",
               "-P", f"study_name=bench-{models}"]
        wall, _ = timed(cmd, env)
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        trials = MlflowClient().search_runs(
            ["0"], f"tags.`lightcycle.study_name` = 'bench-{models}' and "
                   "tags.`lightcycle.trial.number` != ''")
        fits = sorted(r.data.metrics.get("fit_seconds", float("nan")) for r in trials)
        rerun, _ = timed(cmd, env)  # the study already holds 3 trials: summary only
        figures[f"tune_{models}"] = {"n_trials_3_epochs_2_wall_s": round(wall, 1),
                                     "trial_fit_s": [round(f, 2) for f in fits],
                                     "rerun_nothing_left_s": round(rerun, 1)}
    return figures


def torchrun_figures(env) -> dict:
    args = ["--model", "mlp", "--epochs", "1"]
    single, _ = timed([sys.executable, TRAIN, *args], env)
    port = free_port()
    start = time.perf_counter()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
         f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}", TRAIN, *args,
         "--devices", "1", "--num_nodes", "2", "--strategy", "ddp"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for rank in (0, 1)]
    codes = [p.wait() for p in procs]
    two_nodes = time.perf_counter() - start
    assert codes == [0, 0], codes
    return {"train_mlp_1_epoch_one_process_s": round(single, 1),
            "train_mlp_1_epoch_torchrun_2_nodes_s": round(two_nodes, 1)}


def unreachable_figures(env) -> dict:
    closed = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    step, code = timed([sys.executable, TRAIN, "--epochs", "1"], closed, check=False)
    assert code == 2, code
    run_cmd = ["mlflow", "run", ".", "-e", "train", "--env-manager", "local", "-P", "epochs=1"]
    no_retry, _ = timed(run_cmd, {**closed, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}, check=False)
    default, code = timed(run_cmd, closed, check=False, timeout=600)
    return {"step_process_fails_after_s": round(step, 1),
            "mlflow_run_fails_after_s_default_retries":
                round(default, 1) if code is not None else "> 600 (stopped)",
            "mlflow_run_fails_after_s_max_retries_0": round(no_retry, 1)}


def main():
    with tempfile.TemporaryDirectory() as tmp:
        env = child_env(MLFLOW_TRACKING_URI=sqlite_store(tmp))
        figures = tune_figures(env, tmp)
        figures.update(torchrun_figures(env))
    figures.update(unreachable_figures(dict(os.environ)))
    save("scale", figures)


def table(figures: dict) -> str:
    rows = []
    for models in ("mlp", "cnn"):
        tune = figures[f"tune_{models}"]
        rows += [[f"`tune` of {models}, 3 trials of 2 epochs", tune["n_trials_3_epochs_2_wall_s"]],
                 [f"`tune` of {models} again, nothing left to try", tune["rerun_nothing_left_s"]]]
    rows += [["`train` of mlp, 1 epoch, one process", figures["train_mlp_1_epoch_one_process_s"]],
             ["the same, torchrun on 2 nodes", figures["train_mlp_1_epoch_torchrun_2_nodes_s"]],
             ["unreachable server: the step process fails after",
              figures["step_process_fails_after_s"]],
             ["unreachable server: `mlflow run` fails after (default retries)",
              figures["mlflow_run_fails_after_s_default_retries"]],
             ["the same, MLFLOW_HTTP_REQUEST_MAX_RETRIES=0",
              figures["mlflow_run_fails_after_s_max_retries_0"]]]
    return markdown_table(["measure", "seconds"], rows)


if __name__ == "__main__":
    main()
