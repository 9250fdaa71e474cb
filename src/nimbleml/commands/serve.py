"""`nimbleml serve --model DIR`: serve a recommender or a risk model over HTTP and gRPC.

The model folder is turned into a serving bundle by its workload's adapter (``rec/serving``
for a ranker checkpoint, ``risk/serving`` for a fitted CNN forecaster), then served through
the fastest available ``runtime`` backend unless ``--backend`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nimbleml.errors import NimbleError
from nimbleml.serve.batcher import BatcherConfig
from nimbleml.serve.bundle import MANIFEST, Bundle
from nimbleml.serve.frontends import Shared, Supervisor, default_frontends
from nimbleml.serve.history import MAX_USERS, open_store
from nimbleml.serve.keys import load_keyring
from nimbleml.serve.limiter import AdmissionController, ShedConfig
from nimbleml.serve.router import PoolConfig
from nimbleml.serve.server import ListenConfig, run
from nimbleml.serve.service import ServeConfig, Service

log = logging.getLogger(__name__)


def prepare_model(folder: Path, out: Path | None = None) -> Path:
    """Any model folder -> a serving bundle folder (prepared once, re-used while the weights match).

    out: where the bundle goes (default: ``serving/`` inside the model folder)."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return folder
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        from nimbleml.rec.serving import prepare_bundle

        return prepare_bundle(folder, out)
    from nimbleml.risk.serving import is_risk_model, prepare_risk_bundle

    if is_risk_model(folder):
        return prepare_risk_bundle(folder, out)
    raise NimbleError("not a model folder nimbleml can serve", path=folder,
                      fix="pass a `nimbleml rec train` model folder, a risk model folder, or a prepared bundle")


