"""The benchmarks without running one: every module imports and says how to run it, and every
`table` renders figures shaped like the ones its benchmark saves (fast)."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from dataclasses import asdict

import pytest

import bench
from bench import dashboard
from bench.serving import load, served_floor

MODULES = sorted(m.name for m in pkgutil.walk_packages(bench.__path__, "bench.") if not m.ispkg)
BENCHMARKS = [m for m in MODULES if m not in ("bench.common", "bench.dashboard")]
ROW = re.compile(r"^\|.*\|$")


def summary(value: float) -> dict:
    return {"median": value, "min": value, "max": value}


def floor_server(ms: float, ratios: bool = True) -> dict:
    figures = {k: summary(ms) for k in ("cold_start_s", "batch1_p50_ms", "batch1_p99_ms",
                                        "batch1_server_cpu_ms", "concurrent_requests_per_s",
                                        "concurrent_errors", "concurrent_server_cpu_ms")}
    if ratios:
        figures.update(in_process_batch64=summary(2000), served_b64_batch64=summary(1500),
                       ratios={goal: summary(1.1) for goal in served_floor.GOALS})
    return figures


def floor_verdicts(servers: list[str]) -> dict:
    return {f"{name}: {goal} {sense} {bound}": "met" for name in servers
            for goal, (sense, bound) in served_floor.GOALS.items()}


SPEEDS = {"batch1_images_per_s": 500, "batch1_vs_frozen": 1.0, "batch1_rounds": [500, 510],
          "batch64_images_per_s": 1700, "batch64_vs_frozen": 1.0, "batch64_rounds": [1700]}
SERVED = {"batch1_p50_ms": 4.1, "batch1_p99_ms": 5.1, "batch64_images_per_s": 1276}
RATIO_ROW = {"served_1_client": 1500, "served_2_clients": 2000, "ratio_1_client": 0.6,
             "ratio_2_clients": 0.8}
TUNE = {"n_trials_3_epochs_2_wall_s": 60.0, "trial_fit_s": [4.1, 4.3], "rerun_nothing_left_s": 9.0}
RUN = {"wall_s": 145.7, "fit_s": 57.8, "world_size": "2"}

# What each benchmark passes to `save` (keys as its code writes them), with made-up values.
FIGURES = {
    "suite_time": {
        "tier": "fast", "command": "make test PYTEST_ARGS=-m \"not slow\"", "exit_code": 0,
        "wall_s": 141.2, "pytest_wall_s": 140.3, "summary": "146 passed in 140.34s",
        "cpu_s": 262.9, "cpu_s_reaped_children": 253.0, "cpu_source": "cgroup"},
    "training.epoch": {
        "rounds": 2, "epochs": 3, "plain_epoch_s_min": 1.6, "lightning_epoch_s_min": 1.8,
        "ratio_of_fastest": 1.125, "plain_epoch_s_median": 1.7, "lightning_epoch_s_median": 1.9,
        "ratio_median_of_rounds": 1.1, "ratios_by_round": [1.1, 1.12], "goal_ratio": 1.05},
    "training.threads": {
        "cores": 2, "processes": 2, "epochs": 3, "default_over_shared": 5.0,
        "alone_default_threads": {"median_epoch_s": 1.6, "epochs_s": [1.6, 1.7]},
        "side_by_side_default_threads": {"median_epoch_s": 9.0, "epochs_s": [9.0]},
        "side_by_side_omp_1": {"median_epoch_s": 1.8, "epochs_s": [1.8]}},
    "training.net_choice": {
        "epochs": 15, "seeds": [0, 1], "seconds": 2.0, "rounds": 2, "candidates": {"cnn": {
            "multiply_adds": 2_500_000, "eager_accuracy_mean": 0.817, "int8_parity_ok_seeds": 2,
            "eager_accuracy_by_seed": [0.81, 0.82], "seeds": [{"seed": 0, "train_s": 30.0}],
            "int8_batch64_images_per_s": 5349, "torchscript_batch64_images_per_s": 2551}}},
    "training.checkpoint_retention": {
        "command": "python -m bench.training.checkpoint_retention 3 cnn", "epochs": 3,
        "kept_checkpoints": 2, "kept_mb": 1.3, "before_mb": 1.95, "log_line": "checkpoints: kept"},
    "chain.chain": {
        "backend": "sqlite", "main_3_epochs_s": 45.2, "main_cached_rerun_s": 6.1,
        "goals": {"main_3_epochs_s": 60, "main_cached_rerun_s": 15},
        "load_average_1_5_15": [1.0, 1.0, 1.0],
        "step_import_s": {"train": {"seconds": 6.18, "imports_lightning": True},
                          "register": {"seconds": 1.94, "imports_lightning": False}}},
    "chain.log_model": {"log_model_s_median": 0.21, "log_model_s_max": 0.22,
                        "register_s_median": 0.017, "goal_s": 1.0},
    "chain.server_start": {"job_runner_on": {"seconds": 21.1, "processes": 10, "rss_mib": 1858.2},
                           "job_runner_off": {"seconds": 13.9, "processes": 2, "rss_mib": 517.0}},
    "serving.deployable": {
        "net": "cnn width 32, 2 epochs seed 42", "train_s": 5.0, "threads": 2, "seconds": 0.5,
        "rounds": 2, "load_average_at_end": [1.0, 1.0, 1.0], "variants": {
            "frozen": {"note": "built in 1.0 s", "accuracy": 0.756, "agreement_test": 1.0,
                       "agreement_synthetic": 1.0, "max_abs_logit_diff": 0.0, **SPEEDS},
            "optimized_live": {"note": "", "fails_at_run_time": "required keyword attribute"}}},
    "serving.formats": {
        "in_process_images_per_s": {"eager": {"batch1": 1826, "batch64": 3030},
                                    "optimize_for_inference": "fails at run time: value"},
        "served_torchscript": {"cold_start_s": 4.26, "batch64_ms_per_request": 50.2, "clients": 1,
                               "vs_best_in_process_batch64": 0.36, **SERVED},
        "batch64_breakdown_ms_torchscript": {"json_parse": 3.15}, "goals": {"cold_start_s": 8}},
    "serving.served": {
        "rounds": 1, "seconds": 3.0, "reference_rev": "1879355", "net": "untrained cnn, seed 0",
        "conversions": {"int8": "stage frozen"}, "goals": {}, "load_average_at_end": [1, 1, 1],
        "medians": {"in_process_batch64": {"images_per_s": 1058.0},
                    "chain_torchscript_in_process_batch64": {"images_per_s": 2500.0},
                    "int8_in_process_batch64": {"images_per_s": 5000.0},
                    "new_cold_start": {"seconds_s": 3.1}, "new_b64": SERVED},
        "ratios": {"new_b64_vs_in_process_batch64": 1.2}},
    "serving.served_ratio": {
        "rounds": 1, "seconds": 3.0, "torch_threads_in_process": 2, "goal": 0.6,
        "load_average_at_end": [1, 1, 1], "rounds_detail": {},
        "medians": {"torchscript": {"in_process": 2500, "in_process_spread": 0.02, **RATIO_ROW},
                    "torchscript_workers2": RATIO_ROW}},
    "serving.served_floor": {
        "rounds": 1, "seconds": 2.0, "latency_requests": 400, "clients": 32, "workers": 1,
        "omp_num_threads": "unset", "load_average_at_end": [1, 1, 1],
        "goals": floor_verdicts(["torchscript", "int8"]),
        "figures": {"noop": floor_server(2.5, ratios=False), "torchscript": floor_server(5.4),
                    "int8": floor_server(3.9)},
        "floors": {"torch_import_s": {"scoring_server": 2.0, "scoring_server_and_torch": 3.1,
                                      "torch_beyond_scoring_server": 1.1},
                   "cold_start_allowance_s": 0.75,
                   **{name: {"batch1_forward_alone_us": 400, "batch1_p50_allowance_us": 300,
                             "concurrent_cpu_allowance_us": 200, "served_extra_p50_us": 500,
                             "served_extra_cpu_per_request_us": 600,
                             "without_project_code": {"project_us_per_batch1_request": 90,
                                                      "project_us_per_b64_batch64_request": 200,
                                                      "project_load_s": 0.1,
                                                      **{goal: 1.2 for goal in served_floor.GOALS}}}
                      for name in ("torchscript", "int8")}},
        "in_process_invocations_profile": {}, "in_process_b64_batch64_profile": {},
        "rounds_detail": {}},
    "serving.invocations": {"batch": 64, "repeats": 30, "reference_json_ms_median": 40.2,
                            "new_json_ms_median": 30.1, "new_b64_ms_median": 20.3,
                            "module_only_ms_median": 17.9, "load_average_at_end": [1, 1, 1]},
    "serving.load": asdict(load.LoadResult(clients=8, seconds=30, requests=120, good=90, bad=30,
                                           statuses={"200": 90, "400": 30})),
    "spark.predict": {
        "load_average_at_start": [1, 1, 1], "spark_session_s": 21.9, "spark": "pyspark, local[2]",
        "images_5000": {"local_s": 12.0, "local_images_per_s": 417, "spark_local2_s": 30.0,
                        "spark_local2_images_per_s": 167, "spark_partitions": 2,
                        "spark_vs_local": 0.4},
        "load_average_at_end": [1, 1, 1]},
    "spark.train": {
        "load_average_at_start": [1, 1, 1], "epochs": 1, "data": "data/sample", "session_s": 41.2,
        "ddp_devices2": [RUN], "spark_local2": [{**RUN, "wall_s": 507.0, "fit_s": 4.2}],
        "noop_distributor_s": 40.0, "spark_vs_ddp_wall_s": 3.48, "spark_vs_ddp_fit_s": 0.07,
        "load_average_at_end": [1, 1, 1]},
    "scale.scale": {
        "tune_mlp": TUNE, "tune_cnn": TUNE, "train_mlp_1_epoch_one_process_s": 15.0,
        "train_mlp_1_epoch_torchrun_2_nodes_s": 30.0, "step_process_fails_after_s": 5.0,
        "mlflow_run_fails_after_s_default_retries": "> 600 (stopped)",
        "mlflow_run_fails_after_s_max_retries_0": 8.0},
    "scale.curve": {
        "sizes": {720: {"main_seconds": 40.1, "epoch_seconds": 1.6, "peak_rss_mib": 900}},
        "serving": {"1_clients": {"requests_per_s": 210.5, "p50_ms": 4.2, "p99_ms": 8.9,
                                  "errors": 0},
                    "8_clients": {"requests_per_s": 300.0, "p50_ms": 25.0, "p99_ms": 60.0,
                                  "errors": 2}}},
}


def saved(name: str) -> dict:
    """FIGURES[name] as the dashboard reads it back: through JSON, with `save`'s machine line."""
    return json.loads(json.dumps({"machine": "host: 2 cores, 2026-12-02", **FIGURES[name]}))


