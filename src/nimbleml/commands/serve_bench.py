"""`nimbleml bench serve`: a naive server against ours, side by side in one run, on this machine.

- **naive**: what a competent user would write: FastAPI + pydantic, PyTorch eager FP32, one
  forward per request (``--naive`` mode of this module, run as its own server). Four variants:
  an ``async def`` route, a plain ``def`` route, the async route with one torch thread, and
  ``naive_workers``: one uvicorn worker process per core, one torch thread each (what
  ``uvicorn --workers N`` or gunicorn gives). ``ratio`` is taken against the best of them.
- **nimbleml**: ``nimbleml serve`` on the same model as a user runs it with Redis (the bench
  starts a private ``redis-server``): one front end per core, each batching and running its
  model in process, uvicorn with the lean ASGI hot path and nimbleml's HTTP limits, the fastest
  runtime backend; also with every route through FastAPI (``nimbleml_fastapi_route``), to show
  what that layer costs, and as one front end with worker processes (``nimbleml_one_frontend``,
  the design before ``--frontends``).
- **ray_serve**: the same bundle as a Ray Serve deployment (``serve/ray_app.py``).

For each, its capacity (``nimbleml.bench.capacity``): the highest offered rate (Poisson, open
loop) at which every request is answered 2xx with p99 over all of them <= 50 ms, found by a x1.25
grid and bisection to 3 %, then measured three times (median ``max_rps``, every run in
``max_rps_runs``), with the server processes' CPU per answered request. A sample of the answers
under load is checked (the ranked items are exactly the request's candidates, scores finite and
sorted): ``verified`` and ``wrong``. Each server is cross-checked with Debian's ``wrk`` at 4, 8,
16 and 32 connections (``wrk.<server>.<connections>``). Then a 2x overload of ours with the tier
mix, once with every tier on one port and once with premium callers on the premium lane
(``serve --premium-port``), each tier's answers split by status (2xx, 429, 503, 504, other 5xx,
timeout). The generator's own ceiling against a trivial server is recorded, so the ratio can be
read even where the generator limits it. Writes ``serve_bench.json`` after every phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from nimbleml.bench.capacity import Capacity, SearchConfig, Step, find_capacity, interleaved_rechecks
from nimbleml.bench.wrk import CONNECTIONS, wrk_available, wrk_sweep
from nimbleml.environment import environment
from nimbleml.errors import NimbleError
from nimbleml.serve.frontends import default_frontends
from nimbleml.serve.loadgen import LoadPlan, ResponseSample, http_request, loopback_target, request_bodies, run_load

log = logging.getLogger(__name__)

HELP = "naive FastAPI + eager servers vs nimbleml serve (and Ray Serve): capacity at p99 <= 50 ms, wrk, 2x overload"
TIERS = ("premium", "standard", "free")
ADMIN_KEY = "bench-admin"
# name -> (route style, torch threads (0: torch's default), uvicorn worker processes (0: one per core),
# torch's dynamic int8 on the Linear layers: the one line a user adds when ours serves an int8 graph)
NAIVE_VARIANTS = {"naive_async": ("async", 0, 1, False), "naive_sync": ("sync", 0, 1, False),
                  "naive_async_1thread": ("async", 1, 1, False), "naive_workers": ("async", 1, 0, False),
                  "naive_workers_int8": ("async", 1, 0, True)}
NAIVE_ENV = "NIMBLEML_NAIVE"  # model folder, route style and threads for the naive app's factory (uvicorn workers)
OVERLOAD_MIX = {"premium": 0.1, "standard": 0.6, "free": 0.3}


# ---------------------------------------------------------------------------- servers under test
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NimbleError(f"server for {url} exited with {process.returncode}", fix="see its log in the out folder")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise NimbleError(f"server for {url} did not come up in {timeout_s:.0f} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of one process from /proc (Linux), None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process and all its descendants (the server's workers), seconds."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None:
                parents[int(entry.name)], cpu[int(entry.name)] = stat
    total, frontier = 0.0, [pid]
    while frontier:
        current = frontier.pop()
        total += cpu.get(current, 0.0)
        frontier.extend(child for child, parent in parents.items() if parent == current)
    return total


class NaiveRecommendIn(BaseModel):
    """The naive server's request: a pydantic model, validated field by field."""

    history: list[int]
    candidates: list[int]


