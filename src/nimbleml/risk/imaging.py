"""Window-to-image encoders: turn a (features x days) window into the CNN's input image.

The paper (Hu et al., section 5.2) turns "every 10 days of data such as price volatility and
trading volume" into a 32x32 heat map; that is ``heatmap``. The others are the usual
time-series imaging methods from the literature, computed with pyts, one image channel per
feature: ``gaf`` (Gramian angular summation field), ``mtf`` (Markov transition field) and
``recurrence`` (unthresholded recurrence plot).

Every encoder maps ``windows`` (n, n_features, window) float32 to images
(n, channels, image_size, image_size) float32, vectorised over n: the forecaster calls it
once per training batch and never materialises the images of a whole data set.

Level versus shape: the volatility level is what we forecast, so by default windows are
encoded as they are (already min-max scaled on the training period). ``gaf`` and ``mtf``
are invariant to each window's level and scale by construction (GAF rescales each row to
[-1, 1]; MTF bins each row at its own quantiles), and ``recurrence`` to its level: those
images carry the shape of the recent path, not how volatile the asset is, so by default
they get the window itself as one more (heat-map) channel (``level_channel``).
``per_window_rescale=True`` min-max scales every window row to [0, 1] before any encoder.

Adding an encoder is one subclass and one line in ``ENCODERS``.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from nimbleml.errors import NimbleError

RESIZE_MODES: tuple[str, ...] = ("nearest", "bilinear")


@dataclass(kw_only=True)
class ImageEncoder(ABC):
    """Base class: validates windows, selects the last ``days`` columns, rescales, encodes."""

    name: ClassVar[str]
    image_size: int = 32  # output side in pixels; the paper's 32x32
    days: int | None = None  # last days of the window to encode; None = the whole window
    per_window_rescale: bool = False  # min-max each window row to [0, 1] first (drops the level)
    resize: str = "nearest"  # upsampling to image_size: "nearest" (blocks) or "bilinear"

    def __post_init__(self) -> None:
        if self.image_size < 2:
            raise NimbleError(f"image_size must be >= 2, got {self.image_size}", fix="use e.g. 32")
        if self.days is not None and self.days < 2:
            raise NimbleError(f"days must be >= 2 or None, got {self.days}", fix="use e.g. 10")
        if self.resize not in RESIZE_MODES:
            raise NimbleError(
                f"unknown resize mode {self.resize!r}", fix=f"use one of {', '.join(RESIZE_MODES)}"
            )

    @abstractmethod
    def channels(self, n_features: int) -> int:
        """Number of image channels for windows with ``n_features`` rows."""

    @abstractmethod
    def _encode(self, windows: np.ndarray) -> np.ndarray:
        """(n, F, days) float32, validated -> (n, C, image_size, image_size) float32."""

    def encode(self, windows: np.ndarray) -> np.ndarray:
        """Encode windows (n, n_features, window) float -> images (n, C, S, S) float32."""
        windows = self._check(windows)
        if self.days is not None:
            windows = windows[:, :, -self.days :]
        if self.per_window_rescale:
            windows = rescale_rows(windows)
        return self._encode(np.ascontiguousarray(windows, dtype=np.float32))

    def params(self) -> dict[str, Any]:
        """The constructor keywords, for JSON; ``get_encoder(enc.name, **enc.params())`` rebuilds it."""
        return dataclasses.asdict(self)

    def _check(self, windows: np.ndarray) -> np.ndarray:
        if not isinstance(windows, np.ndarray) or windows.ndim != 3:
            shape = getattr(windows, "shape", type(windows).__name__)
            raise NimbleError(
                f"{self.name} encoder expects windows of shape (n, n_features, window), got {shape}",
                fix="pass RiskSamples.windows",
            )
        if not np.issubdtype(windows.dtype, np.floating):
            raise NimbleError(
                f"{self.name} encoder expects float windows, got dtype {windows.dtype}",
                fix="cast with windows.astype(np.float32)",
            )
        length = windows.shape[2]
        if self.days is not None and length < self.days:
            raise NimbleError(
                f"{self.name} encoder needs at least days={self.days} columns, windows have {length}",
                fix="lengthen the window or lower days",
            )
        if length < 2:
            raise NimbleError(f"windows have {length} column(s); need >= 2", fix="lengthen the window")
        if not np.isfinite(windows).all():
            bad = int((~np.isfinite(windows)).any(axis=(1, 2)).sum())
            raise NimbleError(
                f"{bad} of {len(windows)} windows hold NaN or inf",
                fix="fill or drop missing feature values before building RiskSamples",
            )
        return windows

    def _to_size(self, images: np.ndarray) -> np.ndarray:
        """Resize (n, C, h, w) to (n, C, S, S) float32: upsample with ``resize``, downsample by area."""
        size = self.image_size
        n, c, h, w = images.shape
        if (h, w) == (size, size):
            return np.ascontiguousarray(images, dtype=np.float32)
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if h <= size and w <= size:
            if self.resize == "nearest":
                x = F.interpolate(x, size=(size, size), mode="nearest-exact")
            else:
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
        elif h >= size and w >= size:
            x = F.adaptive_avg_pool2d(x, (size, size))
        else:
            raise NimbleError(
                f"{self.name} encoder cannot fit a {h}x{w} grid into {size}x{size}",
                fix="raise image_size to at least the number of features and days",
            )
        return x.numpy()


def rescale_rows(windows: np.ndarray) -> np.ndarray:
    """Min-max each (window, feature) row over its days to [0, 1]; constant rows become 0."""
    lo = windows.min(axis=2, keepdims=True)
    span = windows.max(axis=2, keepdims=True) - lo
    return ((windows - lo) / np.where(span > 0, span, 1.0)).astype(np.float32)


@dataclass(kw_only=True)
class HeatmapEncoder(ImageEncoder):
    """The paper's input: features x last 10 days as one channel, resized to 32x32.

    Rows are features, columns days (oldest left, day t right). Nearest-neighbour upsampling
    (default) turns each (feature, day) cell into a block of pixels, so values keep their
    range exactly and unrelated neighbouring features are never blended; ``resize="bilinear"``
    (align_corners=True) gives the smooth picture, still within the input's range.
    """

    name: ClassVar[str] = "heatmap"
    days: int | None = 10  # the paper: "every 10 days of data"

    def channels(self, n_features: int) -> int:
        return 1

    def _encode(self, windows: np.ndarray) -> np.ndarray:
        return self._to_size(windows[:, None, :, :])


def pyts_image() -> ModuleType:
    """``pyts.image``, imported with numba's on-disk cache switched on for its kernels.

    pyts compiles its numba kernels with explicit signatures when it is imported and does not
    ask numba to cache them: about 19 s of CPU in every process (a run's report, each tuning
    worker), 1.3 s once the cache exists. pyts offers no switch, so ``numba.njit`` is wrapped
    with ``cache=True`` for the duration of the import only. Numba keeps the cache beside the
    package or, where that is read-only, in its user cache folder, and checks it against the
    source, so a pyts upgrade recompiles.
    """
    if "pyts.image" in sys.modules:
        return sys.modules["pyts.image"]
    import numba

    plain = numba.njit

    def cached_njit(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cache", True)
        return plain(*args, **kwargs)

    numba.njit = cached_njit
    try:
        import pyts.image
    finally:
        numba.njit = plain
    return pyts.image


@dataclass(kw_only=True)
class _PytsEncoder(ImageEncoder):
    """One pyts image per feature row, computed on the (n * F, days) stack in one call, plus
    (``level_channel``) the window itself as a last heat-map channel.

    The level channel is there because these images are blind to the level: on the first 30
    assets of the shared market, GAF alone gave the CNN a test QLIKE of 1.36 (worse than every
    baseline; heat map 0.55), since a calm and a turbulent fortnight of the same shape give the
    same picture. pyts is imported on first use (see ``pyts_image``), which heat-map users
    should not pay for.
    """

    level_channel: bool = True  # append the (scaled) window as one more channel, as the heat map

    def channels(self, n_features: int) -> int:
        return n_features + int(self.level_channel)

    @abstractmethod
    def _transformer(self, length: int) -> Any:
        """The pyts transformer for rows of ``length`` days."""

    def _encode(self, windows: np.ndarray) -> np.ndarray:
        n, n_features, length = windows.shape
        rows = windows.reshape(n * n_features, length).astype(np.float64)
        images = self._transformer(length).transform(rows)
        side = images.shape[-1]
        images = self._to_size(images.reshape(n, n_features, side, side))
        if self.level_channel:
            recent = windows[:, None, :, -self.image_size :]  # a heat map holds at most image_size days
            images = np.concatenate([images, self._to_size(recent)], axis=1)
        return images


@dataclass(kw_only=True)
class GAFEncoder(_PytsEncoder):
    """Gramian angular summation field, values in [-1, 1].

    pyts rescales each row to [-1, 1] and maps it to angles, so the image is invariant to the
    row's level and scale (a constant row gives an all-ones image). Rows longer than
    image_size are shortened by PAA; shorter ones are encoded at their length and upsampled.
    """

    name: ClassVar[str] = "gaf"

    def _transformer(self, length: int) -> Any:
        return pyts_image().GramianAngularField(image_size=min(self.image_size, length), method="summation")


@dataclass(kw_only=True)
class MTFEncoder(_PytsEncoder):
    """Markov transition field, values in [0, 1].

    pyts bins each row at its own quantiles (level- and scale-invariant). A constant row has
    one occupied bin and gives an all-ones image; pyts's warning about it is silenced here.
    """

    name: ClassVar[str] = "mtf"
    n_bins: int = 4  # quantile bins per row; few, because windows are short (tens of days)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_bins < 2:
            raise NimbleError(f"n_bins must be >= 2, got {self.n_bins}", fix="use e.g. 4")

    def _transformer(self, length: int) -> Any:
        return pyts_image().MarkovTransitionField(image_size=min(self.image_size, length), n_bins=self.n_bins)

    def _encode(self, windows: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Some quantiles are equal", category=UserWarning)
            return super()._encode(windows)


@dataclass(kw_only=True)
class RecurrenceEncoder(_PytsEncoder):
    """Recurrence plot |x_i - x_j| (unthresholded by default), values >= 0.

    Invariant to the row's level, not its scale. With ``threshold`` set, a binary plot
    (1 where |x_i - x_j| <= threshold, in scaled feature units). Rows longer than image_size
    are area-averaged down; shorter ones are upsampled.
    """

    name: ClassVar[str] = "recurrence"
    threshold: float | None = None  # None: distances; a float: binary recurrence

    def _transformer(self, length: int) -> Any:
        return pyts_image().RecurrencePlot(dimension=1, time_delay=1, threshold=self.threshold)


ENCODERS: dict[str, type[ImageEncoder]] = {
    HeatmapEncoder.name: HeatmapEncoder,
    GAFEncoder.name: GAFEncoder,
    MTFEncoder.name: MTFEncoder,
    RecurrenceEncoder.name: RecurrenceEncoder,
}


def get_encoder(name: str, **kwargs: Any) -> ImageEncoder:
    """Build a registered encoder by name, e.g. ``get_encoder("gaf", image_size=32)``."""
    if name not in ENCODERS:
        raise NimbleError(f"unknown image encoder {name!r}", fix=f"use one of {', '.join(ENCODERS)}")
    cls = ENCODERS[name]
    try:
        return cls(**kwargs)
    except TypeError as error:
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        raise NimbleError(f"bad options for encoder {name!r}: {error}", fix=f"use only {fields}") from error
