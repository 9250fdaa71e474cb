"""Recommender -> serving bundle: a trained model folder becomes what `nimbleml serve` loads.

The bundle holds three things exported from one checkpoint: the ranker graph (history +
50 candidates -> 50 scores: the full forward, serving-shaped by ``ServingRanker``), the
user-state graph (history -> (D,) state, run in the background when a click arrives) and the
item-embedding table (float32 (n_items + 1, D)), so a known user's Recommend is its cached
state against 50 rows of the table. Input specs carry the valid id ranges, so the server rejects unknown item ids with
a 4xx without knowing what an item is. Beside the table goes a faiss index over it (the model
folder's own from ``nimbleml rec index``, or one built here), so a Recommend without
candidates retrieves the user's top 50 from the whole catalogue and ranks them.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nimbleml.errors import NimbleError
from nimbleml.rec.compression import HISTORY_WIDTH, SEQUENCE_DIMS, export_serving
from nimbleml.rec.model import SeqRec, SeqRecConfig
from nimbleml.rec.retrieve import INDEX_FILE, INDEX_META_FILE, IndexSpec, ItemIndex, item_table
from nimbleml.rec.train import MODEL_FILE, load_checkpoint
from nimbleml.runtime.export import check_onnx_file, export_onnx, has_dynamic_axis
from nimbleml.serve.bundle import MANIFEST, Bundle, GraphSpec, InputSpec, RetrievalSpec

log = logging.getLogger(__name__)

N_CANDIDATES = 50  # the serving contract: re-rank 50 candidates
BUNDLE_DIR = "serving"  # the bundle goes into this folder inside the model folder by default
COMPRESSED_ONNX = "model.onnx"  # an int8 recipe's serving graph (helper C's compressed folders)
EXACT_SEARCH_ITEMS = 50_000  # a folder without an index gets an exact one up to this many items, HNSW above
# a repeat-score model's retrieval: this many most recent distinct history items lead the candidates
# (on the Taobao head, 20 first brought two-stage NDCG@10 to 0.1360 against full ranking's 0.1343, where the
# index alone gave 0.008; docs/retrieval.md)
RECENT_FIRST = 20


class UserState(nn.Module):
    """history (B, 100) [+ behaviors (B, 100)] -> (B, D): the state a cached Recommend scores with.

    The same computation as :class:`ServingRanker` up to its scoring step (the last block runs
    for the last query only), so cached and full scores agree to float rounding."""

    def __init__(self, model: SeqRec):
        super().__init__()
        self.model = model

    def forward(self, history: torch.Tensor, behaviors: torch.Tensor | None = None) -> torch.Tensor:
        model = self.model
        x, allowed = model.embed(history, behaviors)
        for block in model.blocks[:-1]:
            x, _ = block(x, allowed)
        x, _ = model.blocks[-1](x, allowed, n_queries=1)
        return model.ln_final(x[:, 0])


def model_version(model_dir: Path) -> str:
    """``<folder name>-<first 8 hex of the weights' sha256>``: changes whenever the weights do."""
    weights = model_dir / MODEL_FILE
    if not weights.is_file():
        weights = model_dir / COMPRESSED_ONNX
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:8]
    return f"{model_dir.resolve().name}-{digest}"


def _specs(config: SeqRecConfig, names: list[str], graph: Path) -> list[InputSpec]:
    trim = has_dynamic_axis(graph, "history", 1)  # int8 graphs made before the axis was dynamic: no
    every = {
        "history": InputSpec("history", "int64", [HISTORY_WIDTH], low=1, high=config.n_items, pad=0, trim=trim),
        "candidates": InputSpec("candidates", "int64", [N_CANDIDATES], low=1, high=config.n_items),
        "behaviors": InputSpec("behaviors", "int64", [HISTORY_WIDTH], low=1, high=config.n_behaviors - 1, pad=0,
                               trim=trim),
    }
    return [every[name] for name in names]


