"""SeqRec: shapes, causal and padding masks, bad ids at the boundary, ONNX export, the
lightweight-attention switches, structured sizes and the serving-shaped forward."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from nimbleml.errors import NimbleError
from nimbleml.rec.evaluate import SeqRecScorer
from nimbleml.rec.model import SeqRec, SeqRecConfig, ServingRanker
from nimbleml.rec.train import load_checkpoint, save_checkpoint

N_ITEMS = 40


@pytest.fixture
def model() -> SeqRec:
    torch.manual_seed(0)
    config = SeqRecConfig.small(N_ITEMS, max_len=12, n_blocks=2, use_category=True, n_categories=5)
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


# ---------------------------------------------------------------- behaviours, serving forward, variants

VARIANTS = {
    "dense": {},
    "grouped": {"qkv_groups": 2},
    "lowrank": {"head_rank": 4},
    "local": {"attention_window": 3, "n_global": 2},
    "structured": {"block_heads": [1, 2], "block_ffn": [7, 20]},
    "behaviour": {"use_behavior": True},
    "rare": {"min_input_count": 2},
    "unknown": {"unknown_input_alpha": 0.5},
    "repeats": {"repeat_scores": True, "repeat_counts": True, "repeat_decay": True, "exclude_history": False},
    "mixture": {"repeat_scores": True, "repeat_counts": True, "repeat_decay": True, "exclude_history": False,
                "repeat_mode": "mixture"},
}


def _variant(name: str) -> SeqRec:
    torch.manual_seed(0)
    config = SeqRecConfig.small(N_ITEMS, max_len=12, n_blocks=2, **{"exclude_history": True, **VARIANTS[name]})
    model = SeqRec(config).eval()
    model.set_item_counts(np.arange(N_ITEMS + 1) % 3)  # items 1, 4, 7, ... seen once, 3, 6, ... never
    return model


def _inputs(batch: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    history = torch.randint(1, N_ITEMS + 1, (batch, length), generator=generator)
    history[0, :5] = 0  # left padding
    history[1, :-1] = 0  # a single event
    return {
        "history": history,
        "candidates": torch.randint(1, N_ITEMS + 1, (batch, 9), generator=generator),
        "behaviors": torch.randint(1, 5, (batch, length), generator=generator) * (history != 0),
    }


def test_behaviour_model_requires_behaviours() -> None:
    model = _variant("behaviour")
    inputs = _inputs()
    with pytest.raises(NimbleError, match="behaviors"):
        model(inputs["history"], inputs["candidates"])
    with pytest.raises(NimbleError, match="behaviors"):
        ServingRanker(model)(inputs["history"], inputs["candidates"])
    changed = inputs["behaviors"].clone()
    changed[:, -1] = changed[:, -1] % 4 + 1
    assert not torch.allclose(model(**inputs), model(inputs["history"], inputs["candidates"], changed))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_serving_ranker_equals_full_forward(name: str) -> None:
    model = _variant(name)
    inputs = _inputs()
    if not model.config.use_behavior:
        inputs.pop("behaviors")
    with torch.no_grad():
        full, serving = model(**inputs), ServingRanker(model)(**inputs)
    assert torch.equal(torch.isinf(full), torch.isinf(serving))
    torch.testing.assert_close(serving, full, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(model.encode(inputs["history"], inputs.get("behaviors"))).all()


def test_lightweight_switches_shrink_the_projections() -> None:
    dense, grouped, lowrank = (sum(p.numel() for p in _variant(n).blocks.parameters()) for n in ("dense", "grouped", "lowrank"))
    assert grouped < dense and lowrank < dense
    structured = _variant("structured")
    assert structured.blocks[0].attn.q.weight.shape == (16, 32)  # 1 head of 16
    assert structured.blocks[1].ffn[0].weight.shape == (20, 32)


def test_local_window_hides_old_events_but_not_global_ones() -> None:
    torch.manual_seed(0)
    model = SeqRec(SeqRecConfig.small(N_ITEMS, max_len=12, n_blocks=1, attention_window=3, n_global=1)).eval()
    history = torch.randint(1, N_ITEMS + 1, (1, 12))
    reference = model.last_state(history)
    middle = history.clone()
    middle[0, 5] = middle[0, 5] % N_ITEMS + 1  # neither in the last 3 nor the first event
    torch.testing.assert_close(model.last_state(middle), reference)
    first = history.clone()
    first[0, 0] = first[0, 0] % N_ITEMS + 1  # the global event
    assert not torch.allclose(model.last_state(first), reference)


def test_attention_maps_are_distributions_over_allowed_keys() -> None:
    model = _variant("local")
    history = _inputs()["history"]
    hidden, maps = model.encode_with_attention(history)
    torch.testing.assert_close(hidden, model.encode(history))
    _, allowed = model.embed(history)
    for weights in maps:
        assert weights.shape == (4, 2, 12, 12)
        torch.testing.assert_close(weights.sum(-1), torch.ones(4, 2, 12))
        assert (weights.masked_select(~allowed.expand_as(weights)) == 0).all()


def test_structured_model_rebuilds_from_its_folder(tmp_path) -> None:
    model = _variant("structured")
    save_checkpoint(model, {}, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.config.block_heads == [1, 2] and loaded.config.block_ffn == [7, 20]
    inputs = _inputs()
    inputs.pop("behaviors")
    torch.testing.assert_close(loaded(**inputs), model(**inputs))


def test_rare_items_share_one_input_vector(tmp_path) -> None:
    """Below min_input_count an item's identity leaves the input (its candidate score stays its own)."""
    model = _variant("rare")
    assert model.input_known[[0, 2, 5]].all() and not model.input_known[[1, 3, 4]].any()
    history = torch.tensor([[2, 5, 1], [2, 5, 3], [2, 5, 5]])
    with torch.no_grad():
        states = model.last_state(history)
        scores = model.score_candidates(states, history, torch.tensor([[1, 3]] * 3))
    torch.testing.assert_close(states[0], states[1])  # two rare items: the same state
    assert not torch.allclose(states[0], states[2])  # a known item keeps its own embedding
    assert scores[0, 0] != scores[0, 1]
    save_checkpoint(model, {}, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert torch.equal(loaded.input_known, model.input_known)
    torch.testing.assert_close(loaded.last_state(history), states)
    plain = _variant("dense")
    plain.set_item_counts(np.zeros(N_ITEMS + 1))  # without the switch: a no-op
    assert plain.rare_emb is None and not hasattr(plain, "input_known")


def test_unknown_input_dropout_follows_item_counts(tmp_path) -> None:
    """Word dropout: in training an item seen c times enters as the unknown vector with probability
    alpha / (alpha + c); at inference only items training never saw do."""
    model = _variant("unknown")  # counts: items 3, 6, ... 0; 1, 4, ... once; 2, 5, ... twice
    assert model.input_known[[0, 1, 2]].all() and not model.input_known[[3, 6]].any()
    torch.testing.assert_close(model.unknown_rate[[0, 1, 2, 3]], torch.tensor([0.0, 0.5 / 1.5, 0.5 / 2.5, 1.0]))
    history = torch.tensor([[1, 2, 3, 0]]).repeat(20_000, 1)
    with torch.no_grad():
        model.eval()
        x = model.input_embedding(history[:1])[0]
        torch.testing.assert_close(x[2], model.rare_emb)  # never seen: the shared vector
        assert not torch.allclose(x[0], model.rare_emb) and not x[3].any()  # known item; padding stays 0
        model.train()
        torch.manual_seed(1)
        dropped = (model.input_embedding(history) == model.rare_emb).all(-1).float().mean(0)
    expected = torch.tensor([0.5 / 1.5, 0.5 / 2.5, 1.0, 0.0])
    torch.testing.assert_close(dropped, expected, atol=0.015, rtol=0)
    save_checkpoint(model.eval(), {}, tmp_path)
    loaded = load_checkpoint(tmp_path)  # the rates are derived from counts, not saved
    torch.testing.assert_close(loaded.last_state(history[:2]), model.last_state(history[:2]))
    with pytest.raises(ValueError, match="unknown_input_alpha"):
        SeqRecConfig(n_items=5, unknown_input_alpha=-1.0)


def test_packed_qkv_checkpoint_loads() -> None:
    model = _variant("dense")
    state = model.state_dict()
    for block in range(2):
        prefix = f"blocks.{block}.attn."
        for kind in ("weight", "bias"):
            state[f"{prefix}qkv.{kind}"] = torch.cat([state.pop(f"{prefix}{n}.{kind}") for n in "qkv"])
    rebuilt = SeqRec(model.config).eval()
    rebuilt.load_state_dict(state)
    inputs = _inputs()
    inputs.pop("behaviors")
    torch.testing.assert_close(rebuilt(**inputs), model(**inputs))


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_serving_ranker_exports_every_variant_with_parity(name: str, tmp_path) -> None:
    """Each switch exports with a dynamic batch, behaviours as an input where the model uses them."""
    import onnx

    from nimbleml.runtime.export import export_onnx, parity

    model = _variant(name)
    keep = ["history", "candidates"] + (["behaviors"] if model.config.use_behavior else [])
    inputs = {k: v for k, v in _inputs(2).items() if k in keep}
    path = export_onnx(ServingRanker(model), inputs, tmp_path / f"{name}.onnx")
    assert [i.name for i in onnx.load(str(path)).graph.input] == keep
    report = parity(ServingRanker(model), path, {k: v for k, v in _inputs(7).items() if k in keep})
    assert report.max_abs_diff < 1e-4 and report.top10_overlap == 1.0


def test_mixture_scores_are_log_probabilities_split_by_the_gate() -> None:
    """Scores are log P(item): they sum to 1 over the catalogue, the history items' share is
    P(repeat) = sigmoid(gate), a row without history is all explore, and the ranking among the
    items outside the history is the tied dot products' (the explore softmax)."""
    model = _variant("mixture")
    with torch.no_grad():
        model.repeat_gate.bias.fill_(0.7)
        history = torch.tensor([[0, 0, 5, 9, 5, 3, 9, 9, 1, 2, 2, 7], [0] * 12, [0] * 11 + [4]])
        scores = model.score_all(history)
        probs = scores.exp()
        torch.testing.assert_close(probs.sum(-1), torch.ones(3))
        state = model.last_state(history)
        _, _, _, share = model.history_columns(history)
        gate = torch.sigmoid(model.repeat_gate(state).squeeze(-1) + model.repeat_share_weight * share)
        torch.testing.assert_close(probs[0, [1, 2, 3, 5, 7, 9]].sum(), gate[0])
        torch.testing.assert_close(probs[2, 4], gate[2])
        assert torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
        others = torch.tensor([i for i in range(1, N_ITEMS + 1) if i not in (1, 2, 3, 5, 7, 9)])
        dots = (state @ model.item_emb.weight.T)[0, others]
        torch.testing.assert_close(scores[0, others] - scores[0, others].max(), dots - dots.max())
        torch.testing.assert_close(scores[1, 1:], torch.log_softmax(state[1] @ model.item_emb.weight[1:].T, -1))


def test_mixture_config_checks() -> None:
    with pytest.raises(ValueError, match="repeat_mode"):
        SeqRecConfig.small(N_ITEMS, repeat_mode="copy")
    with pytest.raises(ValueError, match="mixture"):
        SeqRecConfig.small(N_ITEMS, repeat_mode="mixture")  # no repeat_scores
    with pytest.raises(ValueError, match="mixture"):
        SeqRecConfig.small(N_ITEMS, repeat_scores=True, exclude_history=True, repeat_mode="mixture")
