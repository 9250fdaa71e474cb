"""What one HTTP client may hold of the server: uvicorn's httptools protocol plus the limits it lacks.

The HTTP front end is uvicorn (its httptools protocol, on uvloop) in front of the lean ASGI hot
path (``app.HotRoutes``). Issue 24 item 8 asked whether our hand-written httptools server earned
its keep (>= 10 % more capacity than uvicorn with the lean route); measured by ``nimbleml bench
serve`` on a quiet machine, 3 repeats, uvicorn + lean ASGI gave 1,729.8 req/s against ours
1,635.6 req/s (uvicorn 5.8 % above), so ours was deleted. Item 11 (hostile clients) has to hold
on the default server, and uvicorn 0.55 (``uvicorn/protocols/http/httptools_impl.py``) covers
only part of it, so ``LimitedHttpToolsProtocol`` is a thin subclass of its ``HttpToolsProtocol``
that adds, each because uvicorn has nothing for it:

- **head timeout** (``header_timeout_s``, 408): uvicorn has no timer between a request's first
  byte and the end of its headers, so a slowloris client holds a connection forever.
- **body timeout** (``body_timeout_s``, 408): none in uvicorn either; a body that stalls holds
  the connection and the route waiting on it.
- **idle timeout from the start** (``idle_timeout_s``): uvicorn arms ``timeout_keep_alive`` only
  after an answer, so a connection that never sends a byte is kept forever; it is armed here on
  connect too (and after bytes that start no request).
- **URL limit** (``max_url_bytes``, 414), **header count and size** (``max_headers``,
  ``max_header_bytes``, 431): uvicorn and httptools have none (httptools buffers one header's
  value in full before calling back, so the bytes read during a head are counted as well).
- **body limit** (the handler's ``max_body_bytes``, 413 as soon as it is passed, or at once from
  ``Content-Length``): uvicorn buffers and, after the route has answered, parses and drops an
  endless chunked body forever; here it is cut off.
- **connection limit** (``max_connections``, 503 on connect): uvicorn's ``limit_concurrency``
  answers 503 only once a request arrives and counts running tasks and kept-alive clients
  alike, which is a concurrency limit, not a connection limit.
- **pipelining bound** (``max_pipelined``): uvicorn pauses reading per queued request but resumes
  after every answer, so its queue has no bound; here reading stays paused until the queue has
  halved. One read's worth of requests is still parsed at once (httptools cannot stop mid-buffer).
- **write buffer** (``max_write_buffer_bytes``): the transport's high-water mark, past which
  uvicorn's own flow control stops writing (and, queued requests pausing reading, stops reading).
- **CONNECT** (405) and **Upgrade** (``h2c``): uvicorn answers CONNECT's authority-form target with
  a 400 for an unparsable URL, and after an unsupported upgrade leaves the parser stopped on a
  kept-alive connection; here the upgrade request is answered over HTTP/1.1 with
  ``connection: close``.

``Expect: 100-continue`` is uvicorn's (``100 Continue`` once the route reads the body); an
announced body over the limit gets 413 at once instead. Every refusal is a JSON error with its
status, sent after the answers already owed on the connection, then a lingering close (what the
client still sends is read and dropped for ``LINGER_S``, so a reset does not eat the answer).
Everything else (scope, ASGI cycle, pipelining order, keep-alive, shutdown) is uvicorn's.
"""

from __future__ import annotations

import asyncio
from asyncio import TimerHandle
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

