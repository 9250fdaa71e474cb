"""SeqRec: shapes, causal and padding masks, bad ids at the boundary, ONNX export."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from nimbleml.errors import NimbleError
from nimbleml.rec.evaluate import SeqRecScorer
from nimbleml.rec.model import SeqRec, SeqRecConfig

N_ITEMS = 40


@pytest.fixture
def model() -> SeqRec:
    torch.manual_seed(0)
    config = SeqRecConfig.small(N_ITEMS, max_len=12, n_blocks=2, use_behavior=True, use_category=True, n_categories=5)
    model = SeqRec(config)
    model.set_item_category(torch.arange(N_ITEMS + 1) % 6)
    return model.eval()


def test_forward_shapes(model: SeqRec) -> None:
    history = torch.randint(1, N_ITEMS + 1, (3, 12))
    assert model.encode(history).shape == (3, 12, 32)
    assert model(history, torch.randint(1, N_ITEMS + 1, (3, 7))).shape == (3, 7)
    assert model.score_all(history).shape == (3, N_ITEMS + 1)
    # a longer serving window (e.g. 100) uses the last max_len events
    long = torch.cat([torch.randint(1, N_ITEMS + 1, (3, 88)), history], dim=1)
    torch.testing.assert_close(model.score_all(long), model.score_all(history))


def test_causal_mask(model: SeqRec) -> None:
    history = torch.randint(1, N_ITEMS + 1, (2, 12))
    changed = history.clone()
    changed[:, 8] = (changed[:, 8] % N_ITEMS) + 1
    before, after = model.encode(history), model.encode(changed)
    torch.testing.assert_close(before[:, :8], after[:, :8])
    assert not torch.allclose(before[:, 8:], after[:, 8:])


def test_padding_mask(model: SeqRec) -> None:
    history = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 5, 9, 3, 7, 2]])
    reference = model.score_all(history)
    torch.testing.assert_close(model.score_all(history[:, -5:]), reference)  # fewer leading pads
    with torch.no_grad():
        model.item_emb.weight[0].normal_()  # whatever the padding row holds
        model.pos_emb.weight[:7].normal_()
    torch.testing.assert_close(model.score_all(history)[:, 1:], reference[:, 1:])  # column 0 = padding


def test_empty_history_gives_finite_scores(model: SeqRec) -> None:
    history = torch.zeros(2, 12, dtype=torch.int64)
    history[1, -1] = 4
    scores = model.score_all(history)
    assert torch.isfinite(scores).all()
    model.train()
    assert torch.isfinite(model.encode(history)).all()


def test_scorer_rejects_out_of_range_ids(model: SeqRec) -> None:
    scorer = SeqRecScorer(model)
    with pytest.raises(NimbleError, match="outside"):
        scorer.score_all(np.array([[0, 1, N_ITEMS + 1]]))
    with pytest.raises(NimbleError, match="outside"):
        scorer.score(np.array([[0, 1, 2]]), np.array([[-1, 3]]))
    assert scorer.score(np.array([[0, 1, 2]]), np.array([[1, 3]])).shape == (1, 2)


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="onnx not installed")
def test_onnx_export_dynamic_batch(model: SeqRec, tmp_path) -> None:
    path = tmp_path / "seqrec.onnx"
    history = torch.randint(0, N_ITEMS + 1, (2, 100))
    candidates = torch.randint(1, N_ITEMS + 1, (2, 50))
    torch.onnx.export(
        model, (history, candidates), str(path), input_names=["history", "candidates"], output_names=["scores"],
        dynamic_axes={"history": {0: "batch"}, "candidates": {0: "batch"}, "scores": {0: "batch"}},
    )
    assert path.stat().st_size > 0


def test_serving_forward_exports_with_dynamic_batch(model: SeqRec) -> None:
    """torch.export (what the ONNX exporter traces) with a symbolic batch: no data-dependent branches."""
    from torch.export import Dim, export

    batch = Dim("batch", min=1, max=4096)
    example = (torch.randint(0, N_ITEMS + 1, (2, 100)), torch.randint(1, N_ITEMS + 1, (2, 50)))
    exported = export(model, example, dynamic_shapes=({0: batch}, {0: batch}))
    history, candidates = torch.randint(0, N_ITEMS + 1, (7, 100)), torch.randint(1, N_ITEMS + 1, (7, 50))
    torch.testing.assert_close(exported.module()(history, candidates), model(history, candidates))


def test_exclude_history_ranks_seen_items_last() -> None:
    torch.manual_seed(0)
    model = SeqRec(SeqRecConfig.small(N_ITEMS, max_len=12, exclude_history=True)).eval()
    history = torch.tensor([[0, 0, 0, 5, 9, 3], [0, 0, 0, 0, 0, 7]])
    scores = model.score_all(history)
    assert torch.isinf(scores[0, [5, 9, 3]]).all() and torch.isinf(scores[1, 7])
    assert torch.isfinite(scores[0, [1, 2, 7]]).all() and torch.isfinite(scores[:, 0]).all()  # padding is no item
    candidates = torch.tensor([[9, 1, 3], [7, 5, 0]])
    out = model(history, candidates)
    torch.testing.assert_close(out, torch.take_along_dim(scores, candidates, dim=1))
    from torch.export import Dim, export

    batch = Dim("batch", min=1, max=4096)
    example = (torch.randint(0, N_ITEMS + 1, (2, 100)), torch.randint(1, N_ITEMS + 1, (2, 50)))
    exported = export(model, example, dynamic_shapes=({0: batch}, {0: batch}))
    history, candidates = torch.randint(0, N_ITEMS + 1, (5, 100)), torch.randint(1, N_ITEMS + 1, (5, 50))
    torch.testing.assert_close(exported.module()(history, candidates), model(history, candidates))
