"""Synthetic catalogue: a fitted mixture matches the real table's geometry and draws no near copies."""

from __future__ import annotations

import numpy as np
import pytest

from nimbleml.errors import NimbleError
from nimbleml.rec.catalogue import CatalogueConfig, CatalogueModel, compare_catalogues, nearest_distances


def learnt_like_table(n_items: int = 3000, dim: int = 16, seed: int = 0) -> np.ndarray:
    """Clusters of different spread and orientation, norms varying by cluster (row 0 = padding)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, dim)) * rng.uniform(0.5, 2.0, size=(12, 1))
    mixing = rng.normal(size=(12, dim, dim)) / np.sqrt(dim)
    label = rng.integers(0, 12, n_items + 1)
    table = centres[label] + np.einsum("nd,nde->ne", rng.normal(size=(n_items + 1, dim)), 0.6 * mixing[label])
    table[0] = 0.0
    return table.astype(np.float32)


@pytest.fixture(scope="module")
def fitted() -> tuple[np.ndarray, CatalogueModel]:
    real = learnt_like_table()
    return real, CatalogueModel(CatalogueConfig(n_components=12, seed=0)).fit(real)


def test_draws_match_spectrum_norms_and_neighbour_distances(fitted) -> None:
    real, generator = fitted
    synthetic = generator.sample(20_000, seed=1)
    assert synthetic.shape == (20_001, 16) and synthetic.dtype == np.float32 and not synthetic[0].any()
    report = compare_catalogues(real, synthetic)
    for k in ("top1", "top4", "top8"):
        assert report.spectrum["synthetic"][k] == pytest.approx(report.spectrum["real"][k], abs=0.03)
    for q in ("q10", "q50", "q90"):
        assert report.norms["synthetic"][q] == pytest.approx(report.norms["real"][q], rel=0.1)
        assert report.nn_distance["synthetic"][q] == pytest.approx(report.nn_distance["real"][q], rel=0.25)


def test_no_near_copies_while_noisy_copies_are_caught(fitted) -> None:
    real, generator = fitted
    report = compare_catalogues(real, generator.sample(len(real) - 1, seed=2))
    # a fresh draw sits about as far from its nearest real item as real items sit from each other
    assert report.near_copy_share <= 0.05
    assert report.copy_distance["q50"] >= 0.8 * report.nn_distance["real"]["q50"]
    # near copies (each real item plus a little noise) fail both checks
    rng = np.random.default_rng(3)
    copies = real.copy()
    copies[1:] += 0.05 * real[1:].std(axis=0) * rng.normal(size=copies[1:].shape).astype(np.float32)
    copies_report = compare_catalogues(real, copies)
    assert copies_report.near_copy_share > 0.5
    assert copies_report.copy_distance["q50"] < 0.8 * copies_report.nn_distance["real"]["q50"]


def test_sample_is_reproducible_and_mixes_components_in_every_slice(fitted) -> None:
    _, generator = fitted
    a, b = generator.sample(5000, seed=4, block=1024), generator.sample(5000, seed=4, block=1024)
    np.testing.assert_array_equal(a, b)
    # the last 500 rows (what a benchmark adds to a built index) come from many components
    nearest_mean = np.argmin(((a[-500:, None, :] - generator.means[None]) ** 2).sum(-1), axis=1)
    assert len(np.unique(nearest_mean)) >= 8


def test_nearest_distances_skip_the_row_itself() -> None:
    base = np.array([[0.0, 0.0], [3.0, 4.0], [3.0, 5.0]], dtype=np.float32)
    np.testing.assert_allclose(nearest_distances(base, base, same=True), [5.0, 1.0, 1.0])
    np.testing.assert_allclose(nearest_distances(base[:1] + 1.0, base), [np.sqrt(2.0)], rtol=1e-6)


def test_a_table_too_small_for_the_mixture_is_refused() -> None:
    with pytest.raises(NimbleError, match="too small"):
        CatalogueModel(CatalogueConfig(n_components=64)).fit(learnt_like_table(n_items=100))
