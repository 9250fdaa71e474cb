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
interleaved). Hostile clients get a status and the connection closed, and never hold more
than their share (``HttpLimits``): a head (URL + headers) that takes longer than
``header_timeout_s`` (slowloris) gets 408, a body slower than ``body_timeout_s`` 408, a URL
past ``max_url_bytes`` 414, more than ``max_headers`` headers or ``max_header_bytes`` of them
431, a body past the handler's limit 413 as soon as it passes it (an endless chunked body is
cut off, never buffered); an idle keep-alive connection is closed after ``idle_timeout_s``;
past ``max_connections`` a new connection gets 503. Pipelined requests beyond
``max_pipelined`` waiting, or a client that does not read its answers, pause reading from
its socket (backpressure) until the backlog drains. ``CONNECT`` gets 405; an
``Upgrade: h2c`` request is answered over HTTP/1.1 and the connection closed; ``Expect:
100-continue`` gets ``100 Continue`` (or 413 at once for a body over the limit).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

import httptools

from nimbleml.serve.app import Handler

log = logging.getLogger(__name__)

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LINGER_S = 2.0  # after a refusal, how long the rest of a request is read and dropped, seconds


@dataclass
class HttpLimits:
    """What one client may hold of the server: time, bytes, connections."""

    header_timeout_s: float = 10.0  # from a request's first byte to the end of its headers (slowloris), seconds
    body_timeout_s: float = 30.0  # from the end of the headers to the end of the body, seconds
    idle_timeout_s: float = 60.0  # a keep-alive connection with no request in progress, seconds
    max_url_bytes: int = 8 * 1024  # longer URLs get 414
    max_headers: int = 100  # more headers get 431
    max_header_bytes: int = 16 * 1024  # names + values of one request's headers; more gets 431
    max_connections: int = 4096  # open connections; past it a new one gets 503 and is closed
    max_pipelined: int = 32  # requests parsed and waiting on one connection before reading pauses
    max_write_buffer_bytes: int = 1 << 20  # unread answers on one connection before reading pauses


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a request that was answered with an error."""


def _error(status: int, message: str) -> bytes:
    return b'{"error":"%s","status":%d}' % (message.encode(), status)


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
    __slots__ = ("method", "url", "headers", "body", "size", "keep_alive", "header_bytes")

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.keep_alive = True
        self.header_bytes = 0


class HttpConnection(asyncio.Protocol):
    """One client connection: parse with httptools, answer in order, within ``HttpLimits``."""

    def __init__(self, server: FastHttpServer):
        self.server = server
        self.limits = server.limits
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.current = _Request()
        self.pending: deque[_Request] = deque()
        self.busy = False
        self.closed = False
        self.phase = "idle"  # "idle" (between requests), "head" (URL + headers), "body"
        self.phase_since = time.monotonic()
        self.refusal: bytes | None = None  # an error answer waiting for the answers before it
        self.upgraded = False  # the parser stopped at an Upgrade/CONNECT: close after the answers
        self.paused: set[str] = set()  # why reading is paused: "pipelined", "writing"

    # ---------------------------------------------------------------- transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.server.connections) >= self.limits.max_connections:
            self.closed = True
            transport.write(_response(503, _error(503, "too many connections; retry later"),
                                      [(b"retry-after", b"1")], False))
            transport.close()
            return
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)

    def pause_writing(self) -> None:  # the client does not read its answers: stop reading its requests
        self._pause("writing")

    def resume_writing(self) -> None:
        self._resume("writing")

    def data_received(self, data: bytes) -> None:
        if self.closed or self.refusal is not None or self.upgraded:
            return  # after a refusal or an upgrade nothing more is parsed
        in_head = self.phase == "head"
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # CONNECT or Upgrade: h2c: the request is answered, then we close
            self.upgraded = True
            return
        except httptools.HttpParserCallbackError:
            if self.refusal is None:
                raise
            return
        except httptools.HttpParserError:
            self._refuse(400, "malformed HTTP request")
            return
        if in_head and self.phase == "head":  # a head spread over reads: count what httptools buffers
            self.current.header_bytes += len(data)
            if self.current.header_bytes > self.limits.max_header_bytes + self.limits.max_url_bytes:
                self._refuse(431, "request headers too large")

    def _pause(self, why: str) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused.add(why)

    def _resume(self, why: str) -> None:
        self.paused.discard(why)
        if not self.paused and not self.closed:
            self.transport.resume_reading()

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        self.phase_since = time.monotonic()

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` after the answers already owed on this connection, then close it."""
        if self.refusal is not None or self.closed:
            return
        self.refusal = _response(status, _error(status, message), [], False)
        self._set_phase("idle")
        if not self.busy and not self.pending:
            self._close_with_refusal()

    def _close_with_refusal(self) -> None:
        """Write the refusal, then a lingering close: the rest of what the client sends is read and
        dropped for up to ``LINGER_S`` (closing with unread bytes would reset the connection, and
        the client could lose the answer), then the connection closes."""
        if self.closed:
            return
        self.closed = True
        self.transport.write(self.refusal)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.paused.clear()
        self.transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)

    def eof_received(self) -> bool:
        return False  # the client is done sending: close (after a refusal, the lingering ends here)

    def check_timeouts(self, now: float) -> None:
        """Called about once a second by the server: 408 for a slow head or body, close an idle connection."""
        if self.closed or self.refusal is not None:
            return
        age = now - self.phase_since
        if self.phase == "head" and age > self.limits.header_timeout_s:
            self._refuse(408, f"request headers not received within {self.limits.header_timeout_s:g} s")
        elif self.phase == "body" and age > self.limits.body_timeout_s:
            self._refuse(408, f"request body not received within {self.limits.body_timeout_s:g} s")
        elif self.phase == "idle" and not self.busy and not self.pending and age > self.limits.idle_timeout_s:
            self.closed = True
            self.transport.close()

    # ---------------------------------------------------------------- parser callbacks
    def on_message_begin(self) -> None:
        self.current = _Request()
        self._set_phase("head")

    def on_url(self, url: bytes) -> None:
        self.current.url += url
        if len(self.current.url) > self.limits.max_url_bytes:
            self._refuse(414, f"URL longer than {self.limits.max_url_bytes} bytes")
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.current
        request.headers.append((name.lower(), value))
        request.header_bytes += len(name) + len(value)
        if len(request.headers) > self.limits.max_headers:
            self._refuse(431, f"more than {self.limits.max_headers} headers")
            raise _Refused
        if request.header_bytes > self.limits.max_header_bytes:
            self._refuse(431, f"headers larger than {self.limits.max_header_bytes} bytes")
            raise _Refused

    def on_headers_complete(self) -> None:
        self._set_phase("body")
        headers = dict(self.current.headers)
        if headers.get(b"expect", b"").lower() == b"100-continue":
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > self.server.handler.max_body_bytes:
                self._refuse(413, "body over the size limit")
                raise _Refused
            if not self.busy and not self.pending:  # behind an answer in progress the client just waits
                self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        request = self.current
        request.size += len(body)
        if request.size > self.server.handler.max_body_bytes:  # cut off now: an endless body is never waited for
            self._refuse(413, "body over the size limit")
            raise _Refused
        request.body.append(body)

    def on_message_complete(self) -> None:
        request = self.current
        request.method = self.parser.get_method()
        request.keep_alive = self.parser.should_keep_alive()
        self._set_phase("idle")
        if self.busy:
            self.pending.append(request)
            if len(self.pending) >= self.limits.max_pipelined:
                self._pause("pipelined")
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
            if request.method == b"CONNECT":
                status, payload, headers = 405, _error(405, "CONNECT is not supported"), [(b"allow", b"GET, POST")]
            elif request.method == b"POST" and route in self.server.handler.routes:
                status, payload, headers = await self.server.handler.handle(
                    route, request.headers, b"".join(request.body))
            else:
                status, payload, headers = await self.server.asgi(request, route, query, self.transport)
        except Exception:  # a bug must not kill the connection silently: answer 500 and log it
            log.exception("error answering %s %s", request.method, route)
            status, payload, headers = 500, b'{"error":"internal error","status":500}', []
        if self.closed:
            return
        last = self.upgraded and not self.pending  # nothing is parsed after an upgrade: this is the last answer
        keep_alive = request.keep_alive and not self.server.stopping and not last
        self.transport.write(_response(status, payload, headers, keep_alive))
        if self.transport.get_write_buffer_size() > self.limits.max_write_buffer_bytes:
            self._pause("writing")
        if not keep_alive:
            self.closed = True
            self.transport.close()
            return
        self.busy = False
        if self.pending:
            self._start(self.pending.popleft())
            if len(self.pending) < self.limits.max_pipelined // 2:
                self._resume("pipelined")
        elif self.refusal is not None:
            self._close_with_refusal()
        elif self.phase == "idle":  # the idle timeout counts from the last answer
            self._set_phase("idle")


