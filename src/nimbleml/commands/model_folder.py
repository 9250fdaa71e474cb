"""Open any nimbleml model folder as a torch module plus what the runtimes need to run it.

Two kinds of folder exist: a recommender (``config.json`` + ``model.safetensors``, from
``nimbleml rec train`` or ``nimbleml compress``; int8 variants also hold ``model.onnx``) and a
risk CNN (``forecaster.json`` + ``model.safetensors``, ``risk evaluate --out DIR`` → ``DIR/model``).
This is the one place that knows both; ``runtime`` and ``bench`` only see modules and arrays.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nimbleml.errors import NimbleError

N_CANDIDATES = 50  # the serving contract: re-rank 50 candidates per request
HISTORY_LEN = 100  # ...given the user's last 100 events (a model with a shorter window keeps its last max_len)


@dataclass
class ModelFolder:
    """A loaded model folder.

    module: the serving-shaped module the runtimes export and run (for the recommender, the
    last-position ranker); reference: the full forward it must match (``SeqRec.forward``).
    make_inputs(batch, seed) -> name -> int64/float32 tensor with random but valid values.
    onnx: a graph shipped in the folder (int8 variants), loaded as is instead of re-exporting.
    """

    kind: str  # "rec" | "risk"
    path: Path
    module: nn.Module
    reference: nn.Module
    make_inputs: Callable[[int, int], dict[str, torch.Tensor]]
    output_names: list[str]
    onnx: Path | None = None
    variant: dict = field(default_factory=dict)
    # export_onnx's extra dynamic axes: left-padded inputs whose axis 1 may be trimmed (runtime.padding)
    dynamic_dims: dict[str, dict[int, tuple[str, int]]] = field(default_factory=dict)

    @property
    def sequence_inputs(self) -> tuple[str, ...]:
        return tuple(self.dynamic_dims)

    @property
    def params_m(self) -> float:
        return sum(p.numel() for p in self.reference.parameters()) / 1e6


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise NimbleError(f"cannot read {path.name} ({exc})", path=path, fix="re-create the model folder") from exc


def rec_inputs(config, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random valid recommender inputs: (B, 100) left-padded history, (B, 50) candidates."""
    g = torch.Generator().manual_seed(seed)
    length = HISTORY_LEN
    history = torch.randint(1, config.n_items + 1, (batch, length), generator=g)
    pad = torch.randint(0, length // 2, (batch, 1), generator=g)
    history = history.masked_fill(torch.arange(length).unsqueeze(0) < pad, 0)
    inputs = {"history": history, "candidates": torch.randint(1, config.n_items + 1, (batch, N_CANDIDATES), generator=g)}
    if config.use_behavior:
        inputs["behaviors"] = torch.randint(1, config.n_behaviors, (batch, length), generator=g).masked_fill(history == 0, 0)
    return inputs


def _open_rec(path: Path) -> ModelFolder:
    from nimbleml.rec.compression import SEQUENCE_DIMS
    from nimbleml.rec.model import ServingRanker
    from nimbleml.rec.train import load_checkpoint

    try:
        model = load_checkpoint(path, device="cpu")
    except NimbleError:
        raise
    except Exception as exc:  # safetensors raises its own error type for a corrupt file
        raise NimbleError(f"corrupt weights ({exc})", path=path / "model.safetensors",
                          fix="re-train or re-compress the model") from exc
    variant = _read_json(path / "variant.json") if (path / "variant.json").exists() else {}
    onnx = None
    if variant.get("onnx"):
        onnx = path / variant["onnx"]
        if not onnx.is_file():
            raise NimbleError(f"variant.json names {variant['onnx']} but the file is missing", path=onnx,
                              fix="re-run `nimbleml compress` for this folder")
    return ModelFolder("rec", path, ServingRanker(model).eval(), model, lambda b, s=0: rec_inputs(model.config, b, s),
                       ["scores"], onnx, variant, dynamic_dims=SEQUENCE_DIMS)


class _RiskForward(nn.Module):
    """The risk CNN as the server runs it: images and asset class -> forecast in target units."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor, asset_class: torch.Tensor) -> torch.Tensor:
        return self.network(images, asset_class)


def _open_risk(path: Path) -> ModelFolder:
    from nimbleml.risk.cnn import CNNForecaster

    forecaster = CNNForecaster.load(path, device="cpu")
    network = forecaster.model_.float().eval()
    cfg = network.config

    def make_inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"images": torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g),
                "asset_class": torch.randint(0, cfg.n_classes, (batch,), generator=g)}

    module = _RiskForward(network).eval()
    return ModelFolder("risk", path, module, module, make_inputs, ["forecast"])


def open_model_folder(path: str | Path) -> ModelFolder:
    """Load a recommender or risk model folder; one NimbleError naming the file when broken."""
    path = Path(path)
    if not path.is_dir():
        raise NimbleError("model folder not found", path=path,
                          fix="pass a folder written by `nimbleml rec train`, `nimbleml compress` or `risk evaluate` (DIR/model)")
    if (path / "forecaster.json").exists():
        return _open_risk(path)
    if (path / "config.json").exists():
        return _open_rec(path)
    if (path / "model").is_dir():
        return open_model_folder(path / "model")
    raise NimbleError("not a model folder (no config.json or forecaster.json)", path=path,
                      fix="pass a folder written by `nimbleml rec train`, `nimbleml compress` or `nimbleml risk evaluate`")


def to_numpy(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in inputs.items()}
