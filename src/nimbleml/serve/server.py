"""Run the service: workers, the HTTP front end (uvicorn on uvloop + httptools, within
``http_limits.HttpLimits``) and gRPC.

Stops cleanly on SIGINT/SIGTERM: the listeners close, running requests finish, workers stop.
With no API keys configured it refuses to bind anywhere but loopback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from contextlib import contextmanager
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from nimbleml.errors import NimbleError
from nimbleml.serve.app import build_app
from nimbleml.serve.http_limits import HttpLimits, uvicorn_config
from nimbleml.serve.service import Rejected, Service

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass
class ListenConfig:
    """Where to listen and how."""

    host: str = "127.0.0.1"  # loopback by default; other addresses need API keys
    port: int = 8000  # HTTP port; 0 picks a free one
    grpc_port: int | None = None  # gRPC port; None = no gRPC, 0 picks a free one
    http: str = "asgi"  # "asgi" (uvicorn + lean ASGI hot path), "fastapi" (uvicorn + FastAPI for every route)
    ready_file: Path | None = None  # written with {"http": port, "grpc": port, "pid": pid} once serving
    ready_extra: dict = field(default_factory=dict)  # more entries for the ready file (e.g. the premium lane's port)
    parent_pid: int | None = None  # a premium lane stops when this process (the main server) is gone
    http_limits: HttpLimits = field(default_factory=HttpLimits)  # what one client may hold (either mode)
    # several front ends on one port (serve/frontends.py):
    reuse_port: bool = False  # bind with SO_REUSEPORT: sibling processes listen on the same port
    peer_listener: bool = False  # also listen on a private loopback port (its URL is the ready file's "peer")
    heartbeat: Callable[[], None] | None = None  # called every HEARTBEAT_S while the loop runs
    restore: dict | None = None  # versions.json of the siblings: load its candidate before serving


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: we stop the workers and gRPC too."""

    @contextmanager
    def capture_signals(self):
        yield


def check_bind(host: str, open_access: bool) -> None:
    if open_access and host not in LOOPBACK:
        raise NimbleError(f"refusing to listen on {host} without API keys",
                          fix="configure keys (--keys FILE or NIMBLEML_API_KEYS) or listen on 127.0.0.1")


async def serve(service: Service, listen: ListenConfig) -> None:
    """Start everything, serve until SIGINT/SIGTERM, then stop everything."""
    check_bind(listen.host, service.keys.open)
    if service.keys.open:
        log.warning("no API keys configured: every caller is anonymous 'standard', admin operations are off, "
                    "and only loopback (%s) requests addressed to 127.0.0.1/localhost are answered", listen.host)
    await service.start()
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if listen.reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((listen.host, listen.port))
    http_port = sock.getsockname()[1]
    sockets = [sock]
    extra = dict(listen.ready_extra)
    if listen.peer_listener:
        private = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        private.bind(("127.0.0.1", 0))
        sockets.append(private)
        extra["peer"] = service.own_url = f"http://127.0.0.1:{private.getsockname()[1]}"
    if listen.restore and listen.restore.get("candidate"):
        try:
            await service.load_model(listen.restore["candidate"], float(listen.restore["share"]))
        except Rejected as err:
            log.error("could not load the siblings' candidate %s: %s", listen.restore["candidate"], err.message)
    http_server = _Server(uvicorn_config(build_app(service, lean=listen.http == "asgi"), listen.http_limits))
    stop = asyncio.Event()
    grpc_server = grpc_health = None
    grpc_port = None
    if listen.grpc_port is not None:
        from nimbleml.serve.grpc_app import start_grpc

        grpc_server, grpc_port, grpc_health = await start_grpc(service, listen.host, listen.grpc_port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    orphan_watch = loop.create_task(_watch_parent(listen.parent_pid, stop)) if listen.parent_pid else None
    beating = loop.create_task(_beat(listen.heartbeat)) if listen.heartbeat else None
    try:
        serving = loop.create_task(http_server.serve(sockets=sockets))
        while not http_server.started and not serving.done():
            await asyncio.sleep(0.01)
        if listen.ready_file is not None:  # written once the port accepts connections
            partial = listen.ready_file.with_name(listen.ready_file.name + ".partial")
            partial.write_text(json.dumps({"http": http_port, "grpc": grpc_port, "pid": os.getpid(), **extra}))
            partial.replace(listen.ready_file)  # atomic: a watcher never reads half a file
        runs = (f"{service.config.pool.workers} worker(s)" if service.config.pool.workers else "the model in process")
        log.info("serving %s on http://%s:%d (%s)%s with %s on %s", service.operation, listen.host,
                 http_port, listen.http, f" and gRPC port {grpc_port}" if grpc_port else "", runs,
                 service.config.pool.backend)
        await stop.wait()
        service.begin_shutdown()  # /readyz and gRPC health say NOT_SERVING while requests in flight finish
        if grpc_health is not None:
            await grpc_health.shutdown()
        http_server.should_exit = True
        await serving
    finally:
        for task in (orphan_watch, beating):
            if task is not None:
                task.cancel()
        if grpc_server is not None:
            await grpc_server.stop(grace=1.0)
        await service.close()
        log.info("server stopped")


async def _beat(heartbeat: Callable[[], None]) -> None:
    """Stamp the heartbeat while the loop turns: a hung model (a stalled loop) stops it."""
    from nimbleml.serve.frontends import HEARTBEAT_S

    while True:
        heartbeat()
        await asyncio.sleep(HEARTBEAT_S)


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """Stop once the parent is gone (re-parented): a lane must not outlive its main server."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(1.0)
    log.warning("main server (pid %d) is gone: stopping", parent_pid)
    stop.set()


def run(service: Service, listen: ListenConfig) -> None:
    """Blocking: run ``serve`` on uvloop (the fastest asyncio loop here)."""
    import uvloop

    uvloop.run(serve(service, listen))
