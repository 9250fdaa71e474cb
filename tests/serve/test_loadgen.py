"""The load generator: open-loop counts, loopback only, and `nimbleml loadtest` writing loadtest.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nimbleml.cli import main
from nimbleml.errors import NimbleError
from nimbleml.serve.loadgen import loopback_target, summarise
from tests.serve.conftest import KEYS


def test_only_loopback_targets():
    assert loopback_target("http://127.0.0.1:8000/v1/recommend").port == 8000
    for url in ("http://8.8.8.8:80/", "ftp://127.0.0.1/", "http://10.1.2.3:8000"):
        with pytest.raises(NimbleError):
            loopback_target(url)


def test_summary_counts_and_percentiles():
    status = np.array([200, 200, 429, 503, 0, 500], dtype=np.int16)
    latency = np.array([1.0, 3.0, 0.5, 0.5, np.nan, 2.0], dtype=np.float32)
    tier = np.array([0, 1, 1, 1, 0, 0], dtype=np.int8)
    s = summarise(status, latency, tier, ["premium", "free"], duration_s=2.0)
    assert (s["sent"], s["answered"], s["ok"], s["rejected"], s["errors"]) == (6, 5, 2, 2, 2)
    assert s["throughput_rps"] == 1.0
    assert s["by_tier"]["free"]["rejected"] == 2 and s["by_tier"]["premium"]["p50_ms"] == 1.0


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