def assert_one_markdown_table(text: str) -> None:
    lines = text.splitlines()
    assert len(lines) >= 3 and all(ROW.match(line) for line in lines), text
    columns = lines[0].count("|")
    assert re.fullmatch(r"\|(---\|)+", lines[1]) and lines[1].count("|") == columns, text
    assert all(line.replace("\\|", "").count("|") == columns for line in lines[2:]), text


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports_and_says_how_to_run_it(name):
    module = importlib.import_module(name)
    assert module.__doc__ and module.__doc__.strip(), f"{name} has no docstring"
    if name == "bench.common":
        return
    usage = rf"^\s+(PATH=\.venv/bin:\$PATH )?python -m {re.escape(name)}( |$)"
    assert re.search(usage, module.__doc__, re.M), f"{name}: no `python -m {name}` usage line"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_has_a_table(name):
    assert callable(getattr(importlib.import_module(name), "table", None)), name


def test_every_benchmark_table_is_checked_here():
    assert sorted(f"bench.{name}" for name in FIGURES) == BENCHMARKS


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_table_renders_its_figures_as_one_markdown_table(name):
    assert_one_markdown_table(importlib.import_module(f"bench.{name}").table(saved(name)))


def test_the_dashboard_fits_in_15_minutes_and_reports_each_benchmark():
    assert sum(b.estimate_s for b in dashboard.BENCHMARKS) <= 15 * 60
    assert [b.area for b in dashboard.BENCHMARKS] == sorted(
        (b.area for b in dashboard.BENCHMARKS), key=list(dashboard.AREAS).index)
    for benchmark in dashboard.BENCHMARKS:
        report = dashboard.section(benchmark, 42.0, saved(benchmark.module))
        assert f"    {benchmark.command}\n" in report and "host: 2 cores, 2026-12-02" in report
        assert_one_markdown_table(report.split("took 42 s\n\n", 1)[1])


def test_the_dashboard_reports_a_failure_with_the_end_of_its_log():
    benchmark = dashboard.BENCHMARKS[0]
    report = dashboard.section(benchmark, 42.0, problem="failed with exit status 1",
                               log_tail=["Traceback", "KeyError: 'x'"])
    assert "**failed with exit status 1** (42 s)" in report
    assert report.endswith("    Traceback\n    KeyError: 'x'")


def test_only_picks_areas_and_benchmarks():
    picked = dashboard.chosen("serving,chain.chain")
    assert [b.module for b in picked] == ["chain.chain", "serving.served_floor",
                                          "serving.deployable"]
    with pytest.raises(SystemExit):
        dashboard.chosen("nothing")
