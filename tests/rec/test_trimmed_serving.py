"""The serving graph's history axis is dynamic, and trimming the padding is exact: the ONNX
graph fed only the used columns gives the full forward's scores (every file backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nimbleml.rec.compression import HISTORY_WIDTH, export_serving
from nimbleml.rec.model import SeqRec, SeqRecConfig
from nimbleml.runtime.backends import available_backends, get_backend
from nimbleml.runtime.export import has_dynamic_axis
from nimbleml.runtime.padding import trim_left_padding

N_ITEMS = 300
FILE_BACKENDS = [name for name in available_backends() if not get_backend(name).needs_module]


def _batch(rng: np.random.Generator, lengths: list[int]) -> dict[str, np.ndarray]:
    history = np.zeros((len(lengths), HISTORY_WIDTH), dtype=np.int64)
    for row, length in enumerate(lengths):
        history[row, HISTORY_WIDTH - length :] = rng.integers(1, N_ITEMS + 1, length)
    return {"history": history, "candidates": rng.integers(1, N_ITEMS + 1, (len(lengths), 50))}


@pytest.fixture(scope="module", params=[HISTORY_WIDTH, 30], ids=["window100", "window30"])
def graph(request, tmp_path_factory) -> tuple[SeqRec, Path]:
    torch.manual_seed(0)
    model = SeqRec(SeqRecConfig.small(N_ITEMS, max_len=request.param, n_blocks=2, exclude_history=True)).eval()
    return model, export_serving(model, tmp_path_factory.mktemp("trim") / "ranker.onnx")


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_trimmed_inputs_give_the_full_forward_scores(graph, backend: str) -> None:
    model, path = graph
    # the history axis is trimmed per batch; the candidate axis takes any count (full-catalogue scoring)
    assert has_dynamic_axis(path, "history", 1) and has_dynamic_axis(path, "candidates", 1)
    runner = get_backend(backend).load(path)
    rng = np.random.default_rng(1)
    for lengths in ([3, 7, 1], [40, 2], [100, 5], [1]):
        inputs = _batch(rng, lengths)
        with torch.no_grad():
            expected = model(torch.as_tensor(inputs["history"]), torch.as_tensor(inputs["candidates"])).numpy()
        trimmed = trim_left_padding(inputs, ["history"])
        assert trimmed["history"].shape[1] == max(lengths)
        got = runner.predict(trimmed)
        finite = np.isfinite(expected)
        np.testing.assert_array_equal(finite, np.isfinite(got))
        np.testing.assert_allclose(got[finite], expected[finite], atol=1e-4)
        np.testing.assert_allclose(runner.predict(inputs)[finite], expected[finite], atol=1e-4)  # untrimmed too
