"""A small HTTP/1.1 server on httptools for the hot routes, with FastAPI behind it for the rest.

Why not uvicorn for everything: per request, uvicorn builds an ASGI scope, a cycle object,
message dicts and middleware calls; on the hot route of this project that machinery costs
more CPU than the rest of the request (measured side by side by ``nimbleml bench serve``,
variants ``nimbleml`` and ``nimbleml_asgi``). Here a connection is an asyncio Protocol whose
httptools parser (C) calls back with the URL, headers and body; a POST to a hot route goes
straight to ``Handler.handle`` and its answer is written as one pre-formatted buffer. Every
other request (docs, health, metrics, models) is handed to the FastAPI app through a minimal
ASGI call, so the API surface and /docs stay FastAPI's.

Requests on one connection are answered in order (HTTP/1.1 pipelining is allowed, never
interleaved); bodies beyond the handler's limit are not buffered and get 413.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from http import HTTPStatus

import httptools

from nimbleml.serve.app import Handler

log = logging.getLogger(__name__)

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_ERROR_413 = b'{"error":"body over the size limit","status":413}'


def _response(status: int, payload: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> bytes:
    head = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Unknown")),
            b"content-length: %d" % len(payload)]
    if not any(name.lower() == b"content-type" for name, _ in headers):
        head.append(b"content-type: application/json")
    head.extend(name + b": " + value for name, value in headers)
    if not keep_alive:
        head.append(b"connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + payload


class _Request:
    __slots__ = ("method", "url", "headers", "body", "size", "keep_alive")

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.keep_alive = True


class HttpConnection(asyncio.Protocol):
    """One client connection: parse with httptools, answer in order."""

    def __init__(self, server: FastHttpServer):
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.current = _Request()
        self.pending: deque[_Request] = deque()
        self.busy = False
        self.closed = False

    # ---------------------------------------------------------------- transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(_response(400, b'{"error":"malformed HTTP request","status":400}', [], False))
            self.transport.close()

    # ---------------------------------------------------------------- parser callbacks
    def on_message_begin(self) -> None:
        self.current = _Request()

    def on_url(self, url: bytes) -> None:
        self.current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        request = self.current
        request.size += len(body)
        if request.size <= self.server.handler.max_body_bytes:  # past the limit: counted, not kept
            request.body.append(body)

    def on_message_complete(self) -> None:
        request = self.current
        request.method = self.parser.get_method()
        request.keep_alive = self.parser.should_keep_alive()
        if self.busy:
            self.pending.append(request)
        else:
            self._start(request)

    # ---------------------------------------------------------------- answering
    def _start(self, request: _Request) -> None:
        self.busy = True
        task = asyncio.get_running_loop().create_task(self._answer(request))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _answer(self, request: _Request) -> None:
        path, _, query = request.url.partition(b"?")
        route = path.decode("latin-1")
        try:
            if request.method == b"POST" and route in self.server.handler.routes:
                if request.size > self.server.handler.max_body_bytes:
                    status, payload, headers = 413, _ERROR_413, []
                else:
                    status, payload, headers = await self.server.handler.handle(
                        route, request.headers, b"".join(request.body))
            else:
                status, payload, headers = await self.server.asgi(request, route, query, self.transport)
        except Exception:  # a bug must not kill the connection silently: answer 500 and log it
            log.exception("error answering %s %s", request.method, route)
            status, payload, headers = 500, b'{"error":"internal error","status":500}', []
        if self.closed:
            return
        keep_alive = request.keep_alive and not self.server.stopping
        self.transport.write(_response(status, payload, headers, keep_alive))
        if not keep_alive:
            self.transport.close()
            return
        self.busy = False
        if self.pending:
            self._start(self.pending.popleft())


class FastHttpServer:
    """Listen on a socket; hot routes via ``handler``, everything else via the ASGI ``app``."""

    def __init__(self, handler: Handler, app: Callable):
        self.handler = handler
        self.app = app
        self.connections: set[HttpConnection] = set()
        self.tasks: set[asyncio.Task] = set()
        self.stopping = False
        self._server: asyncio.base_events.Server | None = None

    async def asgi(self, request: _Request, path: str, query: bytes,
                   transport: asyncio.Transport) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """One ASGI call with the whole body in, the whole answer out (our non-hot routes do not stream)."""
        sockname, peer = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": request.method.decode(), "scheme": "http", "path": path, "raw_path": request.url.partition(b"?")[0],
            "query_string": query, "root_path": "", "headers": request.headers,
            "client": tuple(peer[:2]) if peer else None, "server": tuple(sockname[:2]) if sockname else None,
        }
        body = b"".join(request.body)
        delivered = False
        start: dict = {}
        chunks: list[bytes] = []

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        return int(start.get("status", 500)), b"".join(chunks), headers

    async def start(self, sock) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: HttpConnection(self), sock=sock, backlog=4096)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let running answers finish (up to ``grace_s``), close idle connections."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace_s)
        for connection in list(self.connections):
            connection.transport.close()
