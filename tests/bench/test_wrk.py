"""The wrk cross-check: its Lua script and the parser, on outputs captured from Debian's wrk 4.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from nimbleml.bench.wrk import lua_script, lua_string, parse_wrk
from nimbleml.errors import NimbleError

DATA = Path(__file__).parent / "data"


def test_parses_a_captured_run() -> None:
    """wrk -t 2 -c 4 -d 2s --latency against the benchmark's trivial server (200 to everything)."""
    run = parse_wrk((DATA / "wrk_trivial_4c.txt").read_text(), connections=4)
    assert run.rps == pytest.approx(29086.65, abs=0.1) and run.requests == 58395
    assert run.p50_ms == 0.071  # "50%   71.00us"
    assert run.p99_ms == 5.232  # the done hook's p99_us=5232, not the report's rounded 5.23ms
    assert run.non_2xx == 0 and run.socket_errors == {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    assert run.ok_rps == pytest.approx(58395 / 2.01, abs=0.1)


def test_counts_non_2xx_answers() -> None:
    """The same script against `python -m http.server`, which answers POST with 501."""
    run = parse_wrk((DATA / "wrk_501_4c.txt").read_text(), connections=4)
    assert (run.requests, run.non_2xx, run.ok_rps) == (1555, 1555, 0.0)
    assert run.p50_ms == 1.82 and run.p99_ms == 10.4


def test_output_without_the_done_line_is_an_error() -> None:
    text = (DATA / "wrk_trivial_4c.txt").read_text()
    with pytest.raises(NimbleError, match="done hook"):
        parse_wrk("\n".join(line for line in text.splitlines() if not line.startswith("nimbleml-wrk")), 4)


def test_lua_strings_hold_any_bytes() -> None:
    assert lua_string(b'{"a":[1]}') == '"{\\034a\\034:[1]}"'
    assert lua_string("x\\y\n") == '"x\\092y\\010"'
    script = lua_script("/v1/recommend", [b'{"history":[1]}'], {"x-api-key": "k"})
    assert 'wrk.format("POST", path, headers, body)' in script and '["x-api-key"] = "k"' in script
    with pytest.raises(NimbleError):
        lua_script("/", [], {})



def test_sweep_goes_on_doubling_while_within_the_objective(monkeypatch) -> None:
    """A server still inside the objective at the last count gets more connections, so "wrk's best
    within the objective" is not capped by the sweep (fake wrk: p99 = connections ms)."""
    import nimbleml.bench.wrk as wrk

    def fake(url, bodies, headers, connections, duration_s, threads=2, timeout_s=2.0):
        return wrk.WrkRun(connections, 100.0 * connections, 1.0, float(connections), 1000, 0,
                          {"connect": 0, "read": 0, "write": 0, "timeout": 0}, 100.0 * connections)

    monkeypatch.setattr(wrk, "run_wrk", fake)
    assert list(wrk.wrk_sweep("http://127.0.0.1:1/", [b"{}"], {}, 1.0, (4, 8, 32, 16))) == ["4", "8", "16", "32"]
    assert list(wrk.wrk_sweep("http://127.0.0.1:1/", [b"{}"], {}, 1.0, (4, 32), slo_ms=100.0)) == ["4", "32", "64", "128"]
    assert list(wrk.wrk_sweep("http://127.0.0.1:1/", [b"{}"], {}, 1.0, (4, 32), slo_ms=500.0)) == [
        "4", "32", "64", "128", "256"]  # max_connections
