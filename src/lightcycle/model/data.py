"""FashionMNIST in its own IDX format: strict reading, seeded splits and a content digest.

Only torch is needed here (no Lightning), so evaluation and conversion steps can use it.
`data_dir` follows torchvision's convention: it is the root that contains
`FashionMNIST/raw/`, so an existing torchvision download works as is.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import struct
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightcycle import defaults
from lightcycle.errors import UserError

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

PROJECT_ROOT = Path(__file__).resolve().parents[3]
SAMPLE_DATA_DIR = PROJECT_ROOT / defaults.DATA_DIR


class DataError(UserError):
    """Bad or missing data. The message names the file and says how to fix it."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, 28, 28)
    labels: np.ndarray  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)


def default_data_dir() -> Path:
    return SAMPLE_DATA_DIR


def raw_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "FashionMNIST" / "raw"


_FIX = (
    "Point data_dir at the directory that contains FashionMNIST/raw/ (torchvision's layout; "
    "the bundled sample is data/sample), or pass download=true to fetch the full data set."
)


def _read_header(path: Path, magic: int, ndim: int) -> tuple[bytes, tuple[int, ...]]:
    if not path.is_file():
        raise DataError(f"Missing data file {path}. {_FIX}")
    blob = path.read_bytes()
    header_len = 4 + 4 * ndim
    if len(blob) < header_len:
        raise DataError(
            f"Corrupt header in {path}: the file has {len(blob)} bytes, fewer than the "
            f"{header_len}-byte IDX header. Re-download the file (download=true) or restore it."
        )
    (found_magic,) = struct.unpack(">i", blob[:4])
    if found_magic != magic:
        raise DataError(
            f"Wrong magic number in {path}: found {found_magic} (0x{found_magic & 0xFFFFFFFF:08x}),"
            f" expected {magic} (0x{magic:08x}). This is not an IDX "
            f"{'image' if ndim == 3 else 'label'} file, or it is gzipped: gunzip it or "
            "re-download with download=true."
        )
    dims = struct.unpack(f">{ndim}i", blob[4:header_len])
    if any(d < 0 for d in dims) or (ndim == 3 and dims[1:] != (IMAGE_SIZE, IMAGE_SIZE)):
        raise DataError(
            f"Corrupt header in {path}: dimensions {dims}, expected (N, 28, 28) for images or "
            "(N,) for labels. Re-download the file (download=true) or restore it."
        )
    body = blob[header_len:]
    expected = int(np.prod(dims))
    if len(body) != expected:
        raise DataError(
            f"Truncated or padded file {path}: the header announces {dims[0]} records "
            f"({expected} bytes of data) but the file holds {len(body)} bytes. "
            "Re-download the file (download=true) or restore it."
        )
    return body, dims


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    body, dims = _read_header(Path(path), IMAGES_MAGIC, 3)
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