def default_workers() -> int:
    """One worker per core beyond the one the front end uses (at least one)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def build_service(args: argparse.Namespace, shared: Shared | None = None) -> Service:
    """shared: this process is one of several front ends (``serve/frontends.py``): the model runs
    in process, the rate buckets are the shared ones, admin calls are repeated on the siblings."""
    from nimbleml.runtime.backends import available_backends, best_backend

    backend = args.backend or best_backend()
    if backend not in available_backends():
        raise NimbleError(f"backend {backend!r} is not available here", fix=f"use one of {available_backends()}")
    bundle = Bundle.load(prepare_model(args.model))
    admission = AdmissionController(shed=ShedConfig(target_p99_ms=args.target_p99_ms, soft_queue_depth=args.shed_queue[0],
                                                    hard_queue_depth=args.shed_queue[1],
                                                    soft_loop_lag_ms=args.shed_loop_lag_ms[0],
                                                    hard_loop_lag_ms=args.shed_loop_lag_ms[1]),
                                    shared=shared.buckets if shared else None)
    risk_limits = json.loads(Path(args.risk_limits).read_text()) if args.risk_limits else {}
    config = ServeConfig(
        batcher=BatcherConfig(max_batch_size=args.max_batch, max_queue_delay_ms=args.max_wait_ms),
        pool=PoolConfig(workers=0 if shared else default_workers() if args.workers is None else args.workers,
                        backend=backend, threads=args.threads,
                        warm_batches=(1, args.max_batch), batch_timeout_s=args.batch_timeout_s,
                        admin_timeout_s=args.admin_timeout_s),
        deadline_ms=args.deadline_ms,
        risk_limits={str(k): float(v) for k, v in risk_limits.items()},
        lane=args.lane,
        peers=list(args.peers),
        peers_file=shared.peers_file if shared else None,
        peer_token=shared.token if shared else None,
        versions_file=shared.versions_file if shared else None,
    )
    keys = load_keyring(args.keys, set(admission.tiers))
    store = open_store(args.redis, max_users=args.history_users)
    return Service(bundle, keys, config, store=store, admission=admission, prepare=prepare_model)


def _two_ints(text: str) -> tuple[int, int]:
    try:
        soft, hard = (int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected SOFT,HARD (two integers), got {text!r}") from exc
    if not 0 < soft <= hard:
        raise argparse.ArgumentTypeError(f"need 0 < SOFT <= HARD, got {text!r}")
    return soft, hard


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder (rec checkpoint, risk model, or bundle)")
    parser.add_argument("--frontends", type=int, default=0,
                        help="front-end processes on the port, each batching and running its model in process "
                             "(default 0: one per core with --redis or a risk model, else 1)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes behind a single front end (default: cores - 1, at least 1; "
                             "0: the front end runs the model itself)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (non-loopback needs API keys)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (0 = any free port)")
    parser.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default: no gRPC; 0 = any free)")
    parser.add_argument("--redis", default=None, help="history store URL, e.g. redis://127.0.0.1:6379/0 (default: in process)")
    parser.add_argument("--history-users", type=_positive_int, default=MAX_USERS,
                        help="users the in-process history store keeps, least recently used dropped first "
                             "(without --redis)")
    parser.add_argument("--max-batch", type=int, default=16, help="largest batch a worker runs")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="longest a request waits for a batch, ms")
    parser.add_argument("--deadline-ms", type=float, default=500.0, help="answer 504 instead of later than this, ms")
    parser.add_argument("--batch-timeout-s", type=float, default=PoolConfig.batch_timeout_s,
                        help="a worker that leaves a batch (or a heartbeat) unanswered this long is killed and "
                             "replaced, its requests answered 503, seconds")
    parser.add_argument("--admin-timeout-s", type=float, default=PoolConfig.admin_timeout_s,
                        help="admin model loads, unloads and drains give up after this, seconds")
    parser.add_argument("--target-p99-ms", type=float, default=50.0, help="p99 above which low tiers are shed, ms")
    parser.add_argument("--shed-queue", type=_two_ints, default=(ShedConfig.soft_queue_depth, ShedConfig.hard_queue_depth),
                        metavar="SOFT,HARD", help="queued requests past which free (SOFT) and standard (HARD) are shed")
    parser.add_argument("--shed-loop-lag-ms", type=_two_ints,
                        default=(int(ShedConfig.soft_loop_lag_ms), int(ShedConfig.hard_loop_lag_ms)), metavar="SOFT,HARD",
                        help="front-end event-loop lag (ms) past which free (SOFT) and standard (HARD) are shed")
    parser.add_argument("--backend", default=None, help="runtime backend (default: the fastest available)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per worker")
    parser.add_argument("--keys", type=Path, default=None, help="API keys JSON file (default: $NIMBLEML_API_KEYS)")
    parser.add_argument("--risk-limits", type=Path, default=None, help='JSON {"ASSET": volatility limit} for breach flags')
    parser.add_argument("--http", choices=("asgi", "fastapi"), default="asgi",
                        help="HTTP front end, both uvicorn with the HTTP limits: asgi (lean ASGI hot path), "
                             "fastapi (every route through FastAPI, for comparison)")
    parser.add_argument("--ready-file", type=Path, default=None, help="write the bound ports here once serving")
    parser.add_argument("--premium-port", type=int, default=None,
                        help="also serve premium callers from a second process on this port (0 = any free), at "
                             "normal CPU priority while this one runs niced; needs --redis for a recommender")
    parser.add_argument("--bulk-nice", type=int, default=10,
                        help="with --premium-port: niceness added to the main server and its workers (default 10)")
    parser.add_argument("--lane", choices=("premium",), default=None, help=argparse.SUPPRESS)  # set on the lane process
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(peers=[])  # the lanes' URLs, filled in by run_serve


def _lane_command(args: argparse.Namespace, ready: Path) -> list[str]:
    """The same server as a premium lane: one worker, no gRPC, the same keys, store and limits."""
    cmd = [sys.executable, "-m", "nimbleml.cli", "serve", "--model", str(args.model), "--host", args.host,
           "--port", str(args.premium_port), "--frontends", "1", "--workers", "1", "--max-batch", str(args.max_batch),
           "--max-wait-ms", str(args.max_wait_ms), "--deadline-ms", str(args.deadline_ms),
           "--target-p99-ms", str(args.target_p99_ms), "--shed-queue", "{},{}".format(*args.shed_queue),
           "--shed-loop-lag-ms", "{},{}".format(*args.shed_loop_lag_ms),
           "--batch-timeout-s", str(args.batch_timeout_s), "--admin-timeout-s", str(args.admin_timeout_s),
           "--threads", str(args.threads), "--http", args.http, "--lane", "premium",
           "--parent-pid", str(os.getpid()), "--ready-file", str(ready)]
    for flag, value in (("--redis", args.redis), ("--backend", args.backend), ("--keys", args.keys),
                        ("--risk-limits", args.risk_limits)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def start_lane(args: argparse.Namespace, timeout_s: float = 300.0) -> tuple[subprocess.Popen, int]:
    """Start the premium lane and wait until it serves: (process, its HTTP port)."""
    if args.redis is None and Bundle.load(prepare_model(args.model)).operation == "recommend":
        raise NimbleError("--premium-port runs a second process, which must see the same user histories",
                          fix="add --redis redis://127.0.0.1:6379/0 (a shared history store)")
    ready = Path(tempfile.mkdtemp(prefix="nimbleml-lane-")) / "ready.json"
    process = subprocess.Popen(_lane_command(args, ready))
    deadline = time.monotonic() + timeout_s
    while not ready.is_file():
        if process.poll() is not None:
            raise NimbleError(f"the premium lane exited with status {process.returncode} before serving",
                              fix="see the lane's log lines above")
        if time.monotonic() > deadline:
            process.kill()
            raise NimbleError(f"the premium lane did not start within {timeout_s:g} s", fix="check the machine's load")
        time.sleep(0.05)
    return process, int(json.loads(ready.read_text())["http"])


def check_frontends(args: argparse.Namespace, count: int) -> None:
    """Several front ends need a shared history store for a recommender, and run the model in process."""
    if args.workers:
        raise NimbleError(f"--workers {args.workers} with {count} front ends: each front end runs its model itself",
                          fix="leave out --workers, or pass --frontends 1 for one front end with worker processes")
    if args.redis is None and Bundle.load(prepare_model(args.model)).operation == "recommend":
        raise NimbleError(f"{count} front ends each keep their own users' histories without a shared store",
                          fix="add --redis redis://127.0.0.1:6379/0, or pass --frontends 1")


def run_serve(args: argparse.Namespace) -> int:
    lane, extra = None, {}
    if args.premium_port is not None and args.lane is None:
        lane, port = start_lane(args)
        host = f"[{args.host}]" if ":" in args.host else args.host
        args.peers, extra = [f"http://{host}:{port}"], {"premium": port}
        log.info("premium lane on port %d (pid %d); this server and its workers run at nice +%d",
                 port, lane.pid, args.bulk_nice)
        os.nice(args.bulk_nice)  # the workers started below inherit it: the lane wins the CPU under overload
    try:
        frontends = args.frontends or default_frontends(args.redis, Bundle.load(prepare_model(args.model)).operation)
        if frontends > 1:
            check_frontends(args, frontends)
            Supervisor(args, frontends, hung_after_s=args.batch_timeout_s).serve_forever(args.ready_file, extra)
            return 0
        service = build_service(args)
        run(service, ListenConfig(host=args.host, port=args.port, grpc_port=args.grpc_port, http=args.http,
                                  ready_file=args.ready_file, ready_extra=extra, parent_pid=args.parent_pid))
    finally:
        if lane is not None:
            lane.terminate()
            try:
                lane.wait(30)
            except subprocess.TimeoutExpired:
                lane.kill()
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a model over HTTP/JSON and gRPC (batching, limits, versions)")
    add_arguments(parser)
    parser.set_defaults(func=run_serve)