def naive_app(model_dir: Path, endpoint: str = "async", threads: int | None = None, int8: bool = False):
    """The naive server: FastAPI + pydantic + eager FP32 torch, one forward per request.

    endpoint "async": an ``async def`` route, so every forward runs on the event loop's thread;
    "sync": a plain ``def`` route, run by FastAPI in its thread pool. Both are what users write.
    The sync one is much slower here: torch's intra-op thread pool is per calling thread, so
    40 pool threads each bring their own team of spinning OpenMP threads onto 2 cores.
    threads: torch's intra-op threads (None: torch's default, one per core); one thread keeps
    torch's spinning OpenMP team from fighting the HTTP loop and the load generator for 2 cores.
    Scores leave torch with one ``tolist()`` (a per-element ``float(scores[i])`` loop costs
    ~0.37 ms a request by itself). The ratio is taken against the best naive variant, so no
    such pathology counts as our win.
    int8: ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear`` (int8 weights,
    activations quantised per call): what a user adds in one line to match an int8 graph of ours.
    """
    import torch
    from fastapi import FastAPI

    from nimbleml.rec.train import load_checkpoint

    if threads:
        torch.set_num_threads(threads)
    model = load_checkpoint(model_dir)
    if int8:
        import warnings

        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():  # torch deprecates its quantized tensors; the kernels still run
            warnings.simplefilter("ignore")
            model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    length = model.config.max_len
    app = FastAPI()

    behaviour = model.config.use_behavior  # then one code per event: "clicked" (1) where there is an item, as ours

    def answer(request: NaiveRecommendIn) -> dict:
        history = ([0] * length + request.history)[-length:]
        behaviors = torch.tensor([[int(h != 0) for h in history]]) if behaviour else None
        with torch.no_grad():
            scores = model(torch.tensor([history]), torch.tensor([request.candidates]), behaviors)[0]
        order = torch.argsort(scores, descending=True).tolist()
        values = scores.tolist()
        items = [{"item": request.candidates[i], "score": values[i] if math.isfinite(values[i]) else None}
                 for i in order]
        return {"items": items, "model_version": "naive"}

    if endpoint == "async":
        @app.post("/v1/recommend")
        async def recommend(request: NaiveRecommendIn) -> dict:
            return answer(request)
    else:
        @app.post("/v1/recommend")
        def recommend(request: NaiveRecommendIn) -> dict:
            return answer(request)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "alive"}

    return app


def naive_factory():
    """The naive app from ``$NIMBLEML_NAIVE`` (``model|endpoint|threads|int8``): uvicorn's import
    string for ``--workers``, where each worker process builds its own app."""
    model, endpoint, threads, int8 = os.environ[NAIVE_ENV].split("|")
    return naive_app(Path(model), endpoint, int(threads) or None, int8 == "1")


class _Trivial(asyncio.Protocol):
    """Answers every request at once with a fixed 200: the generator's ceiling, not a server's."""

    RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

    def connection_made(self, transport) -> None:
        import httptools

        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.transport.write(self.RESPONSE)


async def _trivial_main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Trivial, "127.0.0.1", port, backlog=4096)
    await server.serve_forever()


