"""The default front end (uvicorn + ``http_limits.LimitedHttpToolsProtocol``, the lean ASGI hot
path in front) against hostile clients: each gets a status (or a closed idle connection), never a
hang or a dropped answer, and the server keeps serving others (issue 24 item 11).

The server runs in process on a loopback port with a stub handler and short limits, so each
attack takes about a second."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

import pytest

from nimbleml.serve.app import HotRoutes
from nimbleml.serve.http_limits import HttpLimits, uvicorn_config
from nimbleml.serve.server import _Server

LIMITS = HttpLimits(header_timeout_s=1.0, body_timeout_s=1.0, idle_timeout_s=1.5, max_url_bytes=4096, max_headers=50,
                    max_header_bytes=8192, max_connections=20, max_pipelined=4, max_write_buffer_bytes=1 << 16)
GOOD = b"POST /v1/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class StubHandler:
    """The hot-route face of ``app.Handler``: one route that answers its body back."""

    max_body_bytes = 1024
    routes = {"/v1/echo": None}

    def __init__(self) -> None:
        self.calls = 0

    async def handle(self, path: str, headers: list, body: bytes) -> tuple[int, bytes, list]:
        self.calls += 1
        return 200, body, []


async def stub_app(scope: dict, receive: Callable, send: Callable) -> None:
    """The FastAPI face: every other route answers ``ok``."""
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


class Served:
    """The running server as a test sees it: the stub handler and uvicorn's open connections."""

    def __init__(self, handler: StubHandler, server: _Server):
        self.handler = handler
        self.server = server

    @property
    def connections(self) -> set:
        return self.server.server_state.connections


def with_server(test: Callable[[int, Served], Awaitable[None]], limits: HttpLimits = LIMITS) -> None:
    async def main() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        handler = StubHandler()
        server = _Server(uvicorn_config(HotRoutes(handler, stub_app), limits, max_body_bytes=handler.max_body_bytes))
        serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:
            assert not serving.done(), serving
            await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(test(sock.getsockname()[1], Served(handler, server)), 30)
        finally:
            server.should_exit = True
            server.force_exit = True
            await serving

    asyncio.run(main())


async def read_all(reader: asyncio.StreamReader, timeout_s: float = 10) -> bytes:
    """Everything until the server closes (bounded by ``timeout_s``)."""
    out = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
        except asyncio.TimeoutError:
            break
        if not chunk:
            return out
        out += chunk
    raise AssertionError(f"the server did not close the connection; got {out[:200]!r}")


async def still_serves(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(GOOD)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200"), head
    writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_a_good_request_and_keep_alive():
    async def test(port, server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):
            writer.write(GOOD)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(2) == b"{}"
        writer.close()

    with_server(test)


def test_slowloris_gets_408_and_others_are_served():
    async def test(port, server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        for i in range(30):  # one header every 100 ms, never the blank line
            try:
                writer.write(b"X-Slow-%d: a\r\n" % i)
                await writer.drain()
            except ConnectionError:
                break
            await still_serves(port) if i == 3 else None
            await asyncio.sleep(0.1)
            if reader.at_eof() or reader._buffer:  # answered
                break
        answer = await read_all(reader)
        assert status_of(answer) == 408 and time.monotonic() - started < 4
        await still_serves(port)

    with_server(test)


async def answer_to(port: int, attack: bytes) -> bytes:
    """Send ``attack`` on a fresh connection; what the server answers before it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(attack)
        await writer.drain()
    except ConnectionError:  # the server may close before reading all of a 2 MB attack
        pass
    return await read_all(reader)


@pytest.mark.parametrize(("attack", "status"), [
    (b"GET /" + b"a" * 2_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),  # a 2 MB URL
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(5000)) + b"\r\n", 431),  # header count
    (b"GET / HTTP/1.1\r\nX-Big: " + b"v" * 2_000_000, 431),  # one endless header, never ended (httptools buffers it)
    (b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
     + b"x" * 5000, 413),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
])
def test_oversized_and_odd_requests_get_a_status(attack, status):
    async def test(port, server):
        answer = await answer_to(port, attack)
        assert answer and status_of(answer) == status, answer[:200]
        await still_serves(port)

    with_server(test)


def test_h2c_upgrade_is_answered_over_http1():
    async def test(port, server):
        answer = await answer_to(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                                       b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
        assert status_of(answer) == 200 and answer.endswith(b"ok") and b"connection: close" in answer.lower()
        await still_serves(port)

    with_server(test)


def test_endless_chunked_body_is_cut_off():
    async def test(port, server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        sent = 0
        for _ in range(2000):  # 100 KB per round, up to 200 MB: the server must stop it long before
            try:
                writer.write(b"186a0\r\n" + b"x" * 100_000 + b"\r\n")
                await asyncio.wait_for(writer.drain(), 2)
            except (ConnectionError, asyncio.TimeoutError):
                break
            sent += 100_000
            if reader._buffer or reader.at_eof():
                break
        answer = await read_all(reader)
        assert status_of(answer) == 413 and sent < 10_000_000
        assert server.handler.calls == 0
        await still_serves(port)

    with_server(test)


def test_slow_body_gets_408_and_idle_connections_close():
    async def test(port, server):
        slow = b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{"
        assert status_of(await answer_to(port, slow)) == 408
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        assert await read_all(idle_reader) == b""  # closed without a word: nothing was asked
        assert 1.0 < time.monotonic() - started < 5
        await still_serves(port)

    with_server(test)


def test_expect_100_continue():
    async def test(port, server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"{}")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        big = b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\nExpect: 100-continue\r\n\r\n"
        assert status_of(await answer_to(port, big)) == 413  # refused before the client sends it

    with_server(test)


def test_connection_limit_answers_503():
    async def test(port, server):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(LIMITS.max_connections)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await read_all(reader)
        assert status_of(answer) == 503
        for _, w in held[:5]:
            w.close()
        await asyncio.sleep(0.2)
        await still_serves(port)

    with_server(test)


def test_pipelined_flood_pauses_reading_and_every_request_is_answered_in_order(monkeypatch):
    from nimbleml.serve.http_limits import _Flow

    pauses = []
    original = _Flow.hold
    monkeypatch.setattr(_Flow, "hold", lambda self, why: (pauses.append(why), original(self, why)))

    async def test(port, server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        n = 200
        writer.write(GOOD * n)  # far more than max_pipelined: the server pauses reading instead of queueing all
        answers = 0
        while answers < n:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            assert await reader.readexactly(2) == b"{}"
            answers += 1
        (connection,) = server.connections
        assert "pipelined" in pauses  # it stopped reading rather than queue all 200
        assert not connection.pipeline and not connection.flow.held and not connection.flow.read_paused
        writer.close()

    with_server(test)
