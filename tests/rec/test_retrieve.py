"""Retrieval: ANN recall against exact search, exclusion, retrieve -> rank = full ranking, index files."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from nimbleml.errors import NimbleError
from nimbleml.rec import commands, retrieve
from nimbleml.rec.evaluate import SeqRecScorer
from nimbleml.rec.model import SeqRec, SeqRecConfig
from nimbleml.rec.retrieve import (
    BuildOverBudget,
    ExactIndex,
    IndexSpec,
    ItemIndex,
    item_table,
    recommend,
    user_states,
)
from nimbleml.rec.train import save_checkpoint


def random_table(n_items: int, dim: int, seed: int = 0) -> np.ndarray:
    """Clustered vectors like learnt embeddings (row 0 = padding)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(32, dim))
    table = centres[rng.integers(0, 32, n_items + 1)] + 0.5 * rng.normal(size=(n_items + 1, dim))
    table[0] = 0.0
    return table.astype(np.float32)


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))


def test_exact_index_is_a_matmul_top_k() -> None:
    table = random_table(500, 8)
    states = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    ids, scores = ExactIndex(table).search(states, 20)
    full = states @ table[1:].T
    np.testing.assert_array_equal(ids, np.argsort(-full, axis=1)[:, :20] + 1)
    np.testing.assert_allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :20], rtol=1e-5)


@pytest.mark.parametrize(("factory", "search"), [("HNSW32,Flat", {"efSearch": 128}), ("IVF64,Flat", {"nprobe": 16})])
def test_ann_recall_against_exact(factory: str, search: dict) -> None:
    table = random_table(5000, 16)
    states = np.random.default_rng(2).normal(size=(64, 16)).astype(np.float32)
    exact, _ = ExactIndex(table).search(states, 50)
    approx, _ = ItemIndex.build(table, IndexSpec(factory, search)).search(states, 50)
    assert recall(approx, exact) >= 0.9


def test_exact_search_in_blocks_of_users_gives_the_same_answer(monkeypatch) -> None:
    table = random_table(1000, 8)
    states = np.random.default_rng(6).normal(size=(10, 8)).astype(np.float32)
    exclude = [np.array([1, 2, 3])] * 10
    whole = ExactIndex(table).search(states, 20, exclude)
    monkeypatch.setattr(retrieve, "SCORE_BLOCK_BYTES", 3 * 4 * 1001)  # three users at a time
    blocks = ExactIndex(table).search(states, 20, exclude)
    np.testing.assert_array_equal(whole[0], blocks[0])
    np.testing.assert_allclose(whole[1], blocks[1], rtol=1e-5)  # BLAS may sum in another order


def test_items_added_to_a_built_index_are_found() -> None:
    table = random_table(2000, 16)
    states = np.random.default_rng(7).normal(size=(8, 16)).astype(np.float32)
    index = ItemIndex.build(table[:-200], IndexSpec("Flat", {}))
    assert index.n_items == 1800
    assert index.add(table[-200:]) >= 0.0 and index.n_items == 2000
    np.testing.assert_array_equal(index.search(states, 50)[0], ExactIndex(table).search(states, 50)[0])


def test_a_build_over_its_time_limit_says_how_far_it_got() -> None:
    with pytest.raises(BuildOverBudget, match="added 100 of 2,000 items") as caught:
        ItemIndex.build(random_table(2000, 16), IndexSpec("HNSW32,Flat"), time_limit_s=0.0, block=100)
    assert caught.value.projected_s >= caught.value.elapsed_s


def test_excluded_items_are_never_returned() -> None:
    table = random_table(2000, 16)
    states = np.random.default_rng(3).normal(size=(16, 16)).astype(np.float32)
    exact, _ = ExactIndex(table).search(states, 50)
    exclude = [row[:30] for row in exact]  # the 30 best items of every user are "seen"
    for index in (ExactIndex(table), ItemIndex.build(table)):
        ids, scores = index.search(states, 50, exclude)
        assert ids.shape == (16, 50) and (ids > 0).all() and np.isfinite(scores).all()
        assert not any(np.isin(ids[u], exclude[u]).any() for u in range(16))


