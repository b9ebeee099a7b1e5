"""A local FashionMNIST mirror for download tests: gzipped IDX files built from the sample,
served over HTTP on 127.0.0.1, and the torchvision patch the processes a test starts need.

The sample's files are not the real ones, so torchvision's MD5 check would refuse them: the
tests put a `sitecustomize.py` on the PYTHONPATH of the processes they start (never into
src/), which replaces `FashionMNIST.resources` (and, for data_mirror=auto, `.mirrors`) as
soon as torchvision's mnist module is imported.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_SITECUSTOMIZE = '''"""Test-only: torchvision's FashionMNIST MD5s (and mirrors) for a local mirror."""
import importlib.abc
import importlib.util
import sys

RESOURCES = {resources!r}
MIRRORS = {mirrors!r}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision.datasets.mnist":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            module.FashionMNIST.resources = RESOURCES
            if MIRRORS:
                module.FashionMNIST.mirrors = MIRRORS

        spec.loader.exec_module = patched
        return spec


sys.meta_path.insert(0, _PatchAfterImport())
'''


@dataclass
class Mirror:
    url: str
    root: Path
    server: http.server.ThreadingHTTPServer
    requests: list[str] = field(default_factory=list)
    delay_s: float = 0.0  # per request: widens the window in which a rank could race rank 0

    def env(self, site_dir: Path, auto: bool = False) -> dict[str, str]:
        """The environment for processes that download from this mirror: the sitecustomize
        patch on PYTHONPATH (`auto`: torchvision's own mirror list points here too)."""
        resources = [(p.name, hashlib.md5(p.read_bytes()).hexdigest())
                     for p in sorted(self.root.glob("*.gz"))]
        order = {name: i for i, name in enumerate(GZ_NAMES)}
        resources.sort(key=lambda item: order[item[0]])
        site_dir.mkdir(parents=True, exist_ok=True)
        (site_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(
            resources=resources, mirrors=[self.url] if auto else []))
        path = os.environ.get("PYTHONPATH", "")
        return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site_dir), path]))}

    def downloads(self, name: str) -> float:
        """How many times `name` was downloaded: torchvision GETs each file twice (a probe
        for redirects, closed early, then the download)."""
        return sum(1 for r in self.requests if r.endswith("/" + name)) / 2


GZ_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def build_files(raw: Path, dest: Path) -> Path:
    """The four raw IDX files of `raw`, gzipped as the real mirrors serve them."""
    dest.mkdir(parents=True, exist_ok=True)
    for gz in GZ_NAMES:
        (dest / gz).write_bytes(gzip.compress((raw / gz.removesuffix(".gz")).read_bytes(),
                                              mtime=0))
    return dest


def serve(root: Path) -> Mirror:
    """Serve `root` on 127.0.0.1 in a thread; stop with `mirror.server.shutdown()`."""
    mirror: Mirror

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            mirror.requests.append(self.path)
            time.sleep(mirror.delay_s)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    server.handle_error = lambda request, address: None  # the redirect probe hangs up early
    mirror = Mirror(f"http://127.0.0.1:{server.server_address[1]}/", root, server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return mirror