import httptools
import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from nimbleml.serve.app import MAX_BODY_BYTES

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
    max_write_buffer_bytes: int = 1 << 20  # unsent answers on one connection before writing (and reading) waits


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a request that was answered with an error."""


class _Flow(FlowControl):
    """uvicorn's flow control, plus reasons (``held``) that keep reading paused whatever uvicorn resumes."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__(transport)
        self.held: set[str] = set()

    def hold(self, why: str) -> None:
        self.held.add(why)
        self.pause_reading()

    def release(self, why: str) -> None:
        if why in self.held:
            self.held.discard(why)
            self.resume_reading()

    def resume_reading(self) -> None:
        if not self.held:
            super().resume_reading()


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol within ``limits`` (see the module docstring for what each adds)."""

    limits = HttpLimits()
    max_body_bytes = MAX_BODY_BYTES

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.idle_timeout_s
        self.phase = "idle"  # "idle" (between requests), "head" (URL + headers), "body"
        self.deadline = 0.0  # loop time by which the head or body must be complete
        self.timer: TimerHandle | None = None  # armed for (phase, deadline) only when a read ends mid-request
        self.timer_for: tuple[str, float] | None = None
        self.head_read = 0  # bytes read while a head spans reads (httptools buffers a header until it ends)
        self.header_bytes = 0  # names + values of this request's headers
        self.body_bytes = 0
        self.running: RequestResponseCycle | None = None  # the cycle uvicorn started last
        self.refusal: bytes | None = None  # the error answer to send once the answers owed are out
        self.upgraded = False  # the parser stopped at an Upgrade: answer that request, then close

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _Flow(transport)
        transport.set_write_buffer_limits(high=self.limits.max_write_buffer_bytes)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "too many connections; retry later", [(b"retry-after", b"1")])
        else:
            self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._enter("idle")
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refusal is not None or self.upgraded:
            return  # refused (lingering) or upgraded: nothing more is parsed
        self._unset_keepalive_if_required()
        in_head = self.phase == "head"
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgrade()
            return
        except httptools.HttpParserError:  # malformed, or one of our callbacks refused (then this is a no-op)
            self._refuse(400, "malformed HTTP request")
            return
        if in_head and self.phase == "head":  # a head spread over reads: what httptools buffers counts too
            self.head_read += len(data)
            if self.head_read > self.limits.max_header_bytes + self.limits.max_url_bytes:
                self._refuse(431, "request headers too large")
                return
        if self.phase != "idle":
            if self.timer_for != (self.phase, self.deadline):  # the read ended mid-request: its timeout runs
                self._arm_deadline()
        elif not self._owed() and self.timeout_keep_alive_task is None:
            self._arm_idle()  # bytes that started no request (blank lines) do not reset the idle clock

    def _upgrade(self) -> None:
        """Upgrade (h2c; no WebSocket here) reached the end of its request: answer it over HTTP/1.1, then close."""
        self.upgraded = True
        self.flow.hold("upgraded")
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        elif not self._owed():
            self.transport.close()

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_read = self.header_bytes = self.body_bytes = 0
        self._enter("head", self.limits.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_url_bytes:
            self._refuse(414, f"URL longer than {self.limits.max_url_bytes} bytes")
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self.header_bytes += len(name) + len(value)
        if len(self.headers) > self.limits.max_headers:
            self._refuse(431, f"more than {self.limits.max_headers} headers")
            raise _Refused
        if self.header_bytes > self.limits.max_header_bytes:
            self._refuse(431, f"headers larger than {self.limits.max_header_bytes} bytes")
            raise _Refused

    def on_headers_complete(self) -> None:
        if self.parser.get_method() == b"CONNECT":
            self._refuse(405, "CONNECT is not supported", [(b"allow", b"GET, POST")])
            raise _Refused
        for name, value in self.headers:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                self._refuse(413, f"body over the {self.max_body_bytes}-byte limit")  # before any 100 Continue
                raise _Refused
        self._enter("body", self.limits.body_timeout_s)
        super().on_headers_complete()
        if len(self.pipeline) >= self.limits.max_pipelined:
            self.flow.hold("pipelined")

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > self.max_body_bytes:  # cut off now: an endless body is never waited for
            self._refuse(413, f"body over the {self.max_body_bytes}-byte limit")
            raise _Refused
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._enter("idle")
        super().on_message_complete()

    # ------------------------------------------------------------------ answers
    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Callable) -> None:
        self.running = cycle
        super()._start_asgi_task(cycle, app)

    def on_response_complete(self) -> None:
        if self.refusal is None:
            super().on_response_complete()
            if self.phase != "idle":  # a request is arriving: its head or body timeout applies, not the idle one
                self._unset_keepalive_if_required()
            if len(self.pipeline) < self.limits.max_pipelined // 2:
                self.flow.release("pipelined")
            return
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        if self.pipeline:  # answers owed before the refusal
            self._start_asgi_task(*self.pipeline.pop())
        else:
            self._close_with_refusal()

    def _owed(self) -> bool:
        """Answers still to be written on this connection (running or queued)."""
        running = self.running
        return bool(self.pipeline) or (running is not None and not running.response_complete
                                       and not running.disconnected)

    # ------------------------------------------------------------------ limits
    def _arm_idle(self) -> None:
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def _enter(self, phase: str, timeout_s: float = 0.0) -> None:
        """A request's phase and its deadline; no timer yet (a request read whole in one read needs none)."""
        self.phase = phase
        self.deadline = self.loop.time() + timeout_s
        if phase == "idle" and self.timer is not None:
            self.timer.cancel()
            self.timer = self.timer_for = None

    def _arm_deadline(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_for = (self.phase, self.deadline)
        self.timer = self.loop.call_at(self.deadline, self._expired)

    def _expired(self) -> None:
        self.timer = self.timer_for = None
        if self.phase == "idle" or self.refusal is not None:
            return
        timeout_s = self.limits.header_timeout_s if self.phase == "head" else self.limits.body_timeout_s
        if self.flow.read_paused:  # we stopped reading (backpressure): the client is not the slow one
            self.deadline = self.loop.time() + timeout_s
            self._arm_deadline()
            return
        part = "headers" if self.phase == "head" else "body"
        self._refuse(408, f"request {part} not received within {timeout_s:g} s")

    def _refuse(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | tuple = ()) -> None:
        """Answer ``status`` (JSON) after the answers owed on this connection, then close it."""
        if self.refusal is not None:
            return
        own = self.cycle if self.phase == "body" else None  # the refused request's cycle, if it has one
        if own is not None and own.response_started:
            self.refusal = b""  # the route answered without its body: no second answer, just close after it
        else:
            payload = b'{"error":"%s","status":%d}' % (message.encode(), status)
            head = [HTTPStatus(status).phrase.encode(), *(n + b": " + v for n, v in self.server_state.default_headers),
                    b"content-type: application/json", b"content-length: %d" % len(payload),
                    *(n + b": " + v for n, v in headers), b"connection: close"]
            self.refusal = b"HTTP/1.1 %d " % status + b"\r\n".join(head) + b"\r\n\r\n" + payload
            if own is not None:  # its route gets http.disconnect and whatever it sends is dropped
                own.disconnected = True
                own.message_event.set()
                if self.pipeline and self.pipeline[0][0] is own:
                    self.pipeline.popleft()
        self._enter("idle")
        self._unset_keepalive_if_required()
        self.flow.hold("refused")
        if not self._owed():
            self._close_with_refusal()

    def _close_with_refusal(self) -> None:
        """Write the refusal, then a lingering close: closing with unread bytes would reset the
        connection and the client could lose the answer, so what it still sends is read and
        dropped for up to ``LINGER_S`` (or until it closes)."""
        if self.transport.is_closing():
            return
        self.connections.discard(self)  # a refused connection no longer counts against max_connections
        self.transport.write(self.refusal or b"")
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)


def protocol_class(limits: HttpLimits, max_body_bytes: int = MAX_BODY_BYTES) -> type[LimitedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with these limits."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,),
                {"limits": limits, "max_body_bytes": max_body_bytes})


def uvicorn_config(app: Callable, limits: HttpLimits, max_body_bytes: int = MAX_BODY_BYTES) -> uvicorn.Config:
    """uvicorn as nimbleml runs it: httptools within ``limits``, the running loop (uvloop), no lifespan,
    no WebSocket, no access log; on shutdown, answers in progress get up to 10 s."""
    return uvicorn.Config(app, loop="none", http=protocol_class(limits, max_body_bytes), ws="none",
                          lifespan="off", access_log=False, log_level="warning",
                          timeout_keep_alive=limits.idle_timeout_s, timeout_graceful_shutdown=10,
                          backlog=4096)  # type: ignore[arg-type]