def tiny_model(n_items: int = 300, exclude_history: bool = False) -> SeqRec:
    torch.manual_seed(0)
    return SeqRec(SeqRecConfig.small(n_items, exclude_history=exclude_history)).eval()


@pytest.mark.parametrize("exclude_history", [False, True])
def test_retrieve_then_rank_equals_full_ranking_when_m_is_the_catalogue(exclude_history: bool) -> None:
    model = tiny_model(exclude_history=exclude_history)
    history = np.random.default_rng(4).integers(0, 301, size=(8, 50))
    full = SeqRecScorer(model).score_all(history)
    full[:, 0] = -np.inf
    expected = np.argsort(-full, axis=1, kind="stable")[:, :10]
    for index in (ExactIndex(item_table(model)), ItemIndex.build(item_table(model), IndexSpec(search={"efSearch": 400}))):
        got = recommend(model, index, history, k=10, n_candidates=300)
        for u, rec in enumerate(got):
            np.testing.assert_array_equal(rec.items, expected[u])
            np.testing.assert_allclose(rec.scores, full[u, expected[u]], rtol=1e-4)
            if exclude_history:
                assert not set(rec.items) & set(history[u][history[u] > 0].tolist())


def test_user_states_are_the_ranker_last_state() -> None:
    model = tiny_model()
    history = np.random.default_rng(5).integers(0, 301, size=(3, 50))
    with torch.no_grad():
        np.testing.assert_allclose(user_states(model, history), model.last_state(torch.as_tensor(history)).numpy())


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_index_and_recommend_commands_and_a_stale_index(tmp_path, capsys) -> None:
    model = tiny_model()
    save_checkpoint(model, {}, tmp_path)
    args = parse(["rec", "recommend", "--model", str(tmp_path), "--history", "12 7 93"])
    with pytest.raises(NimbleError, match="item index not found"):
        args.func(args)
    index_args = parse(["rec", "index", "--model", str(tmp_path), "--search", "efSearch=64"])
    assert index_args.func(index_args) == 0
    meta = json.loads((tmp_path / "item_index.json").read_text())
    assert meta["spec"] == {"factory": "HNSW32,Flat", "search": {"efSearch": 64.0}, "threads": 1,
                            "train_points": 100_000, "kmeans_iters": 10}
    capsys.readouterr()
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    shown = json.loads(printed[printed.index("{") :])
    assert len(shown["items"]) == 10 and shown["scores"] == sorted(shown["scores"], reverse=True)
    # the weights change (re-trained) but the old index stays: one clear error, not wrong items
    with torch.no_grad():
        model.item_emb.weight[5] += 1.0
    save_checkpoint(model, {}, tmp_path)
    with pytest.raises(NimbleError, match="does not match the model"):
        ItemIndex.load(tmp_path)
    (tmp_path / "item_index.faiss").write_bytes(b"not an index")
    with pytest.raises(NimbleError, match="unreadable item index"):
        ItemIndex.load(tmp_path)
    bad = parse(["rec", "recommend", "--model", str(tmp_path), "--history", "12 x"])
    with pytest.raises(NimbleError, match="not a list of item ids"):
        bad.func(bad)


def test_recommend_passes_behaviours_to_a_behaviour_model(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = SeqRec(SeqRecConfig.small(300, use_behavior=True)).eval()
    save_checkpoint(model, {}, tmp_path)
    ItemIndex.build(item_table(model)).save(tmp_path)
    for extra in ([], ["--behaviors", "1 2 4"]):
        args = parse(["rec", "recommend", "--model", str(tmp_path), "--history", "12 7 93", *extra])
        assert args.func(args) == 0
    bad = parse(["rec", "recommend", "--model", str(tmp_path), "--history", "12 7 93", "--behaviors", "1 2"])
    with pytest.raises(NimbleError, match="one code per"):
        bad.func(bad)
