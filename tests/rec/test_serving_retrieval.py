"""Recommend without candidates for the bundles that used to need them: an int8 ranker (a
compressed folder) and a repeat-score ranker. Both retrieve with their float user state and
rank with the ranker graph only; the repeat-score one puts the user's most recent distinct
items first. In process (no HTTP server): the Service behind an ASGI client."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from nimbleml.rec.model import SeqRec, SeqRecConfig
from nimbleml.rec.serving import RECENT_FIRST, prepare_bundle
from nimbleml.rec.train import save_checkpoint
from nimbleml.runtime.backends import get_backend
from nimbleml.serve.bundle import Bundle
from nimbleml.serve.bundle import recent_distinct

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")

N_ITEMS = 300
KEY = "k-standard"


def _model(folder: Path, **extra) -> Path:
    torch.manual_seed(0)
    model = SeqRec(SeqRecConfig.small(N_ITEMS, max_len=100, **extra)).eval()
    if extra.get("repeat_scores"):
        with torch.no_grad():
            model.repeat_recency.weight.normal_()
    return save_checkpoint(model, {}, folder)


def _serve(bundle_dir: Path, body: dict) -> dict:
    """One Recommend through a Service that runs its graphs in process."""
    from nimbleml.serve.app import build_app
    from nimbleml.serve.keys import KeyRing, parse_env
    from nimbleml.serve.router import PoolConfig
    from nimbleml.serve.service import ServeConfig, Service

    async def main() -> dict:
        service = Service(Bundle.load(bundle_dir), KeyRing(parse_env(f"{KEY}=standard"), {"free", "standard", "premium"}),
                          ServeConfig(pool=PoolConfig(workers=0)))
        await service.start()
        try:
            transport = httpx.ASGITransport(app=build_app(service))
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
                answer = await client.post("/v1/recommend", json=body, headers={"x-api-key": KEY})
                assert answer.status_code == 200, answer.text
                return answer.json()
        finally:
            await service.close()

    return asyncio.run(main())


def _ranker_scores(bundle: Bundle, history: list[int], candidates: list[int]) -> np.ndarray:
    row = np.zeros((1, 100), dtype=np.int64)
    row[0, -len(history):] = history
    runner = get_backend("onnxruntime").load(bundle.graph_path("ranker"))
    return runner.predict({"history": row, "candidates": np.asarray([candidates], dtype=np.int64)})[0]


def test_recent_distinct_is_newest_first_without_repeats_or_padding() -> None:
    history = np.array([0, 0, 5, 7, 5, 9, 7, 7])
    assert recent_distinct(history, 10).tolist() == [7, 9, 5]
    assert recent_distinct(history, 2).tolist() == [7, 9]
    assert recent_distinct(history, 0).tolist() == []


def test_a_repeat_score_bundle_retrieves_its_recent_items_first(tmp_path: Path) -> None:
    folder = _model(tmp_path / "repeat", repeat_scores=True, repeat_counts=True, repeat_decay=True)
    bundle = Bundle.load(prepare_bundle(folder, tmp_path / "bundle"))
    assert "state" in bundle.graphs and bundle.item_table is None  # retrieval yes, cached scores no
    assert bundle.retrieval is not None and bundle.retrieval.recent_first == RECENT_FIRST
    rng = np.random.default_rng(3)
    history = rng.integers(1, 40, 80).tolist()  # 80 events over 39 items: plenty of repeats
    answer = _serve(bundle.folder, {"history": history})
    items = [i["item"] for i in answer["items"]]
    assert answer["path"] == "retrieved" and len(items) == 50 == len(set(items))
    recent = recent_distinct(np.asarray(history), RECENT_FIRST).tolist()
    assert set(recent) <= set(items)  # every recent item was a candidate, whatever its score
    # the scores are the ranker graph's (bonus included) on exactly these candidates
    expected = _ranker_scores(bundle, history, items)
    np.testing.assert_allclose([i["score"] for i in answer["items"]], expected, rtol=1e-5, atol=1e-5)


def test_an_int8_bundle_retrieves_and_ranks_with_the_int8_graph(tmp_path: Path) -> None:
    from nimbleml.compress.quantize import quantize_dynamic_onnx
    from nimbleml.rec.compression import export_serving
    from nimbleml.rec.train import load_checkpoint

    parent = _model(tmp_path / "fp32", exclude_history=True)
    child = tmp_path / "int8"
    shutil.copytree(parent, child)
    export_serving(load_checkpoint(parent), tmp_path / "fp32.onnx")
    quantize_dynamic_onnx(tmp_path / "fp32.onnx", child / "model.onnx")
    bundle = Bundle.load(prepare_bundle(child, tmp_path / "bundle"))
    assert "state" in bundle.graphs and bundle.item_table is None and bundle.retrieval.recent_first == 0
    history = np.random.default_rng(4).choice(np.arange(1, N_ITEMS + 1), 30, replace=False).tolist()
    answer = _serve(bundle.folder, {"history": history})
    items = [i["item"] for i in answer["items"]]
    assert answer["path"] == "retrieved" and len(items) == 50 and not set(items) & set(history)
    int8 = _ranker_scores(bundle, history, items)
    np.testing.assert_allclose([i["score"] for i in answer["items"]], int8, rtol=1e-5, atol=1e-5)
    fp32 = get_backend("onnxruntime").load(tmp_path / "fp32.onnx")
    row = np.zeros((1, 100), dtype=np.int64)
    row[0, -len(history):] = history
    float_scores = fp32.predict({"history": row, "candidates": np.asarray([items])})[0]
    assert not np.allclose(int8, float_scores, atol=1e-6)  # the answer came from the int8 graph
