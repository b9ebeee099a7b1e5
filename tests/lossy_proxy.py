"""An HTTP proxy on 127.0.0.1 in front of a tracking server that loses answers on purpose.

Every request is forwarded; for the first `drop` requests whose path ends with one of
`drop_paths`, the server's answer is read and thrown away and the client's connection is
closed: what a client sees when the server committed a write and died before answering.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests


class LossyProxy:
    def __init__(self, upstream: str, drop_paths: tuple[str, ...], drop: int = 1):
        self.upstream, self.drop_paths, self.left = upstream.rstrip("/"), drop_paths, drop
        self.seen: list[tuple[str, str, int | None]] = []  # (method, path, status or None)
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection")}
                answer = requests.request(self.command, proxy.upstream + self.path, data=body,
                                          headers=headers, timeout=120)
                with proxy.lock:
                    lose = proxy.left > 0 and self.path.split("?")[0].endswith(proxy.drop_paths)
                    if lose:
                        proxy.left -= 1
                    proxy.seen.append((self.command, self.path, None if lose else answer.status_code))
                if lose:
                    self.close_connection = True
                    return
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection",
                                           "content-encoding"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LossyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