def _start(cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------------- measurements
def check_ranking(request_body: bytes, answer: bytes) -> str | None:
    """Why an answer to a Recommend request is wrong, None when it is right: the ranked items are
    exactly the request's candidates (as a multiset), every score is finite or null, the numeric
    scores never rise, nulls come last and only for candidates in the request's history (the
    model's history exclusion)."""
    import msgspec

    request = msgspec.json.decode(request_body)
    try:
        items = msgspec.json.decode(answer)["items"]
        ranked = [item["item"] for item in items]
        scores = [item["score"] for item in items]
        same_items = sorted(ranked) == sorted(request["candidates"])
    except (msgspec.DecodeError, KeyError, TypeError) as exc:
        return f"not a ranking: {type(exc).__name__}: {answer[:200]!r}"
    if not same_items:
        return f"ranked items are not the candidates: {ranked[:5]}... for {request['candidates'][:5]}..."
    numeric = [s for s in scores if s is not None]
    if any(not isinstance(s, (int, float)) or not math.isfinite(s) for s in numeric):
        return "a score is not a finite number"
    if scores[:len(numeric)] != numeric:
        return "a null score ranks above a numeric one"
    if any(a < b for a, b in zip(numeric, numeric[1:])):
        return "scores are not sorted best first"
    history = set(request.get("history") or ())
    if any(item not in history for item, score in zip(ranked, scores) if score is None):
        return "a null score for a candidate outside the history"
    return None


class Checks:
    """Answers checked under load for one server: counts and the first few reasons."""

    def __init__(self, bodies: list[bytes]):
        self.bodies, self.verified, self.wrong, self.reasons = bodies, 0, 0, []

    def add(self, samples: list[ResponseSample]) -> None:
        for sample in samples:
            if not 200 <= sample.status < 300:
                continue  # not an answer to check; the status split counts it
            reason = check_ranking(self.bodies[sample.request], sample.body)
            self.verified += 1
            if reason is not None:
                self.wrong += 1
                if len(self.reasons) < 5:
                    self.reasons.append(reason)

    def to_dict(self) -> dict:
        return {"verified": self.verified, "wrong": self.wrong, "wrong_examples": self.reasons}


def load_measure(url: str, route: str, bodies: list[bytes], key: str | None, pids: list[int], processes: int,
                 checks: Checks | None = None, sample_every: int = 25, timeout_s: float = 2.0):
    """The capacity search's measure function for one server: open-loop load at ``rate`` for
    ``warmup_s + duration_s`` seconds in one run (no pause between the warm-up and the measured
    part), the warm-up's arrivals left out of the figures; CPU per answered request of the
    server's processes over the whole run; every ``sample_every``-th answer checked."""
    target = loopback_target(f"{url}{route}")
    requests = {"standard": [http_request(target, b, key) for b in bodies]}
    seed = [0]

    def measure(rate: float, duration_s: float, warmup_s: float) -> Step:
        seed[0] += 1
        cpu_before = sum(_cpu_seconds(p) for p in pids)
        full = run_load(LoadPlan(target, rate, warmup_s + duration_s, requests, {"standard": 1.0}, processes=processes,
                                 timeout_s=timeout_s, seed=seed[0], sample_every=sample_every if checks else 0))
        cpu = sum(_cpu_seconds(p) for p in pids) - cpu_before
        if checks is not None:
            checks.add(full.samples)
        answered = int((full.status != 0).sum())
        measured = full.after(warmup_s)
        summary = measured.summary()
        ok = (measured.status >= 200) & (measured.status < 300)
        return Step(offered_rps=round(rate, 1), throughput_rps=summary["throughput_rps"], sent=summary["sent"],
                    ok=summary["ok"], p50_ms=summary["p50_ms"], p99_ms=summary["p99_all_ms"],
                    extra={"duration_s": duration_s, "warmup_s": warmup_s, "status": summary["status"],
                           "mean_ms": round(float(measured.latency_ms[ok].mean()), 3) if ok.any() else None,
                           "cpu_ms_per_request": round(1000 * cpu / answered, 3) if pids and answered else None,
                           "generator_cpu_s": summary["generator_cpu_s"], "load_average": list(os.getloadavg())})
    return measure


def capacity_row(found: Capacity, checks: Checks | None = None) -> dict:
    """A server's row in serve_bench.json: the capacity, CPU per request at it, the checks."""
    repeats = [s for s in found.steps if s.phase == "repeat"][-len(found.max_rps_runs):] if found.max_rps_runs else []
    cpu = [s.extra.get("cpu_ms_per_request") for s in repeats if s.extra.get("cpu_ms_per_request") is not None]
    row = found.to_dict()
    row["cpu_ms_per_request"] = round(sorted(cpu)[len(cpu) // 2], 3) if cpu else None
    # Little's law: requests in flight at the capacity point (throughput x mean latency), what a
    # closed-loop tool must hold open to offer the same load (see ``wrk_agreement``)
    held = [s.throughput_rps * s.extra["mean_ms"] / 1000.0 for s in repeats if s.extra.get("mean_ms") is not None]
    row["in_flight"] = round(float(np.median(held)), 2) if held else None
    if checks is not None:
        row.update(checks.to_dict())
    return row


def best_variant(rows: dict[str, dict]) -> str:
    """The best of the naive variants, the ratio's denominator: the highest ``max_rps``, and on a
    tie the one using less CPU per request (the conservative choice)."""
    return max(rows, key=lambda n: (rows[n]["max_rps"], -(rows[n].get("cpu_ms_per_request") or math.inf)))


def capacity_ratio(ours: dict, naive: dict) -> float:
    """Our capacity over the best naive variant's (0 where the naive one served nothing)."""
    return round(ours["max_rps"] / naive["max_rps"], 2) if naive["max_rps"] > 0 else 0.0


def wrk_skip_reason(skip: bool) -> str | None:
    """Why the wrk cross-check is left out (recorded as ``wrk.<server>.skipped``), None when it runs."""
    if skip:
        return "left out with --skip-wrk"
    return None if wrk_available() else "wrk is not installed (Debian: apt-get install wrk)"


def matched_connections(row: dict) -> int | None:
    """The wrk connection count that holds as many requests in flight as our open-loop run held
    at its capacity point (``in_flight``, Little's law), at least 1."""
    held = row.get("in_flight")
    return max(1, round(held)) if held else None


def wrk_agreement(wrk_rows: dict[str, dict], max_rps: float, slo_ms: float, matched: int | None = None) -> dict:
    """wrk against our open-loop capacity, two ways (the like-for-like check of the two tools is
    ``tool_agreement``: both as closed loops at the same connection counts).

    ``ratio``: wrk at ``matched`` connections, the concurrency our run held at its capacity point
    (Little's law), over our capacity. ``best``: wrk's best 2xx req/s among the connection counts
    whose p99 is within the objective. Neither is expected to be 1: a closed loop never offers more
    than the server answers (coordinated omission), so its queues stay short at rates where Poisson
    arrivals would miss the objective, and it reads above an open-loop capacity, most for a server
    whose latency varies a lot."""
    within = {c: r for c, r in wrk_rows.items() if r["p99_ms"] <= slo_ms and r["non_2xx"] == 0}
    best: dict = {"wrk_rps": None, "connections": None, "ratio": None}
    if within:
        conns = max(within, key=lambda c: within[c]["ok_rps"])
        best = {"wrk_rps": within[conns]["ok_rps"], "connections": int(conns),
                "ratio": round(within[conns]["ok_rps"] / max_rps, 3) if max_rps > 0 else None}
    out = {"wrk_rps": None, "connections": matched, "ours": max_rps, "ratio": None, "best": best}
    run = wrk_rows.get(str(matched)) if matched is not None else None
    if run is not None and run["non_2xx"] == 0:
        out["wrk_rps"] = run["ok_rps"]
        out["ratio"] = round(run["ok_rps"] / max_rps, 3) if max_rps > 0 else None
    return out


def closed_loop_sweep(url: str, route: str, bodies: list[bytes], key: str | None, connections: tuple[int, ...],
                      duration_s: float, processes: int) -> dict[str, dict]:
    """Our generator as a closed loop (wrk's discipline) at each connection count: the like-for-like
    check of the two tools, ``{"4": {connections, rps, p50_ms, p99_ms, non_2xx}, ...}``."""
    target = loopback_target(f"{url}{route}")
    requests = {"standard": [http_request(target, b, key) for b in bodies]}
    out = {}
    for count in connections:
        # rps only bounds the arrays: 20,000 req/s is above what any server here answers
        summary = run_load(LoadPlan(target, 20000.0, duration_s, requests, {"standard": 1.0},
                                    processes=max(1, min(processes, count)), timeout_s=2.0,
                                    closed_connections=count)).summary()
        out[str(count)] = {"connections": count, "rps": summary["throughput_rps"], "p50_ms": summary["p50_ms"],
                           "p99_ms": summary["p99_all_ms"], "non_2xx": summary["sent"] - summary["ok"]}
    return out


def tool_agreement(wrk_rows: dict[str, dict], ours: dict[str, dict]) -> dict:
    """wrk's 2xx req/s over our closed loop's at each connection count both ran, and the largest
    relative deviation: the two tools agree when it is small."""
    ratios = {c: round(wrk_rows[c]["ok_rps"] / row["rps"], 3) for c, row in ours.items()
              if c in wrk_rows and row["rps"] > 0}
    return {"ratios": ratios, "max_deviation": round(max(abs(r - 1) for r in ratios.values()), 3) if ratios else None}


def overload(url: str, bodies: list[bytes], keys: dict[str, str], rps: float, duration_s: float, processes: int,
             lane_url: str | None = None, sample_every: int = 25) -> dict:
    """The tier mix at ``rps``; with ``lane_url`` the premium share goes to the premium lane's port.
    Each tier's answers split by status; every ``sample_every``-th answer checked."""
    target = loopback_target(f"{url}/v1/recommend")
    targets = {tier: target for tier in OVERLOAD_MIX}
    if lane_url is not None:
        targets["premium"] = loopback_target(f"{lane_url}/v1/recommend")
    requests = {tier: [http_request(targets[tier], b, keys[tier]) for b in bodies] for tier in OVERLOAD_MIX}
    servers = [url] + ([lane_url] if lane_url else [])

    def restarts() -> int:
        return sum(httpx.get(f"{u}/v1/models", headers={"x-api-key": ADMIN_KEY}).json()["worker_restarts"]
                   for u in servers)

    before = restarts()
    result = run_load(LoadPlan(target, rps, duration_s, requests, dict(OVERLOAD_MIX), processes=processes,
                               timeout_s=5.0, targets=targets, sample_every=sample_every))
    checks = Checks(bodies)
    checks.add(result.samples)
    return {"offered_rps": round(rps, 1), **result.summary(), "worker_restarts": restarts() - before,
            "premium_port": "lane" if lane_url else "shared", **checks.to_dict()}


def _bench_redis(url: str | None, folder: Path) -> tuple[str | None, subprocess.Popen | None]:
    """The Redis the premium-lane run shares histories through: ``url``, else a private
    ``redis-server`` on a free loopback port (None where neither exists)."""
    if url is not None:
        return url, None
    if shutil.which("redis-server") is None:
        return None, None
    port = _free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    for _ in range(100):
        try:
            client.ping()
            return f"redis://127.0.0.1:{port}/0", process
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    process.kill()
    return None, None


def state_paths(url: str, pid: int, bodies: list[bytes], key: str, ingest_key: str, rps: float, duration_s: float,
                processes: int, users: int = 200) -> dict:
    """Recommend for known users, cached state (``user_id``) against the full forward (the same
    history in the body), at the same offered rate: latency and server CPU per request of each.
    The clicks go in with ``ingest_key`` (premium: never shed), retried on 429/503 after Retry-After."""
    import msgspec

    histories = [msgspec.json.decode(b)["history"][-20:] for b in bodies[:users]]
    candidates = msgspec.json.decode(bodies[0])["candidates"]
    with httpx.Client(base_url=url, headers={"x-api-key": ingest_key}, timeout=30) as client:
        for user, history in enumerate(histories):
            for ts, item in enumerate(history):
                for _ in range(20):
                    answer = client.post("/v1/ingest", json={"user_id": f"bench-{user}", "item_id": item, "ts": ts})
                    if answer.status_code not in (429, 503):
                        break
                    time.sleep(float(answer.headers.get("retry-after", "1")))
                answer.raise_for_status()
        time.sleep(1.0)  # the background state updates finish
    target = loopback_target(f"{url}/v1/recommend")
    variants = {
        "cached": [msgspec.json.encode({"user_id": f"bench-{u}", "candidates": candidates}) for u in range(len(histories))],
        "full": [msgspec.json.encode({"history": h, "candidates": candidates}) for h in histories],
    }
    out = {}
    for name, path_bodies in variants.items():
        requests = {"standard": [http_request(target, b, key) for b in path_bodies]}
        before = _cpu_seconds(pid)
        summary = run_load(LoadPlan(target, rps, duration_s, requests, {"standard": 1.0}, processes=processes)).summary()
        cpu = _cpu_seconds(pid) - before
        out[name] = {"offered_rps": rps, "ok": summary["ok"], "sent": summary["sent"], "p50_ms": summary["p50_ms"],
                     "p99_ms": summary["p99_ms"],
                     "cpu_ms_per_request": round(1000 * cpu / summary["answered"], 3) if summary["answered"] else None}
    metrics = httpx.get(f"{url}/metrics").text
    out["cached_answers"] = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                                if line.startswith('nimbleml_recommend_path_total{path="cached"}'))
    return out


@contextlib.contextmanager
def _ray_serve(bundle: Path, backend: str, bodies: list[bytes]) -> Iterator[str]:
    """A local Ray Serve with the same bundle on a loopback port (no keys: loopback callers only);
    yields its base URL and shuts Ray down after."""
    import ray
    from ray import serve

    from nimbleml.serve.ray_app import build_app

    port = _free_port()
    ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"bundle": str(bundle), "backend": backend}), name="nimbleml", route_prefix="/v1/recommend")
        url = f"http://127.0.0.1:{port}"
        httpx.post(f"{url}/v1/recommend", content=bodies[0], headers={"content-type": "application/json"}, timeout=30)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


