"""Serving bundles: the rec adapter's graphs agree with the torch model; broken bundles fail with one message."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from nimbleml.errors import NimbleError
from nimbleml.serve.bundle import Bundle
from nimbleml.serve.worker import LoadedBundle
from tests.serve.conftest import N_ITEMS


def test_rec_bundle_graphs_match_the_checkpoint(rec_model, rec_bundle):
    from nimbleml.rec.train import load_checkpoint

    bundle = Bundle.load(rec_bundle)
    assert bundle.operation == "recommend" and set(bundle.graphs) == {"ranker", "state"}
    specs = {s.name: s for s in bundle.graphs["ranker"].inputs}
    assert specs["candidates"].shape == [50] and specs["candidates"].high == N_ITEMS and specs["history"].pad == 0
    model = load_checkpoint(rec_model)
    rng = np.random.default_rng(0)
    history = rng.integers(1, N_ITEMS + 1, (4, 100))
    history[:, :60] = 0
    candidates = rng.integers(1, N_ITEMS + 1, (4, 50))
    loaded = LoadedBundle(str(rec_bundle), "onnxruntime", threads=1)
    served = loaded.run("ranker", {"history": history, "candidates": candidates})
    with torch.no_grad():
        expected = model(torch.from_numpy(history), torch.from_numpy(candidates)).numpy()
    finite = np.isfinite(expected)
    assert np.array_equal(finite, np.isfinite(served))
    np.testing.assert_allclose(served[finite], expected[finite], atol=1e-4)
    state = loaded.run("state", {"history": history})
    table = np.load(rec_bundle / "items.npy")
    cached = np.einsum("bd,bcd->bc", state, table[candidates])
    np.testing.assert_allclose(cached[finite], expected[finite], atol=1e-4)


def test_broken_bundles_name_the_file(rec_bundle, tmp_path):
    with pytest.raises(NimbleError, match="serving manifest not found"):
        Bundle.load(tmp_path)
    broken = tmp_path / "b"
    shutil.copytree(rec_bundle, broken)
    (broken / "state.onnx").unlink()
    with pytest.raises(NimbleError, match="state.onnx"):
        Bundle.load(broken)
    (broken / "serving.json").write_text(json.dumps({"version": "x"}))
    with pytest.raises(NimbleError, match="bad serving manifest"):
        Bundle.load(broken)


def test_rec_bundle_carries_an_exact_item_index(rec_bundle):
    import faiss

    bundle = Bundle.load(rec_bundle)
    assert bundle.retrieval is not None and bundle.retrieval.first_id == 1 and bundle.exclude_history
    index = faiss.read_index(str(rec_bundle / bundle.retrieval.file))
    assert index.ntotal == N_ITEMS and isinstance(index, faiss.IndexFlat)  # a small catalogue: exact search
    table = np.load(rec_bundle / "items.npy")
    _, top = index.search(table[5:6], 1)
    assert top[0, 0] + bundle.retrieval.first_id == np.argmax(table[1:] @ table[5]) + 1


def test_prepare_takes_the_model_folders_index_and_refuses_a_stale_one(rec_model, tmp_path):
    import faiss

    from nimbleml.rec.retrieve import IndexSpec, ItemIndex, item_table
    from nimbleml.rec.serving import prepare_bundle
    from nimbleml.rec.train import load_checkpoint

    model_dir = tmp_path / "model"
    shutil.copytree(rec_model, model_dir, ignore=shutil.ignore_patterns("serving"))
    table = item_table(load_checkpoint(model_dir))
    ItemIndex.build(table[::-1].copy()).save(model_dir)  # built from other weights
    with pytest.raises(NimbleError, match="does not match"):
        prepare_bundle(model_dir, tmp_path / "stale")
    ItemIndex.build(table, IndexSpec(factory="HNSW16,Flat", search={"efSearch": 64})).save(model_dir)
    bundle = Bundle.load(prepare_bundle(model_dir, tmp_path / "bundle"))
    assert bundle.retrieval.search == {"efSearch": 64}
    assert isinstance(faiss.read_index(str(bundle.folder / bundle.retrieval.file)), faiss.IndexHNSW)
