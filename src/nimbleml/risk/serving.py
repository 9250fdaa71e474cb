"""Risk forecaster -> serving bundle: a fitted CNN folder becomes the server's ``Risk`` operation.

The served graph takes what a client has, the asset's recent feature window ``(features,
days)`` (scaled as at training) and its asset class, and returns the forecast volatility
(daily fraction): image encoding, the CNN, the target transform and the calibration are one
ONNX graph, so a worker needs no risk code. Only the paper's heat-map encoder is expressible
as graph ops here (the GAF/MTF/recurrence encoders run in pyts), so other encoders are
refused with a message.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nimbleml.errors import NimbleError
from nimbleml.risk.cnn import CNNForecaster
from nimbleml.risk.samples import ASSET_CLASSES
from nimbleml.runtime.export import export_onnx
from nimbleml.serve.bundle import MANIFEST, Bundle, GraphSpec, InputSpec

log = logging.getLogger(__name__)

BUNDLE_DIR = "serving"


def is_risk_model(folder: Path) -> bool:
    return (Path(folder) / "forecaster.json").is_file()


class ServedForecaster(nn.Module):
    """window (B, F, W) float32 + asset_class (B,) int64 -> (B,) forecast volatility, daily fraction.

    The heat-map encoding is written again in torch ops (the encoder's own code is numpy) so
    it exports; ``prepare_risk_bundle`` checks both agree on a sample before writing.
    """

    def __init__(self, forecaster: CNNForecaster):
        super().__init__()
        self.net = forecaster.model_.float().to(memory_format=torch.contiguous_format)
        encoder, transform = forecaster.encoder, forecaster.transform_
        self.days = encoder.days
        self.rescale = encoder.per_window_rescale
        self.size = encoder.image_size
        self.mode = "nearest-exact" if encoder.resize == "nearest" else "bilinear"
        self.kind = transform.kind
        self.mean, self.std = transform.mean, transform.std
        # the client sends the class, not the asset: floor at the class's lowest asset floor
        self.register_buffer("floor", torch.as_tensor(forecaster.floor_.by_class, dtype=torch.float32))
        # one variance factor per asset class (all equal unless fitted with calibrate_by="class")
        self.register_buffer("calibration", torch.as_tensor(forecaster.class_calibration_, dtype=torch.float32))

    def images(self, window: torch.Tensor) -> torch.Tensor:
        x = window[:, :, -self.days:] if self.days else window
        if self.rescale:
            lo = x.amin(dim=2, keepdim=True)
            span = x.amax(dim=2, keepdim=True) - lo
            x = torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))
        x = x.unsqueeze(1)
        if x.shape[2] <= self.size and x.shape[3] <= self.size:
            if self.mode == "bilinear":
                return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=True)
            return F.interpolate(x, size=(self.size, self.size), mode="nearest-exact")
        return F.adaptive_avg_pool2d(x, (self.size, self.size))

    def forward(self, window: torch.Tensor, asset_class: torch.Tensor) -> torch.Tensor:
        raw = self.net(self.images(window), asset_class).float() * self.std + self.mean
        if self.kind in ("log_var", "qlike"):
            variance = torch.exp(raw)
        elif self.kind == "vol":
            variance = torch.clamp(raw, min=0.0) ** 2
        else:
            variance = raw
        floor = self.floor[asset_class]
        return torch.sqrt(torch.maximum(self.calibration[asset_class] * torch.maximum(variance, floor), floor))


def prepare_risk_bundle(model_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Export a ``CNNForecaster.save`` folder as a ``risk`` bundle; returns its folder."""
    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir is not None else model_dir / BUNDLE_DIR
    forecaster = CNNForecaster.load(model_dir, device="cpu")
    if forecaster.encoder.name != "heatmap":
        raise NimbleError(f"serving supports the heatmap encoder, this model uses {forecaster.encoder.name!r}",
                          path=model_dir / "forecaster.json", fix="train the served model with the heatmap encoder")
    # weights and forecaster.json (target transform, calibration factors) both shape the served graph
    digest = hashlib.sha256((model_dir / "model.safetensors").read_bytes() + (model_dir / "forecaster.json").read_bytes())
    version = f"{model_dir.resolve().name}-{digest.hexdigest()[:8]}"
    if (out / MANIFEST).is_file() and Bundle.load(out).version == version:
        return out
    module = ServedForecaster(forecaster).eval()
    n_features, window_len = forecaster.window_shape_
    generator = torch.Generator().manual_seed(0)
    example = {"window": torch.rand(4, n_features, window_len, generator=generator),
               "asset_class": torch.arange(4, dtype=torch.int64) % forecaster.config_.n_classes}
    reference = forecaster.encoder.encode(example["window"].numpy())
    mine = module.images(example["window"]).numpy()
    if reference.shape != mine.shape or abs(reference - mine).max() > 1e-5:
        raise NimbleError("the served heat-map encoding disagrees with the encoder", path=model_dir,
                          fix="report this: risk/serving.py must follow risk/imaging.py")
    export_onnx(module, example, out / "forecast.onnx", output_names=["volatility"])
    bundle = Bundle(
        version=version,
        operation="risk",
        graphs={"forecast": GraphSpec("forecast.onnx", [
            InputSpec("window", "float32", [n_features, window_len]),
            InputSpec("asset_class", "int64", [], low=0, high=forecaster.config_.n_classes - 1),
        ], "volatility")},
        extra={"asset_classes": list(ASSET_CLASSES)[: forecaster.config_.n_classes], "target": forecaster.target,
               "source": str(model_dir.resolve())},
    )
    bundle.save(out)
    log.info("risk serving bundle %s in %s", version, out)
    return out
