"""A second, well-known load tool beside our generator: Debian's ``wrk``, driven by a Lua script.

wrk is closed loop: each of its connections sends the next request when the last answer comes,
so at ``c`` connections it finds the throughput the server reaches with ``c`` requests in
flight, and its latencies leave out the queueing an open-loop generator sees (coordinated
omission). Read its req/s as a cross-check of our open-loop capacity, not a replacement.

The Lua script POSTs pre-encoded bodies in turn (formatted once per thread in ``init``) and its
``done`` hook prints exact percentiles from wrk's histogram (microseconds) on one line that
:func:`parse_wrk` reads beside wrk's own ``--latency`` report.

Units: requests per second, milliseconds, seconds.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from nimbleml.errors import NimbleError

log = logging.getLogger(__name__)

CONNECTIONS = (4, 8, 16, 32)  # the connection counts each server is cross-checked at
DONE_MARK = "nimbleml-wrk"  # starts the line the Lua ``done`` hook prints

_SCRIPT = """-- written by nimbleml bench serve: POST the pre-encoded bodies in turn
local path = {path}
local headers = {{{headers}}}
local bodies = {{{bodies}}}
local formatted = {{}}
local turn = 0

init = function(args)
  for i, body in ipairs(bodies) do
    formatted[i] = wrk.format("POST", path, headers, body)
  end
end

request = function()
  turn = turn % #formatted + 1
  return formatted[turn]
end

done = function(summary, latency, requests)
  io.write(string.format("{mark} p50_us=%d p99_us=%d requests=%d status_errors=%d timeouts=%d\\n",
    latency:percentile(50), latency:percentile(99), summary.requests, summary.errors.status,
    summary.errors.timeout))
end
"""


def lua_string(data: bytes | str) -> str:
    """A Lua string literal holding ``data`` byte for byte (decimal escapes for all but plain ASCII)."""
    raw = data.encode() if isinstance(data, str) else data
    out = []
    for byte in raw:
        char = chr(byte)
        out.append(char if 32 <= byte < 127 and char not in '"\\' else f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def lua_script(path: str, bodies: list[bytes], headers: dict[str, str]) -> str:
    """The wrk script for POSTing ``bodies`` in turn to ``path`` with ``headers``."""
    if not bodies:
        raise NimbleError("wrk needs at least one request body", fix="pass the benchmark's request bodies")
    return _SCRIPT.format(path=lua_string(path), mark=DONE_MARK,
                          headers=", ".join(f"[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items()),
                          bodies=",\n  ".join(lua_string(b) for b in bodies))


@dataclass
class WrkRun:
    """One wrk run's figures."""

    connections: int
    rps: float  # requests per second, every answer counted (wrk's Requests/sec)
    p50_ms: float  # from wrk's --latency distribution
    p99_ms: float  # from the Lua done hook: latency:percentile(99)
    requests: int  # answers in the run
    non_2xx: int  # answers that were not 2xx or 3xx
    socket_errors: dict[str, int]  # connect / read / write / timeout
    ok_rps: float  # 2xx/3xx answers per second (rps minus the non-2xx share)

    def to_dict(self) -> dict:
        return asdict(self)


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if match is None:
        raise NimbleError(f"unreadable wrk duration {text!r}", fix="check the wrk version (Debian wrk 4.1 is known)")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(text: str, connections: int) -> WrkRun:
    """Read wrk's ``--latency`` report and our ``done`` line. Raises where a figure is missing."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    done = re.search(rf"^{DONE_MARK} p50_us=(\d+) p99_us=(\d+) requests=(\d+) status_errors=(\d+) timeouts=(\d+)",
                     text, re.M)
    duration = re.search(r"^\s+(\d+) requests in ([\d.]+\w+)", text, re.M)
    if rps is None or p50 is None or done is None or duration is None:
        raise NimbleError("wrk's output lacks Requests/sec, the 50% line or the done hook's line",
                          fix=f"run wrk with --latency and the benchmark's Lua script; its output was:\n{text[-2000:]}")
    non_2xx = re.search(r"^\s+Non-2xx or 3xx responses:\s+(\d+)", text, re.M)
    sockets = re.search(r"^\s+Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text, re.M)
    requests = int(duration.group(1))
    bad = int(non_2xx.group(1)) if non_2xx else 0
    seconds = _duration_ms(duration.group(2)) / 1000.0
    return WrkRun(
        connections=connections,
        rps=round(float(rps.group(1)), 1),
        p50_ms=round(_duration_ms(p50.group(1)), 3),
        p99_ms=round(int(done.group(2)) / 1000.0, 3),
        requests=requests,
        non_2xx=bad,
        socket_errors=dict(zip(("connect", "read", "write", "timeout"), map(int, sockets.groups())))
        if sockets else {"connect": 0, "read": 0, "write": 0, "timeout": 0},
        ok_rps=round((requests - bad) / seconds, 1) if seconds > 0 else 0.0,
    )


def wrk_available() -> str | None:
    """The wrk executable's path, None where it is not installed."""
    return shutil.which("wrk")


def run_wrk(url: str, bodies: list[bytes], headers: dict[str, str], connections: int, duration_s: float,
            threads: int = 2, timeout_s: float = 2.0) -> WrkRun:
    """One wrk run against ``url`` (loopback only: the caller passes a URL it started)."""
    from nimbleml.serve.loadgen import loopback_target

    executable = wrk_available()
    if executable is None:
        raise NimbleError("wrk is not installed", fix="apt-get install wrk (Debian), or leave the cross-check out")
    target = loopback_target(url)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(lua_script(target.path, bodies, {"Content-Type": "application/json", **headers}))
        cmd = [executable, "-t", str(max(1, min(threads, connections))), "-c", str(connections),
               "-d", f"{max(1, round(duration_s))}s", "--timeout", f"{max(1, round(timeout_s))}s", "--latency",
               "-s", str(script), f"http://{target.host}:{target.port}{target.path}"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 30)
        except subprocess.TimeoutExpired as exc:
            raise NimbleError(f"wrk did not finish: {' '.join(cmd)}") from exc
    if done.returncode != 0:
        raise NimbleError(f"wrk exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    return parse_wrk(done.stdout, connections)


def wrk_sweep(url: str, bodies: list[bytes], headers: dict[str, str], duration_s: float,
              connections: tuple[int, ...] = CONNECTIONS, threads: int = 2, slo_ms: float | None = None,
              max_connections: int = 256) -> dict[str, dict]:
    """wrk at each connection count: ``{"4": {rps, p50_ms, p99_ms, ...}, ...}``.

    slo_ms: then keep doubling the largest count while its run stays within the objective (p99 and
    no non-2xx), up to ``max_connections``, so that "wrk's best within the objective" is not the
    sweep's last count for a server that would answer more with more connections."""
    out = {}

    def one(count: int) -> WrkRun:
        run = run_wrk(url, bodies, headers, count, duration_s, threads)
        log.info("wrk %s at %d connections: %.0f req/s, p50 %.2f ms, p99 %.2f ms, %d non-2xx", url, count, run.rps,
                 run.p50_ms, run.p99_ms, run.non_2xx)
        out[str(count)] = run.to_dict()
        return run

    last = None
    for count in sorted(connections):
        last = one(count)
    while (slo_ms is not None and last is not None and last.p99_ms <= slo_ms and last.non_2xx == 0
           and last.connections * 2 <= max_connections):
        last = one(last.connections * 2)
    return out
