"""Does SO_REUSEPORT spread a few keep-alive connections unevenly over the front ends, and does
the split move the throughput? A diagnostic behind a docs paragraph, never a result.

Starts `nimbleml serve` on a prepared bundle (two front ends, a private Redis), runs `wrk`
``--repeats`` times at each connection count, and counts the established connections per
front-end process with ``ss`` half way through each run. Prints one JSON line per run and writes
them all to ``--out``. Needs Debian's ``redis-server``, ``wrk`` and ``ss`` (iproute2).

    .venv/bin/python bench/serve_reuseport_balance.py runs/serve-int8b/bundle --out balance.json
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from nimbleml.bench.wrk import run_wrk
from nimbleml.commands.serve_bench import ADMIN_KEY, _free_port, _start, _stop, _wait_http
from nimbleml.serve.bundle import Bundle
from nimbleml.serve.loadgen import request_bodies


def connections_per_process(port: int) -> list[int]:
    """Established server-side connections on ``port``, counted per owning pid, largest first."""
    ss = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                        capture_output=True, text=True, check=True).stdout
    return sorted(collections.Counter(re.findall(r"pid=(\d+)", ss)).values(), reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="a bundle folder `bench serve` prepared (OUT/bundle)")
    parser.add_argument("--connections", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6.0, help="each wrk run, seconds")
    parser.add_argument("--out", type=Path, default=Path("balance.json"))
    args = parser.parse_args()

    bundle = Bundle.load(args.bundle)
    bodies = request_bodies({n: [vars(i) for i in g.inputs] for n, g in bundle.graphs.items()}, "recommend", 64)
    redis_port, port = _free_port(), _free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL)
    env = {"NIMBLEML_API_KEYS": f"bench-standard=standard,{ADMIN_KEY}=premium:admin"}
    server = _start([sys.executable, "-m", "nimbleml.cli", "serve", "--model", str(args.bundle), "--port", str(port),
                     "--redis", f"redis://127.0.0.1:{redis_port}/0", "--frontends", "2"],
                    args.out.with_suffix(".serve.log"), env)
    rows = []
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", server)
        time.sleep(2.0)
        for conns in args.connections:
            for _ in range(args.repeats):
                result = {}
                load = threading.Thread(target=lambda c=conns: result.update(vars(run_wrk(
                    f"http://127.0.0.1:{port}/v1/recommend", bodies, {"x-api-key": "bench-standard"}, c,
                    args.seconds, 2))))
                load.start()
                time.sleep(args.seconds / 2)
                split = connections_per_process(port)
                load.join()
                row = {"connections": conns, "split": split, "ok_rps": result.get("ok_rps"),
                       "p99_ms": result.get("p99_ms")}
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        _stop(server)
        redis.terminate()
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
