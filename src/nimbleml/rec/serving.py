"""Recommender -> serving bundle: a trained model folder becomes what `nimbleml serve` loads.

The bundle holds three things exported from one checkpoint: the ranker graph (history +
50 candidates -> 50 scores, the full forward), the user-state graph (history -> (D,) state,
run in the background when a click arrives) and the item-embedding table (float32
(n_items + 1, D)), so a known user's Recommend is its cached state against 50 rows of the
table. Input specs carry the valid id ranges, so the server rejects unknown item ids with
a 4xx without knowing what an item is.
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
from nimbleml.rec.model import SeqRec
from nimbleml.rec.train import MODEL_FILE, load_checkpoint
from nimbleml.runtime.export import check_onnx_file, export_onnx
from nimbleml.serve.bundle import MANIFEST, Bundle, GraphSpec, InputSpec

log = logging.getLogger(__name__)

N_CANDIDATES = 50  # the serving contract: re-rank 50 candidates
BUNDLE_DIR = "serving"  # the bundle goes into this folder inside the model folder by default
COMPRESSED_ONNX = "model.onnx"  # an int8 recipe's ranker (helper C's compressed folders)


class UserState(nn.Module):
    """history (B, L) [+ behaviors (B, L)] -> (B, D): the state a cached Recommend scores with."""

    def __init__(self, model: SeqRec):
        super().__init__()
        self.model = model

    def forward(self, history: torch.Tensor, behaviors: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.last_state(history, behaviors)


def model_version(model_dir: Path) -> str:
    """``<folder name>-<first 8 hex of the weights' sha256>``: changes whenever the weights do."""
    digest = hashlib.sha256((model_dir / MODEL_FILE).read_bytes()).hexdigest()[:8]
    return f"{model_dir.resolve().name}-{digest}"


def _example(model: SeqRec, batch: int = 2) -> dict[str, torch.Tensor]:
    cfg = model.config
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "history": torch.randint(1, cfg.n_items + 1, (batch, cfg.max_len), generator=generator),
        "candidates": torch.randint(1, cfg.n_items + 1, (batch, N_CANDIDATES), generator=generator),
    }
    if cfg.use_behavior:
        inputs["behaviors"] = torch.randint(1, cfg.n_behaviors, (batch, cfg.max_len), generator=generator)
    return inputs


def _specs(model: SeqRec, names: list[str]) -> list[InputSpec]:
    cfg = model.config
    every = {
        "history": InputSpec("history", "int64", [cfg.max_len], low=1, high=cfg.n_items, pad=0),
        "candidates": InputSpec("candidates", "int64", [N_CANDIDATES], low=1, high=cfg.n_items),
        "behaviors": InputSpec("behaviors", "int64", [cfg.max_len], low=1, high=cfg.n_behaviors - 1, pad=0),
    }
    return [every[name] for name in names]


def prepare_bundle(model_dir: str | Path, out_dir: str | Path | None = None, force: bool = False) -> Path:
    """Export ``model_dir`` (config.json + model.safetensors) to a serving bundle; returns its folder.

    Re-uses a bundle already there for the same weights unless ``force``.
    """
    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir is not None else model_dir / BUNDLE_DIR
    model = load_checkpoint(model_dir)  # NimbleError naming the file when missing or broken
    version = model_version(model_dir)
    if not force and (out / MANIFEST).is_file():
        try:
            if Bundle.load(out).version == version:
                return out
        except NimbleError:
            log.warning("rebuilding the broken bundle in %s", out)
    out.mkdir(parents=True, exist_ok=True)
    example = _example(model)
    ranker_names = list(example)
    compressed = model_dir / COMPRESSED_ONNX
    if compressed.is_file():  # an int8 recipe already wrote the ranker graph: serve that one
        shutil.copyfile(check_onnx_file(compressed), out / "ranker.onnx")
    else:
        export_onnx(model, example, out / "ranker.onnx")
    state_names = [n for n in ranker_names if n != "candidates"]
    export_onnx(UserState(model), {n: example[n] for n in state_names}, out / "state.onnx", output_names=["state"])
    np.save(out / "items.npy", model.item_emb.weight.detach().float().numpy())
    bundle = Bundle(
        version=version,
        operation="recommend",
        graphs={
            "ranker": GraphSpec("ranker.onnx", _specs(model, ranker_names), "scores"),
            "state": GraphSpec("state.onnx", _specs(model, state_names), "state"),
        },
        item_table="items.npy",
        exclude_history=model.config.exclude_history,
        extra={"n_items": model.config.n_items, "use_behavior": model.config.use_behavior,
               "source": str(model_dir.resolve())},
    )
    bundle.save(out)
    log.info("serving bundle %s in %s", version, out)
    return out