SERVERS = ("generator", *NAIVE_VARIANTS, "nimbleml", "nimbleml_fp32", "nimbleml_fastapi_route", "nimbleml_one_frontend",
           "ray_serve")


def _table(result: dict) -> Table:
    table = Table(title="nimbleml bench serve: capacity (every request 2xx, p99 <= SLO), same machine and generator")
    for column in ("server", "max req/s", "runs", "p99 ms", "CPU ms/request", "wrong/verified", "wrk req/s (conns)"):
        table.add_column(column, justify="right" if column != "server" else "left")
    for name in SERVERS:
        row = result.get(name)
        if row:
            agree = result.get("wrk_agreement", {}).get(name) or {}
            runs = row.get("max_rps_runs") or []
            passed = f" ({row['repeats_passed']}/{len(runs)} pass)" if runs else ""
            table.add_row(name, str(row.get("max_rps")), f"{runs}{passed}", str(row.get("p99_ms")),
                          str(row.get("cpu_ms_per_request")), f"{row.get('wrong', '-')}/{row.get('verified', '-')}",
                          f"{agree.get('wrk_rps')} ({agree.get('connections')})" if agree else "-")
    return table


def _status_line(block: dict) -> str:
    return ", ".join(f"{t} p99 {b['p99_ms']} ms " + " ".join(f"{k}:{v}" for k, v in b["status"].items() if v)
                     for t, b in block["by_tier"].items())


