"""`download=true`, offline: a local HTTP mirror on 127.0.0.1, every launcher, each rank into an
empty data_dir, and a corrupt mirror that every rank reports the same way."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from conftest import PROJECT_ROOT, SAMPLE_DIR, check, free_port, mlflow_run, runs_of, stop_process
from lightcycle.model import data
from mirror import GZ_NAMES, build_files, serve

pytestmark = pytest.mark.slow

SAMPLE_DIGEST = data.dataset_digest(SAMPLE_DIR)
CORRUPT = "t10k-labels-idx1-ubyte.gz"


@pytest.fixture(scope="module")
def mirrors(tmp_path_factory):
    """(good, corrupt): the sample's files, and the same with one file's bytes changed."""
    root = tmp_path_factory.mktemp("mirrors")
    good = serve(build_files(data.raw_dir(SAMPLE_DIR), root / "good"))
    bad_root = root / "corrupt"
    shutil.copytree(good.root, bad_root)
    blob = bytearray((bad_root / CORRUPT).read_bytes())
    blob[-12] ^= 0xFF
    (bad_root / CORRUPT).write_bytes(bytes(blob))
    bad = serve(bad_root)
    yield good, bad
    good.server.shutdown()
    bad.server.shutdown()


@pytest.fixture
def good(mirrors, tmp_path, monkeypatch):
    """The good mirror, its request log emptied, and the MD5 patch in this test's children."""
    mirror = mirrors[0]
    mirror.requests.clear()
    for key, value in mirror.env(tmp_path / "site").items():
        monkeypatch.setenv(key, value)
    return mirror


def _downloaded_once(mirror) -> None:
    assert [mirror.downloads(name) for name in GZ_NAMES] == [1, 1, 1, 1], mirror.requests


def _trained_on_the_mirror(experiment, data_dir):
    [run] = runs_of(experiment)
    assert run.info.status == "FINISHED"
    assert run.data.tags["lightcycle.data_digest"] == SAMPLE_DIGEST
    assert data.dataset_digest(data_dir) == SAMPLE_DIGEST
    return run


def test_train_downloads_from_the_mirror_into_an_empty_data_dir(good, experiment, tmp_path):
    data_dir = tmp_path / "empty"
    result = check(mlflow_run("train", {"epochs": 1, "download": "true", "data_dir": data_dir,
                                        "data_mirror": good.url}, experiment))
    run = _trained_on_the_mirror(experiment, data_dir)
    assert run.data.params["data_mirror"] == good.url
    _downloaded_once(good)
    assert f"Downloading {good.url}train-images-idx3-ubyte.gz" in result.stdout


def test_lightning_ddp_downloads_once(good, experiment, tmp_path):
    data_dir = tmp_path / "empty"
    check(mlflow_run("train", {"epochs": 1, "download": "true", "data_dir": data_dir,
                               "data_mirror": good.url, "strategy": "ddp", "devices": 2},
                     experiment))
    assert _trained_on_the_mirror(experiment, data_dir).data.params["world_size"] == "2"
    _downloaded_once(good)