def read_idx_labels(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    body, _ = _read_header(path, LABELS_MAGIC, 1)
    labels = np.frombuffer(body, dtype=np.uint8).astype(np.int64)
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        raise DataError(
            f"Labels out of range in {path}: {bad.size} labels outside 0..{NUM_CLASSES - 1} "
            f"(first at record {int(bad[0])}, value {int(labels[bad[0]])}). "
            "The file is corrupt or not FashionMNIST: re-download it (download=true)."
        )
    return labels


def load_split(data_dir: str | os.PathLike, split: str) -> Split:
    """Read and validate one split ("train" or "test") from `data_dir`."""
    root = raw_dir(data_dir)
    if not Path(data_dir).is_dir():
        raise DataError(f"Missing data directory {data_dir}. {_FIX}")
    if not root.is_dir():
        raise DataError(f"Missing directory {root} (data_dir={data_dir}). {_FIX}")
    images_name, labels_name = SPLIT_FILES[split]
    images = read_idx_images(root / images_name)
    labels = read_idx_labels(root / labels_name)
    if len(images) != len(labels):
        raise DataError(
            f"Mismatched counts in {root}: {images_name} holds {len(images)} images but "
            f"{labels_name} holds {len(labels)} labels. The two files come from different "
            "downloads: restore both from the same source (download=true)."
        )
    return Split(images=images, labels=labels)


def prepare(data_dir: str | os.PathLike, download: bool = False,
            mirror: str = defaults.AUTO) -> None:
    """Fetch the data set when asked (from `mirror`, or torchvision's own mirrors for "auto");
    afterwards it must read cleanly. One process: see prepare_once for several."""
    if download:
        _download(Path(data_dir), mirror)
    for split in SPLIT_FILES:
        load_split(data_dir, split)


def check_mirror(mirror: str) -> None:
    if mirror != defaults.AUTO and urllib.parse.urlsplit(mirror).scheme not in (
            "http", "https", "ftp", "file"):
        raise DataError(
            f"data_mirror={mirror!r} is not a URL: give the http(s):// address of a directory "
            "that holds the four FashionMNIST .gz files (train-images-idx3-ubyte.gz, ...), or "
            "auto for torchvision's mirrors.")


def _download(data_dir: Path, mirror: str) -> None:
    """torchvision's download (MD5 checked, then gunzipped into FashionMNIST/raw/), one file at
    a time so that a failure names the file and the mirror it came from."""
    check_mirror(mirror)
    # torchvision is only needed to download; reading is ours so errors are precise.
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import download_and_extract_archive

    mirrors = FashionMNIST.mirrors if mirror == defaults.AUTO else [mirror.rstrip("/") + "/"]
    raw = raw_dir(data_dir)
    if all((raw / name).is_file() for names in SPLIT_FILES.values() for name in names):
        return  # as torchvision does: files in place are read (and checked), not fetched again
    raw.mkdir(parents=True, exist_ok=True)
    # Nodes that share one data_dir (a network disk) take turns: the first downloads, the
    # others find the files in place.
    with open(raw.parent / ".download-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for filename, md5 in FashionMNIST.resources:
            failures = []
            for base in mirrors:
                url = base + filename
                print(f"Downloading {url} to {raw}", flush=True)
                try:
                    download_and_extract_archive(url, download_root=str(raw), filename=filename,
                                                 md5=md5)
                    break
                except RuntimeError:  # torchvision: "File not found or corrupted." (MD5)
                    failures.append(f"{url} served a file whose MD5 is not {md5} (corrupt, "
                                    "truncated or not FashionMNIST)")
                except (OSError, EOFError, ValueError) as exc:  # HTTP, network, bad gzip
                    failures.append(f"{url}: {exc}")
                (raw / filename).unlink(missing_ok=True)
                (raw / filename.removesuffix(".gz")).unlink(missing_ok=True)
            else:
                raise DataError(
                    f"Could not download {filename} from {', '.join(mirrors)}: "
                    f"{'; '.join(failures)}. Check data_mirror (now {mirror}), or copy the four "
                    f"FashionMNIST files into {raw} and pass download=false.")


# --- once per node under every launcher ------------------------------------------------------

# How long the other ranks of a node wait for local rank 0's download.
PREPARE_TIMEOUT_S = 3600.0
_POLL_S = 0.2


def local_rank() -> int:
    """This process's rank on its node: LOCAL_RANK (torchrun, Spark's TorchDistributor, the
    processes Lightning's DDP starts), SLURM_LOCALID (srun); 0 for a lone process."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def local_world_size() -> int:
    """Processes on this node: LOCAL_WORLD_SIZE (torchrun), SLURM's tasks on this node."""
    value = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "")
    if value.isdigit():
        return int(value)
    # SLURM_STEP_TASKS_PER_NODE reads like "2(x3),1": 2 tasks on each of the first 3 nodes.
    spec, node = os.environ.get("SLURM_STEP_TASKS_PER_NODE", ""), os.environ.get("SLURM_NODEID")
    if spec and node and node.isdigit():
        counts = []
        for part in spec.split(","):
            count, _, repeat = part.partition("(x")
            counts += [int(count)] * int(repeat.rstrip(")") or 1)
        if int(node) < len(counts):
            return counts[int(node)]
    value = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS", "")
    return int(value) if value.isdigit() else 1


def _started_together() -> bool:
    """Ranks a launcher started at once (torchrun, TorchDistributor, srun), each running the
    whole step. Lightning's own DDP starts its other ranks from inside fit, after rank 0
    prepared: those have LOCAL_RANK but neither RANK nor SLURM's ids, and need not wait."""
    return ("RANK" in os.environ or "SLURM_LOCALID" in os.environ) and local_world_size() > 1


def _marker(data_dir: str | os.PathLike) -> Path:
    """Where local rank 0 reports to the other ranks of its node: in the node's temp dir,
    named after this launch (the launcher process, which started every local rank, by pid
    and start time) and the data_dir, so that no report of an earlier launch is ever read."""
    launcher = os.getppid()
    try:
        started = Path(f"/proc/{launcher}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = ""
    key = f"{socket.gethostname()}|{launcher}|{started}|{Path(data_dir).resolve()}"
    name = f"lightcycle-prepare-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    return Path(tempfile.gettempdir()) / name


def prepare_once(data_dir: str | os.PathLike, download: bool = False,
                 mirror: str = defaults.AUTO, timeout: float = PREPARE_TIMEOUT_S) -> None:
    """`prepare` under any launcher: local rank 0 of each node downloads (node-local disks);
    the node's other ranks wait for it before they read or hash a file. A failure on local
    rank 0 is raised on every rank of the node with the same message.

    Works before any process group exists (the step checks data before Lightning joins the
    ranks), so it needs nothing but the environment launchers set and the node's temp dir.
    """
    if not _started_together():
        prepare(data_dir, download, mirror)
        return
    marker = _marker(data_dir)
    peers = local_world_size() - 1
    if local_rank() == 0:
        try:
            prepare(data_dir, download, mirror)
        except Exception as exc:
            _report(marker, str(exc) if isinstance(exc, DataError)
                    else f"{type(exc).__name__}: {exc}")
            # The launcher stops every rank once one exits: wait (a bounded time) until the
            # others have read the message, so that each of them prints it.
            _wait_for_acknowledgements(marker, peers, timeout=60.0)
            raise
        _report(marker, None)
        _wait_for_acknowledgements(marker, peers, timeout)
        return
    error = _wait_for_report(marker, timeout)
    Path(f"{marker}.ack-{local_rank()}").touch()
    if error is not None:
        # Exit after rank 0 (it removes the report once every rank has read it): the first
        # rank to exit gets the others stopped, and rank 0's message must be out by then.
        deadline = time.monotonic() + 10.0
        while marker.exists() and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        raise DataError(error)
    for split in SPLIT_FILES:
        load_split(data_dir, split)


def _report(marker: Path, error: str | None) -> None:
    partial = marker.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps({"error": error}))
    partial.replace(marker)  # atomic: a waiting rank reads all of it or nothing


def _wait_for_report(marker: Path, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if time.monotonic() > deadline:
            raise DataError(
                f"Local rank 0 did not finish preparing the data within {timeout:.0f} s "
                f"(waiting for {marker}). Check its output: it downloads (download=true) or "
                "checks data_dir before the other ranks of the node read it.")
        time.sleep(_POLL_S)
    return json.loads(marker.read_text())["error"]


def _wait_for_acknowledgements(marker: Path, peers: int, timeout: float) -> None:
    """Local rank 0 waits until every other rank of the node has read its report, then
    removes the report: a barrier that leaves nothing in the temp dir."""
    deadline = time.monotonic() + timeout
    while (len(list(marker.parent.glob(f"{marker.name}.ack-*"))) < peers
           and time.monotonic() < deadline):
        time.sleep(_POLL_S)
    for path in [marker, *marker.parent.glob(f"{marker.name}.ack-*")]:
        path.unlink(missing_ok=True)


def dataset_digest(data_dir: str | os.PathLike) -> str:
    """sha256 over the four raw files (names and contents): what the model was trained on."""
    digest = hashlib.sha256()
    root = raw_dir(data_dir)
    for split in ("train", "test"):
        for name in SPLIT_FILES[split]:
            digest.update(name.encode())
            digest.update((root / name).read_bytes())
    return digest.hexdigest()[:16]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split of the train set; the test set stays untouched."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])