def _save(result: dict, out: Path) -> None:
    """Write serve_bench.json after every phase: a failure late in the run keeps what was measured.
    ``verified`` and ``wrong`` total the answers checked so far (capacity runs and overloads)."""
    checked = [b for n in (*SERVERS, "overload", "overload_premium_lane")
               if isinstance(b := result.get(n), dict) and "verified" in b]
    result["verified"] = sum(b["verified"] for b in checked)
    result["wrong"] = sum(b["wrong"] for b in checked)
    (out / "serve_bench.json").write_text(json.dumps(result, indent=2) + "\n")


def compressed_parent(folder: Path) -> Path | None:
    """The uncompressed model a ``nimbleml compress`` folder was made from (its ``variant.json``
    names it), when it is still there; None for any other folder."""
    try:
        parent = Path(json.loads((Path(folder) / "variant.json").read_text())["parent"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return parent if (parent / "config.json").is_file() else None


def model_variant(folder: Path) -> dict | None:
    """What ``--model`` is when it is a compressed folder: its recipes, precision, parent and the
    validation quality before and after (``variant.json``), for serve_bench.json."""
    try:
        variant = json.loads((Path(folder) / "variant.json").read_text())
    except (OSError, ValueError):
        return None
    return {k: variant.get(k) for k in ("recipes", "precision", "parent", "valid_before", "valid_after")}


def wrk_ratio(result: dict) -> float | None:
    """Ours over the best naive variant by wrk's best figures within the objective (closed-loop
    saturation, not a capacity: kept beside ``ratio`` so a reader sees both)."""
    agree = result.get("wrk_agreement", {})
    ours = (agree.get("nimbleml") or {}).get("best", {}).get("wrk_rps")
    naive = [(agree.get(n) or {}).get("best", {}).get("wrk_rps") for n in result.get("naive_variants", [])]
    naive = [v for v in naive if v]
    return round(ours / max(naive), 2) if ours and naive else None


def _run_ours(args: argparse.Namespace, result: dict, bodies: list[bytes], keys: dict[str, str], key_env: dict,
              serve_cmd: list[str], measure: Callable, redis_url: str | None, fp32_bundle: Path | None = None) -> None:
    """Our variants' capacities, the ratio, the 2x overloads and the two Recommend paths.

    fp32_bundle: with a compressed ``--model``, ours is also measured on its uncompressed parent
    (row ``nimbleml_fp32``), so what compression buys in serving is read off the same run."""
    variants = [("nimbleml", [])]
    if fp32_bundle is not None:
        variants.append(("nimbleml_fp32", ["--model", str(fp32_bundle)]))  # the last --model wins
    if not args.skip_fastapi_route:
        variants.append(("nimbleml_fastapi_route", ["--http", "fastapi"]))
    if not args.skip_one_frontend and result["frontends"] > 1:  # the design before --frontends, for the record
        variants.append(("nimbleml_one_frontend", ["--frontends", "1"]))
    for name, extra in variants:
        port = _free_port()
        measure(name, [*serve_cmd, "--port", str(port), *extra], f"http://127.0.0.1:{port}", "/readyz",
                keys["standard"], key_env)
    result["ratio"] = capacity_ratio(result["nimbleml"], result["naive"])
    if "nimbleml_fp32" in result:
        result["ratio_fp32"] = capacity_ratio(result["nimbleml_fp32"], result["naive"])
    result["wrk_ratio"] = wrk_ratio(result)
    if result["naive"]["cpu_ms_per_request"] and result["nimbleml"]["cpu_ms_per_request"]:
        result["cpu_ratio"] = round(result["naive"]["cpu_ms_per_request"] / result["nimbleml"]["cpu_ms_per_request"], 2)
    _save(result, args.out)

    port = _free_port()
    process = _start([*serve_cmd, "--port", str(port)], args.out / "overload.log", key_env)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/readyz", process)
        rate = 2 * max(result["nimbleml"]["max_rps"], 1.0)
        result["overload"] = overload(url, bodies, keys, rate, args.overload_s, args.processes,
                                      sample_every=args.sample_every)
        time.sleep(2.0)  # let the overload's queues drain before measuring the two Recommend paths
        _save(result, args.out)
        result["state_paths"] = state_paths(url, process.pid, bodies, keys["standard"], keys["premium"],
                                            max(25.0, result["nimbleml"]["max_rps"] / 2), args.step_s, args.processes)
    finally:
        _stop(process)

    if redis_url is None:
        log.warning("no Redis (--redis or Debian's redis-server): the premium-lane overload is left out")
        result["overload_premium_lane"] = {"skipped": "no Redis to share histories between the two processes"}
    else:
        port, lane_port = _free_port(), _free_port()
        process = _start([*serve_cmd, "--port", str(port), "--premium-port", str(lane_port)],
                         args.out / "overload_lane.log", key_env)
        try:
            url, lane_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{lane_port}"
            _wait_http(f"{url}/readyz", process)
            _wait_http(f"{lane_url}/readyz", process)
            rate = 2 * max(result["nimbleml"]["max_rps"], 1.0)
            result["overload_premium_lane"] = overload(url, bodies, keys, rate, args.overload_s, args.processes,
                                                       lane_url=lane_url, sample_every=args.sample_every)
        finally:
            _stop(process)
        _save(result, args.out)


def interleaved(args: argparse.Namespace, launches: dict[str, tuple], names: list[str], result: dict,
                bodies: list[bytes], search: SearchConfig) -> dict:
    """Each server's capacity re-measured in ``--interleaved-rounds`` rounds, every round visiting
    every server (the order rotated), so that the machine's drift between one server's search and
    the next lands on all alike; ``ratio`` is ours over the best naive per round."""

    def server(name: str):
        cmd, url, health, key, env = launches[name]

        @contextlib.contextmanager
        def started():
            process = _start(cmd, args.out / f"{name}-recheck.log", env)
            try:
                _wait_http(f"{url}{health}", process)
                # no answer checks here: they ran in each server's search, and a Checks nobody reads is waste
                yield load_measure(url, "/v1/recommend", bodies, key, [process.pid], args.processes)
            finally:
                _stop(process)
        return started

    return interleaved_rechecks({n: server(n) for n in names}, {n: result[n]["max_rps"] for n in names}, search,
                                rounds=args.interleaved_rounds, numerator="nimbleml", denominator=names[0])


def search_config(args: argparse.Namespace) -> SearchConfig:
    return SearchConfig(start_rps=args.start_rps, factor=args.factor, max_rps=args.max_rps, grid_s=args.grid_s,
                        tolerance=args.tolerance, step_s=args.step_s, warmup_s=args.warmup_s, repeats=args.repeats,
                        slo_ms=args.slo_ms)


def run(args: argparse.Namespace) -> int:
    from nimbleml.commands.serve import prepare_model
    from nimbleml.runtime.backends import best_backend
    from nimbleml.serve.bundle import Bundle

    unknown = set(args.naive_variants) - set(NAIVE_VARIANTS)
    if unknown or not args.naive_variants:
        raise NimbleError(f"unknown naive variants {sorted(unknown)}", fix=f"choose from {', '.join(NAIVE_VARIANTS)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: no orphaned servers
    args.out.mkdir(parents=True, exist_ok=True)
    bundle_dir = prepare_model(args.model, args.out / "bundle")
    parent = compressed_parent(args.model)  # a compressed --model: ours is also measured on its parent
    fp32_bundle = prepare_model(parent, args.out / "bundle_fp32") if parent is not None else None
    bundle = Bundle.load(bundle_dir)
    if bundle.operation != "recommend":
        raise NimbleError("bench serve measures a recommender", path=args.model, fix="pass a `nimbleml rec train` folder")
    backend = args.backend or best_backend()
    bodies = request_bodies({n: [vars(i) for i in g.inputs] for n, g in bundle.graphs.items()}, "recommend", 256)
    keys = {tier: f"bench-{tier}" for tier in TIERS}
    key_env = {"NIMBLEML_API_KEYS": ",".join(f"{k}={t}" for t, k in keys.items()) + f",{ADMIN_KEY}=premium:admin"}
    here = [sys.executable, "-m", "nimbleml.commands.serve_bench"]
    cores = len(os.sched_getaffinity(0))
    search = search_config(args)
    result: dict = {"command": " ".join(sys.argv), "model": str(args.model), "backend": backend, "cores": cores,
                    "load_average_at_start": list(os.getloadavg()), "environment": environment(),
                    "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
                    "search": vars(search), "wrk": {}, "wrk_agreement": {}, "closed_loop": {},
                    "model_variant": model_variant(args.model)}
    wrk_skip = wrk_skip_reason(args.skip_wrk)
    if wrk_skip:
        log.warning("the wrk cross-check is left out: %s", wrk_skip)

    def cross_check(name: str, url: str, route: str, key: str | None) -> None:
        if wrk_skip:
            result["wrk"][name] = {"skipped": wrk_skip}
            return
        matched = None if name == "generator" else matched_connections(result[name])
        counts = sorted({*args.wrk_connections, *([matched] if matched else [])})
        result["wrk"][name] = wrk_sweep(f"{url}{route}", bodies[:64], {"x-api-key": key} if key else {}, args.wrk_s,
                                        tuple(counts), threads=min(2, cores),
                                        slo_ms=None if name == "generator" else args.slo_ms)
        if name != "generator":  # the generator's row is a ceiling, not a capacity to agree with
            result["wrk_agreement"][name] = wrk_agreement(result["wrk"][name], result[name]["max_rps"], args.slo_ms,
                                                          matched)
            result["closed_loop"][name] = closed_loop_sweep(url, route, bodies[:64], key, tuple(counts), args.wrk_s,
                                                            args.processes)
            result["wrk_agreement"][name]["closed_loop"] = tool_agreement(result["wrk"][name],
                                                                          result["closed_loop"][name])

    launches: dict[str, tuple] = {}  # name -> how it was started, for the interleaved rechecks

    def measure(name: str, cmd: list[str], url: str, health: str, key: str | None, env: dict | None = None) -> None:
        launches[name] = (cmd, url, health, key, env)
        process = _start(cmd, args.out / f"{name}.log", env)
        try:
            _wait_http(f"{url}{health}", process)
            checks = Checks(bodies)
            found = find_capacity(load_measure(url, "/v1/recommend", bodies, key, [process.pid], args.processes,
                                               checks, args.sample_every), search, name)
            result[name] = capacity_row(found, checks)
            _save(result, args.out)
            cross_check(name, url, "/v1/recommend", key)
        finally:
            _stop(process)
        _save(result, args.out)

    port = _free_port()
    process = _start([*here, "--trivial", "--port", str(port)], args.out / "trivial.log")
    try:
        time.sleep(1.0)
        url = f"http://127.0.0.1:{port}"
        ceiling = SearchConfig(start_rps=500.0, factor=1.5, max_rps=args.max_rps * 4, grid_s=args.grid_s,
                               tolerance=0.1, step_s=args.grid_s, warmup_s=0.0, repeats=1, slo_ms=args.slo_ms)
        result["generator"] = capacity_row(find_capacity(load_measure(url, "/", bodies, None, [], args.processes),
                                                         ceiling, "generator"))
        cross_check("generator", url, "/", None)
    finally:
        _stop(process)

    for name in args.naive_variants:
        endpoint, threads, workers, int8 = NAIVE_VARIANTS[name]
        port = _free_port()
        measure(name, [*here, "--naive", str(args.model), "--endpoint", endpoint, "--threads", str(threads),
                       "--workers", str(workers or cores), "--port", str(port), *(["--int8"] if int8 else [])],
                f"http://127.0.0.1:{port}", "/healthz", None)
    best_naive = best_variant({n: result[n] for n in args.naive_variants})
    result["naive_variants"] = list(args.naive_variants)
    result["naive"] = {**result[best_naive], "endpoint": best_naive}  # the ratio's denominator: the best naive
    # with a shared history store, `serve` runs one front end per core (serve/frontends.py)
    redis_url, redis_process = _bench_redis(args.redis, args.out)
    try:
        serve_cmd = [sys.executable, "-m", "nimbleml.cli", "serve", "--model", str(bundle_dir), "--backend", backend,
                     "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
        serve_cmd += ["--redis", redis_url] if redis_url else []
        serve_cmd += ["--frontends", str(args.frontends)] if args.frontends else []
        serve_cmd += ["--workers", str(args.workers)] if args.workers is not None else []
        result["frontends"] = args.frontends or default_frontends(redis_url, "recommend")
        _run_ours(args, result, bodies, keys, key_env, serve_cmd, measure, redis_url, fp32_bundle)
        if args.interleaved_rounds > 0:
            names = [best_naive, "nimbleml", *(["nimbleml_fp32"] if "nimbleml_fp32" in result else [])]
            result["interleaved"] = interleaved(args, launches, names, result, bodies, search)
            _save(result, args.out)
    finally:
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(10)

    if not args.skip_ray:
        try:
            with _ray_serve(bundle_dir, backend, bodies) as url:
                checks = Checks(bodies)
                found = find_capacity(load_measure(url, "/v1/recommend", bodies, None, [], args.processes, checks,
                                                   args.sample_every), search, "ray_serve")
                result["ray_serve"] = capacity_row(found, checks)
                _save(result, args.out)
                cross_check("ray_serve", url, "/v1/recommend", None)
        except Exception as exc:  # Ray is optional here: record why it is missing rather than lose the run
            log.error("Ray Serve measurement failed: %s", exc)
            measured = result.get("ray_serve", {"max_rps": None})
            result["ray_serve"] = {**measured, "error": f"{type(exc).__name__}: {exc}"}
    result["load_average_at_end"] = list(os.getloadavg())
    _save(result, args.out)
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(_table(result))
    console.print(f"ratio {result['ratio']}x against {best_naive} ({result['naive']['max_rps']} req/s, runs "
                  f"{result['naive']['max_rps_runs']}); answers checked under load: {result['verified']}, "
                  f"wrong {result['wrong']}")
    if "ratio_fp32" in result:
        console.print(f"ours on the uncompressed parent (nimbleml_fp32): {result['ratio_fp32']}x")
    console.print(f"by wrk's best figures within the objective (closed loop): {result.get('wrk_ratio')}x")
    if (ratio := result.get("interleaved", {}).get("ratio")) is not None:
        console.print(f"interleaved rechecks ({result['interleaved']['rounds']} rounds, order rotated): ours over "
                      f"{ratio['denominator']} per round {ratio['runs']}, geometric mean {ratio['geomean']}x")
    over = result["overload"]
    console.print(f"2x overload ({over['offered_rps']} req/s): sent {over['sent']}, answered {over['answered']}; "
                  + _status_line(over))
    lane = result["overload_premium_lane"]
    if "by_tier" in lane:
        console.print(f"2x overload, premium on its own lane: sent {lane['sent']}, answered {lane['answered']}; "
                      + _status_line(lane))
    paths = result["state_paths"]
    console.print(f"known-user Recommend at {paths['cached']['offered_rps']:g} req/s: cached state p50/p99 "
                  f"{paths['cached']['p50_ms']}/{paths['cached']['p99_ms']} ms, {paths['cached']['cpu_ms_per_request']} "
                  f"CPU ms; full forward {paths['full']['p50_ms']}/{paths['full']['p99_ms']} ms, "
                  f"{paths['full']['cpu_ms_per_request']} CPU ms")
    console.print(f"wrote {args.out / 'serve_bench.json'}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SearchConfig()
    parser.add_argument("--model", type=Path, required=True, help="a `nimbleml rec train` model folder")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/serve"), help="output folder")
    parser.add_argument("--backend", default=None, help="runtime backend for ours (default: fastest available)")
    parser.add_argument("--frontends", type=int, default=0,
                        help="our front-end processes (default 0: serve's default, one per core with the bench's Redis)")
    parser.add_argument("--workers", type=int, default=None,
                        help="our worker processes behind one front end (default: serve's default)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--slo-ms", type=float, default=defaults.slo_ms, help="p99 objective over every request, ms")
    parser.add_argument("--start-rps", type=float, default=defaults.start_rps, help="first offered rate of each grid")
    parser.add_argument("--factor", type=float, default=defaults.factor, help="rate multiplier between grid steps")
    parser.add_argument("--max-rps", type=float, default=defaults.max_rps, help="stop the grid above this rate")
    parser.add_argument("--grid-s", type=float, default=defaults.grid_s, help="seconds of arrivals per grid step")
    parser.add_argument("--tolerance", type=float, default=defaults.tolerance,
                        help="bisect until the bracket is within this fraction")
    parser.add_argument("--step-s", type=float, default=defaults.step_s,
                        help="seconds measured per bisection step and per repeat")
    parser.add_argument("--warmup-s", type=float, default=defaults.warmup_s,
                        help="seconds at a step's rate before it is measured")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="measurements of the capacity point")
    parser.add_argument("--interleaved-rounds", type=int, default=3,
                        help="rounds re-measuring the best naive variant and ours (fp32 parent too) in turn, "
                             "order rotated, for a ratio per round that machine drift cannot bias (0 = skip)")
    parser.add_argument("--sample-every", type=int, default=25, help="check every n-th answer under load")
    parser.add_argument("--naive-variants", nargs="+", default=list(NAIVE_VARIANTS), metavar="NAME",
                        help=f"naive servers to measure (default: all of {', '.join(NAIVE_VARIANTS)})")
    parser.add_argument("--wrk-s", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--wrk-connections", type=int, nargs="+", default=list(CONNECTIONS),
                        help="connection counts of the wrk cross-check")
    parser.add_argument("--skip-wrk", action="store_true", help="leave out the wrk cross-check")
    parser.add_argument("--overload-s", type=float, default=8.0, help="seconds of the 2x overload run")
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument("--skip-ray", action="store_true", help="leave out Ray Serve")
    parser.add_argument("--redis", default=None,
                        help="Redis URL for our servers and the premium-lane overload run (default: a private "
                             "redis-server if installed)")
    parser.add_argument("--skip-fastapi-route", action="store_true",
                        help="leave out ours with every route through FastAPI (nimbleml_fastapi_route)")
    parser.add_argument("--skip-one-frontend", action="store_true",
                        help="leave out ours as one front end with worker processes (nimbleml_one_frontend)")


def _main() -> None:
    """Process entry for the servers this benchmark starts (naive, trivial)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--naive", type=Path)
    parser.add_argument("--endpoint", choices=("async", "sync"), default="async")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--int8", action="store_true", help="torch dynamic int8 on the Linear layers")
    parser.add_argument("--trivial", action="store_true")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.trivial:
        import uvloop

        uvloop.run(_trivial_main(args.port))
    else:
        import uvicorn

        os.environ[NAIVE_ENV] = f"{args.naive}|{args.endpoint}|{args.threads}|{int(args.int8)}"
        uvicorn.run("nimbleml.commands.serve_bench:naive_factory", factory=True, workers=args.workers,
                    host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    _main()
