"""One scoring process of `serve -P follow=true`: MLflow's own scoring app (the one
`mlflow models serve` runs) for one downloaded model version, under uvicorn.

It answers on a private loopback port first, so that lightcycle.serving.follow can check it
before it takes any traffic, and only then accepts from the listening socket it inherited.
Every answer names the version in an `x-lightcycle-model-version` header.

It starts before it is needed: the imports (MLflow's scoring server and the model's runtime,
about 6 s of a cold start on a 2-core machine) are done while the current version serves,
so a new version only has its own files to load when the alias moves.

The follower talks to it over stdin and a status pipe, one line each:
  status "standby"          imports done
  stdin  "load <version> <model_dir>"
  status "checking <port>"  the model is loaded and answers on 127.0.0.1:<port> alone
  stdin  "serve"            accept from the shared listening socket (fd --listen_fd)
  status "serving"
  stdin  "drain", or EOF    stop accepting; answer each request still coming on an open
                            connection with `Connection: close`; once no connection is left
                            (or keep-alive + 1 s has passed) run uvicorn's graceful shutdown,
                            which finishes the requests in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time

KEEP_ALIVE_SECONDS = 5  # uvicorn's default, as `mlflow models serve` runs it
VERSION_HEADER = b"x-lightcycle-model-version"


def labelled(app, version: str, draining: asyncio.Event):
    """`app` with the version header on every answer, and `Connection: close` once draining, so
    that clients reconnect (to the socket's new owner) instead of finding a closed connection."""
    version_header = (VERSION_HEADER, version.encode())

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_labelled(message):
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), version_header]
                if draining.is_set():
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        return await app(scope, receive, send_labelled)

    return wrapped


async def serve(app, listen_fd: int, version: str, status, timeout: int) -> None:
    import uvicorn

    draining = asyncio.Event()
    app = labelled(app, version, draining)

    def server() -> uvicorn.Server:
        return uvicorn.Server(uvicorn.Config(
            app, log_level="warning", access_log=False, timeout_keep_alive=KEEP_ALIVE_SECONDS,
            timeout_graceful_shutdown=timeout))

    def report(line: str) -> None:
        status.write(line + "\n")
        status.flush()

    async def next_command() -> str:
        return (await asyncio.to_thread(sys.stdin.readline)).strip()

    async def started(server: uvicorn.Server, listener: socket.socket):
        """`server` serving on `listener`: its task once it accepts, None if it stopped first."""
        task = asyncio.create_task(server.serve(sockets=[listener]))
        while not server.started:
            if task.done():
                await task
                return None
            await asyncio.sleep(0.01)
        return task

    private = socket.create_server(("127.0.0.1", 0))
    check = server()
    check_task = await started(check, private)
    if check_task is None:
        return
    report(f"checking {private.getsockname()[1]}")
    command = await next_command()
    check.should_exit = True
    await check_task
    if command != "serve":
        return

    main = server()
    main_task = await started(main, socket.socket(fileno=listen_fd))
    if main_task is None:
        return
    report("serving")
    commands = asyncio.create_task(next_command())
    await asyncio.wait([commands, main_task], return_when=asyncio.FIRST_COMPLETED)
    if main_task.done():  # stopped by a signal
        return await main_task

    draining.set()
    for listener in main.servers:
        listener.close()
    deadline = time.monotonic() + KEEP_ALIVE_SECONDS + 1
    while main.server_state.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    main.should_exit = True
    await main_task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen_fd", type=int, required=True)
    parser.add_argument("--status_fd", type=int, required=True)
    parser.add_argument("--timeout", type=int, default=60)
    parser.add_argument("--runtime", choices=("torch", "onnxruntime", "none"), default="none",
                        help="the runtime to import ahead: the current version's")
    args = parser.parse_args(argv)
    status = os.fdopen(args.status_fd, "w")

    import importlib

    import mlflow.pyfunc
    import uvicorn  # noqa: F401 (imported ahead, for serve())
    from mlflow.pyfunc import scoring_server

    if args.runtime != "none":
        importlib.import_module(args.runtime)
    status.write("standby\n")
    status.flush()
    command = sys.stdin.readline().split(maxsplit=2)
    if len(command) != 3 or command[0] != "load":
        return
    _, version, model_dir = command
    app = scoring_server.init(mlflow.pyfunc.load_model(model_dir.strip()))
    asyncio.run(serve(app, args.listen_fd, version, status, args.timeout))


if __name__ == "__main__":
    main()