def _item_index(model_dir: Path, model: SeqRec) -> ItemIndex:
    """The model folder's own index (checked against its weights: one NimbleError if stale), else a new one."""
    if (model_dir / INDEX_FILE).is_file():
        return ItemIndex.load(model_dir, model)
    spec = IndexSpec(factory="Flat", search={}) if model.config.n_items <= EXACT_SEARCH_ITEMS else IndexSpec()
    log.info("no %s in %s: building %s for serving", INDEX_FILE, model_dir, spec.factory)
    return ItemIndex.build(item_table(model), spec)


def _reusable(bundle: Bundle, version: str, model_dir: Path) -> bool:
    """Same weights, a state graph and a retrieval index (the model folder's own where it has one)."""
    if bundle.version != version or "state" not in bundle.graphs:
        return False  # every bundle now carries the state graph and an index: one made before is rebuilt
    own, copied = model_dir / INDEX_META_FILE, bundle.folder / INDEX_META_FILE
    return bundle.retrieval is not None and (
        not own.is_file() or (copied.is_file() and own.read_text() == copied.read_text()))


def prepare_bundle(model_dir: str | Path, out_dir: str | Path | None = None, force: bool = False) -> Path:
    """Export ``model_dir`` (config.json + model.safetensors, or a compressed folder) to a serving
    bundle; returns its folder. Re-uses a bundle already there for the same weights unless ``force``.

    Every bundle gets the user-state graph and an item index, so that Recommend without
    candidates retrieves. The cached-scores path (the item table, scoring a cached state) is
    left out where it could not match the ranker: an int8 graph (its scores are the int8
    graph's, not the float state's), or a model with repeat scores (their bonus needs the
    per-item recency, which the front end does not compute). Such a model retrieves its user's
    ``RECENT_FIRST`` most recent distinct items first, then the index's: the inner product the
    index searches never sees the repeat bonus."""
    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir is not None else model_dir / BUNDLE_DIR
    compressed = model_dir / COMPRESSED_ONNX
    model = load_checkpoint(model_dir)  # NimbleError naming the file when missing or broken
    config = model.config
    version = model_version(model_dir)
    if not force and (out / MANIFEST).is_file():
        try:
            if _reusable(Bundle.load(out), version, model_dir):
                return out
        except NimbleError:
            log.warning("rebuilding the broken bundle in %s", out)
    cached_scores = not config.repeat_scores and not compressed.is_file()
    index = _item_index(model_dir, model)  # a stale index fails before the exports
    out.mkdir(parents=True, exist_ok=True)
    ranker_names = ["history", "candidates"] + (["behaviors"] if config.use_behavior else [])
    if compressed.is_file():  # an int8 recipe already wrote the serving graph: serve that one
        shutil.copyfile(check_onnx_file(compressed), out / "ranker.onnx")
    else:
        export_serving(model, out / "ranker.onnx")
    graphs = {"ranker": GraphSpec("ranker.onnx", _specs(config, ranker_names, out / "ranker.onnx"), "scores")}
    state_names = [n for n in ranker_names if n != "candidates"]
    ones = torch.ones((2, HISTORY_WIDTH), dtype=torch.int64)
    export_onnx(UserState(model).eval(), {n: ones for n in state_names}, out / "state.onnx", output_names=["state"],
                dynamic_dims=SEQUENCE_DIMS)
    graphs["state"] = GraphSpec("state.onnx", _specs(config, state_names, out / "state.onnx"), "state")
    table = None
    (out / "items.npy").unlink(missing_ok=True)  # a bundle rebuilt without the cached path must not keep one
    if cached_scores:
        np.save(out / "items.npy", item_table(model))
        table = "items.npy"
    recent = RECENT_FIRST if config.repeat_scores and not config.exclude_history else 0
    retrieval = RetrievalSpec(index.save(out).name, dict(index.spec.search), first_id=1, recent_first=recent)
    bundle = Bundle(
        version=version, operation="recommend", graphs=graphs, item_table=table,
        exclude_history=config.exclude_history, retrieval=retrieval,
        extra={"n_items": config.n_items, "use_behavior": config.use_behavior, "source": str(model_dir.resolve())},
    )
    bundle.save(out)
    log.info("serving bundle %s in %s", version, out)
    return out