def _torchrun(data_dir, mirror_url: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The command a user types: one node, two ranks, each reading `data_dir`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           f"--master-port={free_port()}", str(PROJECT_ROOT / "steps/train.py"),
           "--devices", "2", "--strategy", "ddp", "--download", "true", "--data_dir",
           str(data_dir), "--data_mirror", mirror_url, "--epochs", "1", "--model", "mlp"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=PROJECT_ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop_process(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_torchrun_ranks_wait_for_local_rank_zero(good, experiment, tmp_path):
    good.delay_s = 0.3  # rank 1 would read a half-downloaded data_dir, were it not waiting
    try:
        result = check(_torchrun(tmp_path / "empty", good.url))
    finally:
        good.delay_s = 0.0
    _trained_on_the_mirror(experiment, tmp_path / "empty")
    _downloaded_once(good)
    assert result.stdout.count("run_id=") == 1


def _names_file_and_mirror(text: str, mirror_url: str) -> None:
    assert f"error: Could not download {CORRUPT} from {mirror_url}" in text
    assert "MD5" in text and "data_mirror" in text


def test_corrupt_file_fails_naming_the_file_and_the_mirror(mirrors, good, experiment, tmp_path):
    bad = mirrors[1]
    result = mlflow_run("train", {"epochs": 1, "download": "true", "data_dir": tmp_path / "d",
                                  "data_mirror": bad.url}, experiment)
    assert result.returncode != 0
    _names_file_and_mirror(result.stderr, bad.url)
    assert "Traceback" not in result.stderr
    assert [r.info.status for r in runs_of(experiment)] == ["FAILED"]
    assert not (data.raw_dir(tmp_path / "d") / CORRUPT).exists()  # no bad file left behind


def test_corrupt_file_under_torchrun_fails_every_rank_with_the_same_message(mirrors, good,
                                                                             tmp_path):
    bad = mirrors[1]
    start = time.monotonic()
    result = _torchrun(tmp_path / "d", bad.url, timeout=300)
    assert result.returncode != 0
    # Each rank prints its own "error: ..." line, the same one.
    lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 2 and lines[0] == lines[1], result.stderr[-3000:]
    _names_file_and_mirror(lines[0], bad.url)
    assert "Traceback" not in "\n".join(lines)
    assert "epoch " not in result.stdout
    # Not a rendezvous or process-group timeout (those take 30 min): the bound only separates
    # the two, it is not a timing measurement.
    assert time.monotonic() - start < 240


PREPARE = (
    "import sys\n"
    "from lightcycle.model import data\n"
    "try:\n"
    "    data.prepare_once(sys.argv[1], download=True, mirror=sys.argv[2])\n"
    "except data.DataError as exc:\n"
    "    print(f'error: {exc}', file=sys.stderr)\n"
    "    sys.exit(2)\n"
    "print('digest=' + data.dataset_digest(sys.argv[1]))\n"
)

# The variables each launcher sets in a rank (Spark's TorchDistributor runs torchrun).
LAUNCHERS = {
    "slurm": lambda rank: {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
                           "SLURM_NTASKS": "2", "SLURM_NODEID": "0",
                           "SLURM_STEP_TASKS_PER_NODE": "2"},
    "torchdistributor": lambda rank: {"RANK": str(rank), "LOCAL_RANK": str(rank),
                                      "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                                      "NODE_RANK": "0"},
}


def _ranks(launcher: str, data_dir, mirror: str, env: dict[str, str], first: int = 1,
           kill_on_bad_exit: bool = False):
    """Two ranks as `launcher` starts them, rank `first` first; returns [(code, out, err)] of
    ranks 0 and 1. `kill_on_bad_exit`: stop the other rank as soon as one fails, as torchrun
    and `srun --kill-on-bad-exit` do."""
    import os

    procs = {}
    for rank in (first, 1 - first):
        procs[rank] = subprocess.Popen(
            [sys.executable, "-c", PREPARE, str(data_dir), mirror], text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            env={**os.environ, **env, **LAUNCHERS[launcher](rank)})
        if rank == first:
            time.sleep(2.0)  # the first rank is up (or done) before the second starts
    try:
        deadline = time.monotonic() + 120
        while kill_on_bad_exit and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs.values()):
                for proc in procs.values():
                    if proc.poll() is None:
                        proc.terminate()
                break
            time.sleep(0.05)
        return [(procs[r].wait(120), *procs[r].communicate(timeout=120)) for r in (0, 1)]
    finally:
        for proc in procs.values():
            stop_process(proc)


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_ranks_prepare_once_with_torchvisions_mirrors(launcher, mirrors, tmp_path):
    good = mirrors[0]
    good.requests.clear()
    good.delay_s = 0.3
    try:
        # data_mirror=auto: the patch points torchvision's own mirror list at the local one.
        outputs = _ranks(launcher, tmp_path / "empty", "auto",
                         good.env(tmp_path / "site", auto=True))
    finally:
        good.delay_s = 0.0
    for code, out, err in outputs:
        assert code == 0, err[-3000:]
        assert f"digest={SAMPLE_DIGEST}" in out
    _downloaded_once(good)
    (_, rank0_out, _), (_, rank1_out, _) = outputs
    # Rank 1 was up first, yet rank 0 downloaded and rank 1 only read what it found.
    assert "Downloading" in rank0_out and "Downloading" not in rank1_out


def test_slurm_ranks_share_local_rank_zeros_failure(mirrors, tmp_path):
    """Rank 0 fails before rank 1 is up, and the launcher stops rank 1 once rank 0 exits:
    rank 0 waits until rank 1 has read its message, so both print it."""
    good, bad = mirrors
    outputs = _ranks("slurm", tmp_path / "d", bad.url, good.env(tmp_path / "site"), first=0,
                     kill_on_bad_exit=True)
    messages = [[l for l in err.splitlines() if l.startswith("error: ")] for _, _, err in outputs]
    # Each failed (one may be stopped by the launcher once the other has printed and exited).
    assert all(code != 0 for code, _, _ in outputs)
    assert len(messages[0]) == 1 and messages[0] == messages[1]
    _names_file_and_mirror(messages[0][0], bad.url)
