"""`nimbleml loadtest --url URL --rps R --duration S --mix ...`: open-loop load against a local server.

Poisson arrivals at R req/s for S seconds, split over tiers by ``--mix`` (each tier sends its
own API key), bodies drawn from the served model's input specs; writes ``DIR/loadtest.json``
and ``DIR/latency.png`` and prints the summary. Loopback targets only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from nimbleml.environment import environment
from nimbleml.errors import NimbleError
from nimbleml.serve.loadgen import (STATUS_CLASSES, LoadPlan, LoadResult, http_request, loopback_target, plot_latency,
                                    request_bodies, run_load)

KEYS_ENV = "NIMBLEML_LOADTEST_KEYS"  # tier=key,tier=key: the key each tier's requests carry
ROUTES = {"recommend": "/v1/recommend", "risk": "/v1/risk"}


def parse_mix(text: str) -> dict[str, float]:
    """``premium=0.1,standard=0.6,free=0.3`` -> shares that sum to 1."""
    mix: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, share = part.partition("=")
        try:
            mix[name.strip()] = float(share)
        except ValueError:
            sep = ""
        if not sep or mix.get(name.strip(), -1) < 0:
            raise NimbleError(f"bad --mix entry {part!r}", fix="write tier=share,... e.g. premium=0.1,standard=0.9")
    total = sum(mix.values())
    if not mix or total <= 0:
        raise NimbleError("--mix has no positive share", fix="e.g. premium=0.1,standard=0.6,free=0.3")
    return {k: v / total for k, v in mix.items()}


def parse_keys(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    return dict(part.strip().split("=", 1) for part in text.split(",") if "=" in part)


def build_plan(url: str, rps: float, duration_s: float, mix: dict[str, float], keys: dict[str, str],
               processes: int = 2, seed: int = 0, timeout_s: float = 5.0, bodies_per_tier: int = 64) -> LoadPlan:
    """Ask the server what it serves, then pre-encode every request."""
    base = loopback_target(url)
    try:
        key = next(iter(keys.values()), None)  # /v1/models needs a key where the server has keys
        models = httpx.get(f"http://{base.host}:{base.port}/v1/models", timeout=10,
                           headers={"x-api-key": key} if key else {}).json()
    except (httpx.HTTPError, ValueError) as exc:
        raise NimbleError(f"cannot read {url}/v1/models ({exc})", fix="start the server first: nimbleml serve") from exc
    target = loopback_target(f"http://{base.host}:{base.port}{ROUTES[models['operation']]}")
    bodies = request_bodies(models["inputs"], models["operation"], bodies_per_tier, seed)
    requests = {tier: [http_request(target, b, keys.get(tier)) for b in bodies] for tier in mix}
    return LoadPlan(target, rps, duration_s, requests, mix, processes=processes, timeout_s=timeout_s, seed=seed)


def summary_table(summary: dict, title: str) -> Table:
    """One row per tier (and all): what each request got, by status, and p50/p99 over all but the
    deliberate refusals (a timeout as infinite: shown as "inf")."""
    table = Table(title=title)
    for column in ("tier", "sent", *STATUS_CLASSES, "p50 ms", "p99 ms"):
        table.add_column(column, justify="right" if column != "tier" else "left")
    rows = [("all", summary)] + list(summary["by_tier"].items())
    for name, block in rows:
        counted = block["sent"] > block["rejected"]  # None then means a timeout, else nothing to count
        latency = [str(block[k]) if block[k] is not None else "inf" if counted else "-" for k in ("p50_ms", "p99_ms")]
        table.add_row(name, str(block["sent"]), *(str(block["status"][k]) for k in STATUS_CLASSES), *latency)
    return table


def write_result(result: LoadResult, out: Path, config: dict, title: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    payload = {**result.summary(), "config": config, "environment": environment()}
    (out / "loadtest.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot_latency(result, out / "latency.png", title)
    return payload


def run_loadtest(args: argparse.Namespace) -> int:
    mix = parse_mix(args.mix)
    keys = parse_keys(os.environ.get(KEYS_ENV)) if args.keys is None else json.loads(Path(args.keys).read_text())
    plan = build_plan(args.url, args.rps, args.duration, mix, keys, args.processes, args.seed, args.timeout)
    result = run_load(plan)
    title = f"{args.rps:g} req/s for {args.duration:g} s against {args.url}"
    config = {"url": args.url, "rps": args.rps, "duration_s": args.duration, "mix": mix,
              "processes": args.processes, "timeout_s": args.timeout, "seed": args.seed}
    payload = write_result(result, args.out, config, title)
    Console().print(summary_table(payload, title))
    Console().print(f"throughput {payload['throughput_rps']} req/s; wrote {args.out / 'loadtest.json'}")
    return 0


def demo_burst(model_dir: Path, out: Path, console: Console, rps: float = 150.0, duration_s: float = 5.0) -> dict:
    """Start `nimbleml serve` on loopback with one key per tier, send a short burst, stop it; the summary."""
    keys = {tier: f"demo-{tier}" for tier in ("premium", "standard", "free")}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        env = {**os.environ, "NIMBLEML_API_KEYS": ",".join(f"{k}={t}" for t, k in keys.items())}
        cmd = [sys.executable, "-m", "nimbleml.cli", "serve", "--model", str(model_dir), "--port", "0",
               "--ready-file", str(ready)]
        with (out / "server.log").open("w") as log_file:
            server = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
            try:
                deadline = time.monotonic() + 300
                while not ready.exists():
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise NimbleError("the demo server did not start", path=out / "server.log")
                    time.sleep(0.2)
                url = f"http://127.0.0.1:{json.loads(ready.read_text())['http']}"
                mix = {"premium": 0.1, "standard": 0.6, "free": 0.3}
                result = run_load(build_plan(url, rps, duration_s, mix, keys))
                title = f"demo burst: {rps:g} req/s for {duration_s:g} s (synthetic model)"
                payload = write_result(result, out, {"url": url, "rps": rps, "duration_s": duration_s, "mix": mix}, title)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(60)
    console.print(summary_table(payload, title))
    console.print(f"throughput {payload['throughput_rps']} req/s, p99 {payload['p99_ms']} ms; server stopped")
    return {k: payload[k] for k in ("sent", "answered", "ok", "rejected", "throughput_rps", "p50_ms", "p99_ms")}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("loadtest", help="open-loop Poisson load against a local nimbleml server")
    parser.add_argument("--url", required=True, help="server base URL on loopback, e.g. http://127.0.0.1:8000")
    parser.add_argument("--rps", type=float, required=True, help="mean arrival rate, requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals")
    parser.add_argument("--mix", default="premium=0.1,standard=0.6,free=0.3", help="tier shares")
    parser.add_argument("--keys", type=Path, default=None, help=f'JSON {{"tier": "key"}} (default: ${KEYS_ENV})')
    parser.add_argument("--processes", type=int, default=2, help="generator processes")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds before a request counts as unanswered")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("reports/loadtest"), help="output folder")
    parser.set_defaults(func=run_loadtest)