class FastHttpServer:
    """Listen on a socket; hot routes via ``handler``, everything else via the ASGI ``app``."""

    def __init__(self, handler: Handler, app: Callable, limits: HttpLimits | None = None):
        self.handler = handler
        self.app = app
        self.limits = limits or HttpLimits()
        self.connections: set[HttpConnection] = set()
        self.tasks: set[asyncio.Task] = set()
        self.stopping = False
        self._servers: list[asyncio.base_events.Server] = []
        self._sweeper: asyncio.Task | None = None

    async def _sweep(self) -> None:
        """Enforce the time limits: each connection checks its own about every quarter of the shortest."""
        period = min(self.limits.header_timeout_s, self.limits.body_timeout_s, self.limits.idle_timeout_s) / 4
        while True:
            await asyncio.sleep(min(1.0, period))
            now = time.monotonic()
            for connection in list(self.connections):
                connection.check_timeouts(now)

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

    async def start(self, *socks) -> None:
        loop = asyncio.get_running_loop()
        for sock in socks:
            self._servers.append(await loop.create_server(lambda: HttpConnection(self), sock=sock, backlog=4096))
        self._sweeper = loop.create_task(self._sweep())

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let running answers finish (up to ``grace_s``), close idle connections."""
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            server.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace_s)
        for connection in list(self.connections):
            connection.closed = True
            connection.transport.close()
