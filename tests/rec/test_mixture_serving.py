"""The repeat/explore mixture (``SeqRecConfig.repeat_mode="mixture"``) on the serving path: one
ONNX graph whose trimmed histories and any candidate count give the eager log-probabilities, and
a serving bundle that ranks with that graph only (the cached-scores path would need the per-item
recency and the explore normaliser beside the state, so it is left out, as for the bonus); its
state graph and index serve retrieval, the user's recent items first."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from nimbleml.rec.compression import HISTORY_WIDTH, export_serving
from nimbleml.rec.model import SeqRec, SeqRecConfig
from nimbleml.rec.serving import RECENT_FIRST, prepare_bundle
from nimbleml.rec.train import save_checkpoint
from nimbleml.runtime.backends import available_backends, get_backend
from nimbleml.runtime.padding import trim_left_padding
from nimbleml.serve.bundle import Bundle

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")

N_ITEMS = 200
FILE_BACKENDS = [name for name in available_backends() if not get_backend(name).needs_module]


@pytest.fixture(scope="module")
def model() -> SeqRec:
    torch.manual_seed(0)
    config = SeqRecConfig.small(N_ITEMS, max_len=30, n_blocks=2, repeat_scores=True, repeat_counts=True,
                                repeat_decay=True, repeat_mode="mixture")  # fmt: skip
    model = SeqRec(config).eval()
    with torch.no_grad():
        model.repeat_recency.weight.normal_()
        model.repeat_gate.bias.fill_(0.5)
        model.repeat_share_weight.fill_(1.0)
    return model


def _batch(rng: np.random.Generator, lengths: list[int], n_candidates: int) -> dict[str, np.ndarray]:
    """Histories drawn from 15 items (so they repeat); candidates mixing history and other items."""
    history = np.zeros((len(lengths), HISTORY_WIDTH), dtype=np.int64)
    for row, length in enumerate(lengths):
        history[row, HISTORY_WIDTH - length :] = rng.integers(1, 16, length)
    return {"history": history, "candidates": rng.integers(1, N_ITEMS + 1, (len(lengths), n_candidates))}


@pytest.fixture(scope="module")
def graph(model: SeqRec, tmp_path_factory):
    return export_serving(model, tmp_path_factory.mktemp("mixture") / "ranker.onnx")


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_onnx_graph_matches_eager_on_trimmed_histories(model: SeqRec, graph, backend: str) -> None:
    runner = get_backend(backend).load(graph)
    rng = np.random.default_rng(1)
    for lengths, n_candidates in (([3, 7, 1], 50), ([40, 2], 50), ([100, 5], N_ITEMS), ([1], 9)):
        inputs = _batch(rng, lengths, n_candidates)
        with torch.no_grad():
            expected = model(torch.as_tensor(inputs["history"]), torch.as_tensor(inputs["candidates"])).numpy()
        assert np.isfinite(expected).all()
        np.testing.assert_allclose(runner.predict(trim_left_padding(inputs, ["history"])), expected, atol=1e-4)
        np.testing.assert_allclose(runner.predict(inputs), expected, atol=1e-4)
    everything = {"history": inputs["history"], "candidates": np.arange(1, N_ITEMS + 1)[None]}
    assert np.exp(runner.predict(everything)).sum() == pytest.approx(1.0, abs=1e-4)  # log-probabilities


def test_bundle_serves_the_mixture_without_the_cached_state(model: SeqRec, tmp_path) -> None:
    save_checkpoint(model, {}, tmp_path / "model")
    bundle = Bundle.load(prepare_bundle(tmp_path / "model", tmp_path / "bundle"))
    assert set(bundle.graphs) == {"ranker", "state"} and bundle.item_table is None
    assert bundle.retrieval is not None and bundle.retrieval.recent_first == RECENT_FIRST
    inputs = _batch(np.random.default_rng(2), [30, 4], 50)
    with torch.no_grad():
        expected = model(torch.as_tensor(inputs["history"]), torch.as_tensor(inputs["candidates"])).numpy()
    got = get_backend("onnxruntime").load(bundle.graph_path("ranker")).predict(inputs)
    np.testing.assert_allclose(got, expected, atol=1e-4)
