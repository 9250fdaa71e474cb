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
