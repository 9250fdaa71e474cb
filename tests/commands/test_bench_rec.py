"""`nimbleml bench rec` end to end on a tiny model (timings are reported, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nimbleml.cli import main
from nimbleml.errors import NimbleError
from nimbleml.serve.batcher import BatcherConfig

ROW_KEYS = {"variant", "backend", "params_m", "size_mb", "flops_per_request", "p50_ms_b1", "p99_ms_b1", "best_batch",
            "throughput_rps", "p50_ms", "throughput_rps_server", "server_batch", "threads", "peak_fraction",
            "peak_rss_mb", "hr@10", "ndcg@10", "mrr", "full_ndcg@10"}


def test_bench_rec_runs_end_to_end(tiny_rec: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, model_dir = tiny_rec
    out = tmp_path / "bench"
    assert main(["bench", "rec", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
                 "--variants", "baseline-padded,serving,serving+trim,edge+trim", "--backends", "torch,onnxruntime", "--quick"]) == 0
    payload = json.loads((out / "bench.json").read_text())
    assert payload["flops_peak_gflops"] > 0 and "environment" in payload
    rows = payload["rows"]
    assert [(r["variant"], r["backend"]) for r in rows] == [
        ("baseline", "torch"), ("baseline-padded", "torch"), ("serving", "torch"), ("serving", "onnxruntime"),
        ("serving+trim", "torch"), ("serving+trim", "onnxruntime"), ("edge+trim", "onnxruntime")]
    assert rows[-1]["size_mb"] > 0  # the ORT-format file's size
    assert rows[-1]["flops_per_request"] == pytest.approx(rows[-2]["flops_per_request"], rel=0.5)  # trimmed too
    assert payload["bucket_window"] == 8
    assert set(payload["summary"]["winners"]) == {"throughput", "p50_b1", "throughput_server_batch"}
    assert {"fp32_measured_gflops", "int8_measured_gops", "int8_instructions"} <= set(payload["cpu"])
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["throughput_rps"]["median"] > 0 and row["p99_ms_b1"] >= row["p50_ms_b1"] > 0
        low, high = row["throughput_rps"]["ci95"]
        assert low <= row["throughput_rps"]["median"] <= high and row["throughput_rps"]["n"] == payload["rounds"]
        assert row["p50_ms"]["median"] == row["p50_ms_b1"]
        # the server's batcher settings, read from BatcherConfig
        assert row["server_batch"] == {"max_batch_size": BatcherConfig().max_batch_size,
                                       "group_window": BatcherConfig().group_window}
        # threads set explicitly and recorded, per runtime
        key = {"torch": "torch_intra_op_threads", "onnxruntime": "ort_intra_op_num_threads"}[row["backend"]]
        assert row["threads"][key] == payload["threads"] >= 1
        assert 0 < row["peak_fraction"] < 1
    baseline, padded, serving = rows[:3]
    # the serving-shaped forward skips the last block's other positions: fewer FLOPs, same scores;
    # trimming the all-padding history columns changes no score either (through each backend)
    assert serving["flops_per_request"] < padded["flops_per_request"]
    assert baseline["flops_per_request"] < padded["flops_per_request"]  # the baseline is trimmed too
    for row in rows[1:]:
        assert row["ndcg@10"] == pytest.approx(baseline["ndcg@10"], abs=1e-9)
        assert row["full_ndcg@10"] == pytest.approx(baseline["full_ndcg@10"], abs=1e-9)


def test_unknown_variant_is_a_clear_error(tiny_rec, tmp_path: Path, capsys) -> None:
    data_dir, model_dir = tiny_rec
    assert main(["bench", "rec", "--model", str(model_dir), "--data", str(data_dir), "--out", str(tmp_path),
                 "--variants", "magic"]) == 2
    assert "unknown variant: magic" in capsys.readouterr().err


def test_baseline_runs_trimmed_batches_and_baseline_padded_does_not(tiny_rec, monkeypatch) -> None:
    """The baseline gets the dynamic padding every +trim row gets (issue 28: it used to be the only
    row fed the full 100-wide window); baseline-padded keeps that old row."""
    from nimbleml.commands import bench_rec
    from nimbleml.commands.model_folder import open_model_folder

    data_dir, model_dir = tiny_rec
    folder = open_model_folder(model_dir)
    widths: list[int] = []
    forward = folder.reference.forward
    monkeypatch.setattr(folder.reference, "forward", lambda history, *rest: widths.append(history.shape[1])
                        or forward(history, *rest))
    inputs = {k: v.numpy() for k, v in folder.make_inputs(4, 0).items()}
    for name in ("history", "behaviors"):
        if name in inputs:
            inputs[name][:, :60] = 0  # every row short: 60 columns of padding in all of them
    for name, expected in (("baseline", 40), ("baseline-padded", 100)):
        (candidate,) = bench_rec._candidates(name, folder, ["torch"], Path("."), None, threads=1)
        candidate.build()(inputs)
        assert widths[-1] == expected, name


def test_openvino_throughput_rows_use_async_requests_and_agree_with_sync(tiny_rec, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    from nimbleml.commands import bench_rec
    from nimbleml.commands.model_folder import open_model_folder
    from nimbleml.runtime.backends import get_backend
    from nimbleml.runtime.export import export_onnx

    data_dir, model_dir = tiny_rec
    folder = open_model_folder(model_dir)
    path = export_onnx(folder.module, folder.make_inputs(2, 0), tmp_path / "m.onnx", output_names=folder.output_names,
                       dynamic_dims=folder.dynamic_dims)
    record: dict = {}
    batched = bench_rec._openvino_async(path, 1, record)
    inputs = {k: v.numpy() for k, v in folder.make_inputs(13, 1).items()}
    sync = get_backend("openvino").load(path, threads=1, hint="LATENCY").predict(inputs)
    assert batched(inputs) == pytest.approx(sync, abs=1e-4)
    assert record["throughput_hint"] == "THROUGHPUT" and record["infer_requests"] >= 1
    assert record["throughput_streams"] >= 1


def test_int8_rows_quality_comes_from_their_own_graph(tiny_rec, tmp_path: Path) -> None:
    """A row shipped as an ONNX graph (as int8 variants are) is scored through that graph, on the
    full catalogue too: a deliberately broken graph shows a different NDCG than its parent's
    weights (issue 28: full-catalogue NDCG@10 of int8 rows used to be copied from the FP32 parent)."""
    import dataclasses

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from nimbleml.commands import bench_rec
    from nimbleml.commands.model_folder import open_model_folder
    from nimbleml.rec.compression import export_serving

    data_dir, model_dir = tiny_rec
    folder = open_model_folder(model_dir)
    graph = onnx.load(str(export_serving(folder.reference, tmp_path / "float.onnx")))
    biggest = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))  # the item embedding table
    table = numpy_helper.to_array(biggest)
    biggest.CopyFrom(numpy_helper.from_array(np.random.default_rng(0).permutation(table), biggest.name))
    onnx.save(graph, str(tmp_path / "broken.onnx"))
    probe = bench_rec._QualityProbe(data_dir, folder, None)

    def quality(f) -> dict:
        (candidate,) = bench_rec._candidates("quantize-dynamic", f, ["onnxruntime"], tmp_path, probe, threads=1)
        return candidate.quality(candidate.build())

    own = quality(dataclasses.replace(folder, onnx=tmp_path / "float.onnx"))
    broken = quality(dataclasses.replace(folder, onnx=tmp_path / "broken.onnx"))
    assert {"full_ndcg@10", "full_hr@10", "ndcg@10", "hr@10"} <= set(own)
    assert broken["full_ndcg@10"] != pytest.approx(own["full_ndcg@10"], abs=1e-6)
    assert broken["ndcg@10"] != pytest.approx(own["ndcg@10"], abs=1e-6)


def test_variant_presets_are_known_variants_and_in_the_help(capsys) -> None:
    from nimbleml.commands import bench_rec

    assert set(bench_rec.PRESETS) == {"fast", "paper", "all"}
    for name, chosen in bench_rec.PRESETS.items():
        assert bench_rec._pick(name, list(bench_rec.VARIANTS), "variant", bench_rec.PRESETS) == chosen
        assert set(chosen) <= set(bench_rec.VARIANTS) and chosen[0] == "baseline"
    # fast builds nothing that trains: no fine-tuned or distilled recipe
    assert not {r for v in bench_rec.PRESETS["fast"] for r in bench_rec.VARIANTS[v]} & {"distill", "qat", "prune",
                                                                                         "prune-structured"}
    with pytest.raises(SystemExit):
        main(["bench", "rec", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("fast", "paper", "all"):
        assert f"{name} =" in text
