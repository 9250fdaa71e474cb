"""Image encoders: shapes, dtypes, value ranges, determinism and boundary errors."""

from __future__ import annotations

import numpy as np
import pytest

from nimbleml.errors import NimbleError
from nimbleml.risk.imaging import ENCODERS, get_encoder, pyts_image, rescale_rows

N, N_FEATURES, WINDOW = 16, 5, 22
# Encoding with pyts first imports it, which compiles its numba kernels: ~19 s of CPU the first
# time, ~1 s once numba's cache exists (see pyts_image).
PYTS = pytest.mark.slow
ALL_ENCODERS = [name if name == "heatmap" else pytest.param(name, marks=PYTS) for name in ENCODERS]


@pytest.fixture
def windows() -> np.ndarray:
    return np.random.default_rng(0).random((N, N_FEATURES, WINDOW)).astype(np.float32)


@pytest.mark.parametrize("name", ALL_ENCODERS)
def test_shape_dtype_and_determinism(name: str, windows: np.ndarray) -> None:
    encoder = get_encoder(name)
    images = encoder.encode(windows)
    channels = encoder.channels(N_FEATURES)
    assert images.shape == (N, channels, 32, 32)
    assert images.dtype == np.float32
    assert np.isfinite(images).all()
    np.testing.assert_array_equal(images, encoder.encode(windows))
    np.testing.assert_array_equal(images[3:4], encoder.encode(windows[3:4]))  # rows are independent


def test_heatmap_is_features_by_last_ten_days(windows: np.ndarray) -> None:
    images = get_encoder("heatmap").encode(windows)
    assert images.shape[1] == 1
    recent = windows[:, :, -10:]
    np.testing.assert_array_equal(images.min(axis=(1, 2, 3)), recent.min(axis=(1, 2)))
    np.testing.assert_array_equal(images.max(axis=(1, 2, 3)), recent.max(axis=(1, 2)))
    # top-left block is feature 0 ten days ago, bottom-right block is the last feature on day t
    np.testing.assert_array_equal(images[:, 0, 0, 0], windows[:, 0, -10])
    np.testing.assert_array_equal(images[:, 0, -1, -1], windows[:, -1, -1])


def test_heatmap_bilinear_stays_in_range(windows: np.ndarray) -> None:
    images = get_encoder("heatmap", resize="bilinear").encode(windows)
    recent = windows[:, :, -10:]
    assert (images.min(axis=(1, 2, 3)) >= recent.min(axis=(1, 2)) - 1e-6).all()
    assert (images.max(axis=(1, 2, 3)) <= recent.max(axis=(1, 2)) + 1e-6).all()


@PYTS
def test_value_ranges(windows: np.ndarray) -> None:
    gaf = get_encoder("gaf").encode(windows)
    assert gaf.min() >= -1 - 1e-5 and gaf.max() <= 1 + 1e-5
    mtf = get_encoder("mtf").encode(windows)
    assert mtf.min() >= 0 and mtf.max() <= 1 + 1e-6
    recurrence = get_encoder("recurrence").encode(windows)
    assert recurrence.min() >= 0
    np.testing.assert_allclose(recurrence[:, :-1, 0, 0], 0.0)  # a day is at distance 0 from itself


@PYTS
def test_gaf_ignores_level_heatmap_keeps_it(windows: np.ndarray) -> None:
    shifted = (0.5 * windows + 0.25).astype(np.float32)
    gaf = get_encoder("gaf", level_channel=False)
    np.testing.assert_allclose(gaf.encode(windows), gaf.encode(shifted), atol=1e-5)
    heatmap = get_encoder("heatmap")
    assert not np.allclose(heatmap.encode(windows), heatmap.encode(shifted))
    # the default level channel is the heat map itself, appended after the per-feature GAFs
    with_level = get_encoder("gaf").encode(windows)
    assert with_level.shape[1] == N_FEATURES + 1
    np.testing.assert_allclose(with_level[:, :-1], gaf.encode(windows), atol=1e-6)
    np.testing.assert_allclose(with_level[:, -1:], get_encoder("heatmap", days=None).encode(windows), atol=1e-6)


@pytest.mark.parametrize("name", ALL_ENCODERS)
def test_long_windows_and_constant_rows(name: str) -> None:
    windows = np.random.default_rng(1).random((4, 3, 60)).astype(np.float32)
    windows[0] = 0.3
    images = get_encoder(name).encode(windows)
    assert images.shape == (4, get_encoder(name).channels(3), 32, 32) and np.isfinite(images).all()


def test_per_window_rescale(windows: np.ndarray) -> None:
    scaled = rescale_rows(windows * 3 + 1)
    assert scaled.min() >= 0 and scaled.max() <= 1
    np.testing.assert_allclose(scaled.min(axis=2), 0, atol=1e-6)
    np.testing.assert_allclose(scaled.max(axis=2), 1, atol=1e-6)
    encoder = get_encoder("heatmap", per_window_rescale=True)
    np.testing.assert_allclose(encoder.encode(windows), encoder.encode(windows * 3 + 1), atol=1e-5)


def test_params_rebuild_the_encoder() -> None:
    encoder = get_encoder("mtf", n_bins=3, image_size=16)
    assert get_encoder(encoder.name, **encoder.params()) == encoder


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(NimbleError, match="heatmap, gaf, mtf, recurrence"):
        get_encoder("wavelet")
    with pytest.raises(NimbleError, match="bad options"):
        get_encoder("gaf", n_bins=3)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_bad_input_raises(name: str, windows: np.ndarray) -> None:
    encoder = get_encoder(name)
    with_nan = windows.copy()
    with_nan[2, 1, 5] = np.nan
    with pytest.raises(NimbleError, match="NaN"):
        encoder.encode(with_nan)
    with pytest.raises(NimbleError, match="shape"):
        encoder.encode(windows[0])
    with pytest.raises(NimbleError, match="dtype"):
        encoder.encode(windows.astype(np.int64))


def test_heatmap_needs_ten_days() -> None:
    with pytest.raises(NimbleError, match="days=10"):
        get_encoder("heatmap").encode(np.zeros((2, 3, 5), np.float32))


@PYTS
def test_pyts_kernels_are_cached_and_numba_is_left_as_found() -> None:
    import numba

    plain = numba.njit
    module = pyts_image()
    assert numba.njit is plain
    from pyts.image import _gaf

    assert module.GramianAngularField is _gaf.GramianAngularField
    assert type(_gaf._gasf._cache).__name__ == "FunctionCache"  # NullCache without the wrapper
