"""`nimbleml bench risk` end to end on the bundled arch series (timings are reported, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nimbleml.cli import main


def test_bench_risk_runs_end_to_end_and_scores_each_graph(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "risk", "--data", "arch", "--epochs", "1", "--max-samples", "200", "--quick",
                 "--out", str(out)]) == 0
    payload = json.loads((out / "bench.json").read_text())
    rows = payload["rows"]
    assert (rows[0]["variant"], rows[0]["backend"]) == ("baseline", "torch")
    assert {r["variant"] for r in rows} >= {"baseline", "fp32", "quantize-dynamic", "quantize-static"}
    assert payload["rounds"] == 3 and payload["flops_peak_gflops"] > 0
    baseline = rows[0]
    for row in rows:
        assert row["throughput_rps"]["median"] > 0 and row["throughput_rps"]["n"] == payload["rounds"]
        assert row["qlike"] > 0 and row["rmse"] > 0  # each row scored through its own graph
        if row["variant"] == "fp32":  # the FP32 graph is the eager network, exported
            assert row["max_abs_diff"] < 1e-3
            assert row["qlike"] == pytest.approx(baseline["qlike"], rel=1e-3)
