"""The benchmarks: every module imports and says how to run it, the shared machinery measures
what it says against a small local server, the dashboard prints what a benchmark returned, the
venv keeps uvloop and httptools out (fast); the serving floor runs end to end (slow)."""

from __future__ import annotations

import http.server
import importlib
import importlib.util
import json
import pkgutil
import re
import sys
import threading

import pytest

import bench
from bench import common, dashboard

MODULES = sorted(m.name for m in pkgutil.walk_packages(bench.__path__, "bench.") if not m.ispkg)
BENCHMARKS = [m for m in MODULES if m not in ("bench.common", "bench.dashboard")]


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports_and_says_how_to_run_it(name):
    module = importlib.import_module(name)
    assert module.__doc__ and module.__doc__.strip(), f"{name} has no docstring"
    if name == "bench.common":
        return
    usage = rf"^\s+(PATH=\.venv/bin:\$PATH )?python -m {re.escape(name)}( |$)"
    assert re.search(usage, module.__doc__, re.M), f"{name}: no `python -m {name}` usage line"
    if name != "bench.dashboard":
        assert callable(getattr(module, "main", None)), f"{name} has no main(argv)"


def test_uvicorn_runs_without_uvloop_and_httptools():
    # litserve depends on uvicorn[standard]; installed with its dependencies, it would bring
    # uvloop and httptools, which uvicorn then takes for every `mlflow models serve`.
    assert importlib.util.find_spec("uvloop") is None
    assert importlib.util.find_spec("httptools") is None
    assert importlib.util.find_spec("litserve") is not None  # bench/requirements.txt is installed


class Answers(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the benchmarks' clients use it

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status, text = (200, b'{"ok": 1}') if body == b"good" else (400, b"no")
        self.send_response(status)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/invocations"
    server.shutdown()


def test_clients_load_counts_answers_by_kind_and_problem(url):
    mix = [common.Request(b"good", "good", 64), common.Request(b"bad", "bad", 0)]
    got = common.clients_load(url, mix, clients=4, count=10, warmup=2)
    assert got["requests"] == 40 and got["kinds"]["good"] + got["kinds"]["bad"] == 40
    assert got["kinds"]["bad"] > 0 and got["problems"]["status 400"] == got["kinds"]["bad"]
    assert got["errors"] == got["kinds"]["bad"] and got["statuses"]["400"] == got["kinds"]["bad"]
    assert got["images_per_s"] == pytest.approx(64 * got["kinds"]["good"] / got["seconds"], rel=0.05)
    assert 0 < got["p50_ms"] <= got["p99_ms"]


def test_clients_load_for_seconds_keeps_every_client_busy(url):
    got = common.clients_load(url, [common.Request(b"good")], clients=2, seconds=0.5)
    assert got["errors"] == 0 and got["requests"] > 10 and 0.4 < got["seconds"] < 2


def test_start_server_times_the_first_200_and_stops_its_group(tmp_path):
    port = common.free_port()
    with common.serving([sys.executable, "-m", "http.server", str(port), "-b", "127.0.0.1",
                         "-d", str(tmp_path)], f"http://127.0.0.1:{port}/") as (proc, seconds):
        assert 0 < seconds < 30 and proc.poll() is None
        assert common.server_usage(proc)[1] > 0  # its RSS, read from its process group
    assert proc.poll() is not None
    with pytest.raises(RuntimeError, match="exited with 3"):
        common.start_server([sys.executable, "-c", "raise SystemExit(3)"], "http://127.0.0.1:9/")


def test_summary_and_its_cell():
    assert common.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert common.cell(common.summary([1, 2, 4000])) == "2 (1-4,000)"
    assert common.percentile([5, 1, 3, 2, 4], 0.5) == 3


def test_report_saves_what_the_dashboard_prints(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    result = common.report("x", {"a": 1}, (["measure", "s"], [["start", 1.5]]))
    assert json.loads((tmp_path / "x.json").read_text())["tables"] == result["tables"]
    benchmark = dashboard.BENCHMARKS[0]
    text = dashboard.section(benchmark, 42.0, result)
    assert f"    {benchmark.command}\n" in text and "took 42 s" in text
    assert text.endswith("| measure | s |\n|---|---|\n| start | 1.5 |")


def test_the_floor_verdicts_follow_the_goals():
    from bench.serving import served

    assert set(served.GOALS) >= {"onnx batch-1 p50 / no-op", "onnx cold start / LitServe"}
    assert all(sense in ("<=", "<", ">=", ">") for sense, _ in served.GOALS.values())


def test_the_dashboard_fits_in_15_minutes_and_reports_a_failure():
    assert sum(b.estimate_s for b in dashboard.BENCHMARKS) <= 15 * 60
    assert [b.area for b in dashboard.BENCHMARKS] == sorted(
        (b.area for b in dashboard.BENCHMARKS), key=list(dashboard.AREAS).index)
    for benchmark in dashboard.BENCHMARKS:
        importlib.import_module(f"bench.{benchmark.module}")
    report = dashboard.section(dashboard.BENCHMARKS[0], 42.0, problem="failed with exit status 1",
                               log_tail=["Traceback", "KeyError: 'x'"])
    assert "**failed with exit status 1** (42 s)" in report
    assert report.endswith("    Traceback\n    KeyError: 'x'")


def test_only_picks_areas_and_benchmarks():
    picked = dashboard.chosen("serving,chain.chain")
    assert [b.results for b in picked] == ["chain", "served_floor", "deployables"]
    with pytest.raises(SystemExit):
        dashboard.chosen("nothing")


@pytest.mark.slow
def test_the_serving_floor_serves_four_servers_side_by_side(monkeypatch, tmp_path):
    from bench.serving import served

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    result = served.main(["--variant", "floor", "--rounds", "1", "--seconds", "0.5",
                          "--train-epochs", "0", "--latency-requests", "50", "--clients", "4"])
    assert list(result["figures"]) == ["noop", "torchscript", "onnx", "litserve"]
    for name, figures in result["figures"].items():
        assert figures["cold start (s)"]["median"] > 0, name
        assert figures["4 clients, requests/s: errors"]["max"] == 0, name
        assert figures["base64 batch 64, images/s"]["median"] > 0, name
    assert set(result["goals"].values()) <= {"met", "missed"} and len(result["goals"]) == 7
    assert (tmp_path / "served_floor.json").exists()
