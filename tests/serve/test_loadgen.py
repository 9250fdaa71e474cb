"""The load generator: open-loop counts, loopback only, and `nimbleml loadtest` writing loadtest.json."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from nimbleml.cli import main
from nimbleml.errors import NimbleError
from nimbleml.serve.loadgen import (LoadPlan, http_request, latency_percentile, loopback_target, run_load,
                                    status_split, summarise)
from tests.serve.conftest import KEYS


def test_only_loopback_targets():
    assert loopback_target("http://127.0.0.1:8000/v1/recommend").port == 8000
    for url in ("http://8.8.8.8:80/", "ftp://127.0.0.1/", "http://10.1.2.3:8000"):
        with pytest.raises(NimbleError):
            loopback_target(url)


def test_summary_counts_and_percentiles():
    status = np.array([200, 200, 429, 503, 0, 500], dtype=np.int16)
    latency = np.array([1.0, 3.0, 0.5, 0.5, 5000.0, 2.0], dtype=np.float32)
    tier = np.array([0, 1, 1, 1, 0, 0], dtype=np.int8)
    s = summarise(status, latency, tier, ["premium", "free"], duration_s=2.0)
    assert (s["sent"], s["answered"], s["ok"], s["rejected"], s["errors"]) == (6, 5, 2, 2, 2)
    assert s["throughput_rps"] == 1.0
    assert s["by_tier"]["free"]["rejected"] == 2
    # premium: 200 at 1 ms, a timeout, a 500 at 2 ms; the timeout is infinitely slow
    assert s["by_tier"]["premium"]["p50_ms"] == 2.0 and s["by_tier"]["premium"]["p99_ms"] is None
    # free: the two refusals stay out of p50/p99 but not out of p99_all_ms
    assert s["by_tier"]["free"]["p99_ms"] == 3.0 and s["by_tier"]["free"]["p99_all_ms"] == 3.0


def test_status_split_by_tier():
    status = np.array([200, 204, 429, 429, 503, 504, 500, 502, 0, 0, 404, 200], dtype=np.int16)
    latency = np.arange(1, 13, dtype=np.float32)
    tier = np.array([0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 1, 1], dtype=np.int8)
    assert status_split(status) == {"2xx": 3, "429": 2, "503": 1, "504": 1, "other_5xx": 2, "timeout": 2, "other": 1}
    s = summarise(status, latency, tier, ["premium", "free"], duration_s=1.0)
    assert s["by_tier"]["premium"]["status"] == {"2xx": 2, "429": 0, "503": 0, "504": 1, "other_5xx": 1,
                                                 "timeout": 1, "other": 0}
    assert s["by_tier"]["free"]["status"] == {"2xx": 1, "429": 2, "503": 1, "504": 0, "other_5xx": 1,
                                              "timeout": 1, "other": 1}
    assert sum(s["status"].values()) == s["sent"] == 12


def test_premium_504s_and_timeouts_enter_its_p99():
    """100 premium requests: 98 fast 2xx, one 504 at 40 ms, one timeout. p99 lands on the 504
    with the timeout outside it; with two timeouts p99 is infinite (None)."""
    status = np.array([200] * 98 + [504, 0], dtype=np.int16)
    latency = np.array([1.0] * 98 + [40.0, 5000.0], dtype=np.float32)
    tier = np.zeros(100, dtype=np.int8)
    assert summarise(status, latency, tier, ["premium"], 1.0)["by_tier"]["premium"]["p99_ms"] == 40.0
    status[98] = 0
    assert summarise(status, latency, tier, ["premium"], 1.0)["by_tier"]["premium"]["p99_ms"] is None
    assert latency_percentile(latency[:98], status[:98], 99) == 1.0


class _Echo(asyncio.Protocol):
    """Answers every request with its own body: a sampled answer shows which request it answered."""

    def connection_made(self, transport) -> None:
        import httptools

        self.transport, self.body = transport, b""
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(self.body), self.body))
        self.body = b""


@contextlib.contextmanager
def _serving(protocol: type[asyncio.Protocol]) -> Iterator[int]:
    """``protocol`` on a loopback port on a thread of its own; yields the port."""
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(protocol, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_sampled_answers_name_their_requests():
    with _serving(_Echo) as port:
        target = loopback_target(f"http://127.0.0.1:{port}/echo")
        bodies = {"a": [b"a%d" % i for i in range(7)], "b": [b"b%d" % i for i in range(5)]}
        requests = {tier: [http_request(target, body, None) for body in options] for tier, options in bodies.items()}
        plan = LoadPlan(target, 200.0, 0.5, requests, {"a": 0.5, "b": 0.5}, processes=1, timeout_s=2.0, sample_every=3)
        result = run_load(plan)
    assert result.summary()["ok"] == len(result.status) > 30
    assert len(result.samples) == pytest.approx(len(result.status) / 3, abs=1)
    for sample in result.samples:
        assert sample.status == 200 and sample.body == bodies[sample.tier][sample.request]
    later = result.after(0.25)
    assert later.duration_s == 0.25 and (later.scheduled_s >= 0).all() and len(later.status) < len(result.status)


def test_loadtest_command_writes_the_report(server, tmp_path, monkeypatch):
    monkeypatch.setenv("NIMBLEML_LOADTEST_KEYS", ",".join(f"{t}={KEYS[t]}" for t in ("premium", "standard", "free")))
    out = tmp_path / "lt"
    code = main(["loadtest", "--url", server.url, "--rps", "40", "--duration", "2", "--processes", "1",
                 "--mix", "premium=0.2,standard=0.5,free=0.3", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "loadtest.json").read_text())
    for key in ("sent", "answered", "ok", "rejected", "errors", "throughput_rps", "p50_ms", "p99_ms", "environment"):
        assert key in report
    assert report["sent"] == report["answered"] > 40
    assert set(report["by_tier"]) == {"premium", "standard", "free"}
    assert report["by_tier"]["premium"]["ok"] > 0
    assert (out / "latency.png").stat().st_size > 1000


class _Slow(_Echo):
    """Answers each request 20 ms after it arrives and counts the requests it holds at once."""

    held = 0
    most = 0

    def on_message_complete(self) -> None:
        _Slow.held += 1
        _Slow.most = max(_Slow.most, _Slow.held)
        body, self.body = self.body, b""
        asyncio.get_running_loop().call_later(0.02, self._answer, body)

    def _answer(self, body: bytes) -> None:
        _Slow.held -= 1
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def test_closed_loop_holds_its_connections_busy_and_no_more():
    """What wrk does: N requests in flight, the next sent as one is answered, so throughput is
    N / latency (Little's law) and latency counts from the send."""
    with _serving(_Slow) as port:
        target = loopback_target(f"http://127.0.0.1:{port}/echo")
        requests = {"a": [http_request(target, b"x%d" % i, None) for i in range(5)]}
        plan = LoadPlan(target, 5000.0, 1.0, requests, {"a": 1.0}, processes=2, timeout_s=2.0, closed_connections=5)
        result = run_load(plan)
    summary = result.summary()
    assert _Slow.most == 5  # 3 + 2 connections, never more in flight
    assert summary["ok"] == summary["sent"] == len(result.status)
    assert 20.0 <= summary["p50_ms"] < 40.0
    assert 5 / 0.04 < summary["throughput_rps"] <= 5 / 0.02 + 10  # 5 in flight at 20-40 ms each
    assert (np.diff(result.scheduled_s) >= 0).all() and result.scheduled_s.max() < 1.0
    # read from a sub-millisecond clock: uvloop's loop.time() is libuv's millisecond clock (every
    # closed-loop latency came out a whole number of milliseconds before)
    assert (result.latency_ms % 1.0 != 0.0).mean() > 0.9
