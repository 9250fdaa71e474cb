"""The paper's CNN (Hu et al., section 5.1.1 and 5.3.1) and its configuration.

Five 'same'-padded convolutions with ReLU, each followed by max pooling while the feature
map is still at least 2 pixels wide; the flattened map is joined with an embedding of the
asset class and fed through two fully connected layers (128 and 64 units, dropout) to one
output: the forecast in the forecaster's target units (e.g. standardised log variance).
With ``linear_skip`` (our addition, on by default) a linear read-out of the image is added
to that output; ``linear_skip=False`` is the paper's network exactly.
Training lives in ``nimbleml.risk.cnn``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nimbleml.risk.samples import ASSET_CLASSES


@dataclass
class RiskCNNConfig:
    """Architecture and training settings; defaults are the paper's where it gives them."""

    in_channels: int = 1  # image channels; 1 for the paper's heat map (the forecaster sets it from the encoder)
    image_size: int = 32  # input side in pixels; the paper's 32x32
    n_conv: int = 5  # paper: 5 convolutional layers
    filters: int = 64  # paper: 64 filters per layer
    kernel: int = 3  # paper: 3x3 kernels ('same' padding is ours, so 5 poolings fit in 32x32)
    pool: int = 2  # paper: 2x2 max pooling, after every convolution while the map is >= 2 wide
    batch_norm: bool = False  # not in the paper; BatchNorm after each convolution when True
    dropout: float = 0.5  # paper: dropout 0.5 (ours: after each fully connected layer)
    fc: tuple[int, ...] = (128, 64)  # paper: 2 fully connected layers of 128 and 64 units
    n_classes: int = len(ASSET_CLASSES)  # equity, bond, commodity, fx
    class_embedding_dim: int = 8  # ours: asset-class embedding joined to the flattened map; 0 = none
    linear_skip: bool = True  # ours: add a linear read-out of the raw image to the output (wide & deep); False = the paper's CNN
    lr: float = 1e-3  # paper: Adam, initial learning rate 0.001
    weight_decay: float = 1e-4  # paper: "L2 regularisation" (strength not given; ours)
    batch_size: int = 256  # not given in the paper
    max_epochs: int = 30  # not given in the paper
    patience: int = 5  # early stopping on validation QLIKE; not in the paper

    @classmethod
    def tuned(cls, **overrides: Any) -> RiskCNNConfig:
        """The paper's Bayesian-optimised values: 5x5 kernels, 3x3 pooling, learning rate 5e-4."""
        return cls(**{"kernel": 5, "pool": 3, "lr": 5e-4, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RiskCNNConfig:
        values = dict(values)
        values["fc"] = tuple(values.get("fc", cls.fc))
        return cls(**values)


class RiskCNN(nn.Module):
    """images (B, C, S, S) float32, asset_class (B,) int64 -> (B,) float32 forecast.

    Every shape is fixed at construction; ``forward`` has no data-dependent branches, so it
    traces and exports to ONNX as is.
    """

    def __init__(self, config: RiskCNNConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        channels, size = config.in_channels, config.image_size
        for _ in range(config.n_conv):
            layers.append(nn.Conv2d(channels, config.filters, config.kernel, padding="same"))
            if config.batch_norm:
                layers.append(nn.BatchNorm2d(config.filters))
            layers.append(nn.ReLU())
            if size >= 2:
                layers.append(nn.MaxPool2d(config.pool, ceil_mode=True))
                size = math.ceil(size / config.pool)
            channels = config.filters
        self.features = nn.Sequential(*layers)
        self.feature_dim = channels * size * size
        self.class_embedding = (
            nn.Embedding(config.n_classes, config.class_embedding_dim) if config.class_embedding_dim > 0 else None
        )
        width = self.feature_dim + config.class_embedding_dim
        head: list[nn.Module] = []
        for units in config.fc:
            head += [nn.Linear(width, units), nn.ReLU(), nn.Dropout(config.dropout)]
            width = units
        head.append(nn.Linear(width, 1))
        self.head = nn.Sequential(*head)
        # The wide part: a pooled linear model of the image (for the heat map, of the window's
        # log realised and range variances, i.e. a log-HAR with range terms). The convolutions
        # then only have to learn what that linear forecast misses.
        pixels = config.in_channels * config.image_size * config.image_size
        self.skip = nn.Linear(pixels, 1) if config.linear_skip else None

    def forward(self, images: torch.Tensor, asset_class: torch.Tensor) -> torch.Tensor:
        x = self.features(images).flatten(1)
        if self.class_embedding is not None:
            x = torch.cat([x, self.class_embedding(asset_class)], dim=1)
        out = self.head(x).squeeze(1)
        if self.skip is not None:
            out = out + self.skip(images.flatten(1)).squeeze(1)
        return out
