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
    # by default the rows are timed on the real test users (short histories: the fixture's 8-30 events)
    assert payload["timing_requests"]["source"] == "test-users" and payload["timing_requests"]["seed"] is None
    assert payload["timing_requests"]["history_length"]["min"] < payload["timing_requests"]["history_length"]["max"]
    assert "real test users" in (out / "bench.md").read_text().splitlines()[0]
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
    assert main(["bench", "rec", "--model", str(model_dir), "--data", str(data_dir), "--out", str(tmp_path),
                 "--timing-users", "-5"]) == 2
    assert "--timing-users -5" in capsys.readouterr().err


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


def test_synthetic_users_fill_the_window_inside_the_vocabulary_and_are_deterministic() -> None:
    import numpy as np

    from nimbleml.commands import bench_rec

    n_items = 40
    popularity = np.zeros(n_items + 1, dtype=np.int64)
    popularity[1::2] = np.arange(1, n_items // 2 + 1)  # odd items only, more for the later ones
    mix = np.array([0, 70, 0, 20, 10])  # padding, pv, (no cart), fav, buy
    users = bench_rec.synthetic_users(300, 100, n_items, popularity, mix, 5, seed=3)
    assert users.source == "synthetic-full-length" and users.seed == 3
    assert users.history.shape == users.behaviors.shape == (300, 100)
    assert (users.lengths == 100).all()  # every history fills the window: no padding
    assert users.history.min() >= 1 and users.history.max() <= n_items
    assert set(np.unique(users.history)) <= set(range(1, n_items + 1, 2))  # never an item without training events
    counts = np.bincount(users.history.ravel(), minlength=n_items + 1)
    assert counts[n_items - 1] > counts[1]  # by popularity: item 39 has 20x item 1's training events
    assert set(np.unique(users.behaviors)) == {1, 3, 4}  # the training mix's codes only
    again = bench_rec.synthetic_users(300, 100, n_items, popularity, mix, 5, seed=3)
    assert np.array_equal(again.history, users.history) and np.array_equal(again.behaviors, users.behaviors)
    other = bench_rec.synthetic_users(300, 100, n_items, popularity, mix, 5, seed=4)
    assert not np.array_equal(other.history, users.history)
    assert users.to_dict()["history_length"] == {"median": 100.0, "min": 100, "max": 100}
    assert bench_rec.synthetic_users(10, 7, n_items, popularity).behaviors is None  # a model without behaviour codes


def test_synthetic_users_without_counts_are_uniform_over_the_vocabulary_with_a_warning(caplog) -> None:
    import numpy as np

    from nimbleml.commands import bench_rec

    with caplog.at_level("WARNING", logger="nimbleml.commands.bench_rec"):
        users = bench_rec.synthetic_users(2_000, 50, 30, None)
    assert "no training counts of items" in caplog.text
    assert set(np.unique(users.history)) == set(range(1, 31))  # every item of the vocabulary, no other id
    caplog.clear()
    with caplog.at_level("WARNING", logger="nimbleml.commands.bench_rec"):
        bench_rec.synthetic_users(10, 50, 30, np.arange(31))
    assert "no training counts" not in caplog.text


def test_bench_rec_times_every_row_on_synthetic_full_length_users(tiny_rec, tmp_path: Path, monkeypatch) -> None:
    """--timing-users N: every request a row is timed on (latency, throughput, server batch) is a
    synthetic user whose history fills the model's window; quality stays on the real test users."""
    import numpy as np

    from nimbleml.commands import bench_rec
    from nimbleml.commands.model_folder import open_model_folder

    data_dir, model_dir = tiny_rec
    max_len = open_model_folder(model_dir).reference.config.max_len
    timed: list[dict] = []
    measure_rows = bench_rec.measure_rows

    def recording(make):
        return lambda batch: timed.append(make(batch)) or timed[-1]

    def spy(candidates, make_inputs, config, peak, server=None, server_batch=None):
        return measure_rows(candidates, recording(make_inputs), config, peak,
                            server=(server[0], recording(server[1])), server_batch=server_batch)

    monkeypatch.setattr(bench_rec, "measure_rows", spy)
    out = tmp_path / "bench"
    assert main(["bench", "rec", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
                 "--variants", "baseline-padded,serving+trim", "--backends", "torch,onnxruntime",
                 "--timing-users", "200", "--quick"]) == 0
    payload = json.loads((out / "bench.json").read_text())
    assert payload["timing_requests"]["source"] == "synthetic-full-length"
    assert payload["timing_requests"]["n_users"] == 200 and payload["timing_requests"]["seed"] == bench_rec.SYNTHETIC_SEED
    assert payload["timing_requests"]["history_length"] == {"median": float(max_len), "min": max_len, "max": max_len}
    assert "synthetic full-length users" in (out / "bench.md").read_text().splitlines()[0]
    assert timed
    for inputs in timed:
        for name in ("history", "behaviors"):
            if name in inputs:
                assert ((inputs[name] != 0).sum(axis=1) == max_len).all(), name
    rows = {(r["variant"], r["backend"]): r for r in payload["rows"]}
    # full windows: trimming drops nothing, so the trimmed baseline computes what the padded one does
    assert rows["baseline", "torch"]["flops_per_request"] == rows["baseline-padded", "torch"]["flops_per_request"]
    # quality is on the real test users, as without --timing-users: the same scores through every row
    for row in payload["rows"]:
        assert row["full_ndcg@10"] == pytest.approx(rows["baseline", "torch"]["full_ndcg@10"], abs=1e-9)


def test_the_pruned_int8_chain_reuses_the_pruned_folder(tiny_rec, tmp_path: Path, monkeypatch) -> None:
    """prune-structured+quantize-dynamic starts from the prune-structured variant's folder when it
    exists, so the fine-tune runs once; the chain's folder records both recipes."""
    import nimbleml.rec.compression as compression

    data_dir, model_dir = tiny_rec
    out = tmp_path / "bench"
    calls = []
    original = compression.compress_model

    def spy(parent, data, recipes, folder, config=None):
        calls.append((Path(parent).name, list(recipes)))
        return original(parent, data, recipes, folder, config)

    monkeypatch.setattr(compression, "compress_model", spy)  # bench_rec imports it lazily from here
    assert main(["bench", "rec", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
                 "--variants", "prune-structured,prune-structured+quantize-dynamic+trim",
                 "--backends", "onnxruntime", "--quick"]) == 0
    assert calls == [(model_dir.name, ["prune-structured"]), ("prune-structured", ["quantize-dynamic"])]
    variant = json.loads((out / "variants" / "prune-structured+quantize-dynamic" / "variant.json").read_text())
    assert variant["recipes"] == ["prune-structured", "quantize-dynamic"]
    rows = {(r["variant"], r["backend"]) for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert ("prune-structured+quantize-dynamic+trim", "onnxruntime") in rows
