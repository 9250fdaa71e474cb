"""SYNTHETIC item catalogues fitted to a trained item table, for index benchmarks at sizes no real
table here has (4.2M items: Taobao's catalogue).

A full-covariance Gaussian mixture (one Gaussian per k-means cluster) is fitted to the real item
vectors (rows 1..n of a model's item table, row 0 being padding) and sampled: every synthetic vector is a fresh draw, not a real
item plus a little noise. Noisy copies (the catalogue ``bench retrieve`` used before) sit about
twice as close to each other as to other items, so they cluster far more easily than a real
table and flatter an index; a mixture with a few hundred real items per component spreads its
draws the way the real items spread. :func:`compare_catalogues` reports how close the draw is:
the spectrum, the norm distribution and the nearest-neighbour distance distribution, real against
synthetic at the same size, and the distance from each synthetic vector to its nearest real one
(a near copy would sit much closer to a real item than real items sit to each other).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from nimbleml.errors import NimbleError

log = logging.getLogger(__name__)

QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)  # of norms and distances in a comparison
SPECTRUM_PCS = (1, 2, 4, 8, 16, 32, 64)  # cumulative share of variance reported for these leading components


@dataclass
class CatalogueConfig:
    """How the generator is fitted."""

    # mixture components; the real table's items per component should stay in the hundreds so
    # that each full covariance is estimated from many items (Video.txt: 23.7k items / 64 = 370)
    n_components: int = 64
    # added to every component covariance's diagonal, as a fraction of the table's mean
    # per-dimension variance: a component cannot shrink onto a handful of items (whose draws
    # would be near copies of them)
    covariance_floor: float = 1e-2
    kmeans_iters: int = 20  # k-means iterations that find the components
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class CatalogueModel:
    """Gaussian mixture over item vectors: ``fit(table) -> self``, ``sample(n_items) -> table``."""

    def __init__(self, config: CatalogueConfig | None = None):
        self.config = config or CatalogueConfig()

    def fit(self, table: np.ndarray) -> CatalogueModel:
        """Fit to rows 1..n of a (n_items + 1, D) item table (row 0 is padding and left out):
        k-means clusters (faiss), each a Gaussian with its items' mean and full covariance, weighted
        by its share of the items. (A hard-assignment mixture: sklearn's EM took over 5 minutes
        at 64 components on the 24k x 128 Video table on a loaded 2-core machine; this takes seconds.)"""
        table = np.asarray(table)
        n_components = self.config.n_components
        if table.ndim != 2 or len(table) - 1 < 2 * n_components:
            raise NimbleError(
                f"an item table of shape {table.shape} is too small for {n_components} components",
                fix="fit on a (n_items + 1, D) table with at least twice as many items as components",
            )
        vectors = np.ascontiguousarray(table[1:], dtype=np.float32)
        dim = vectors.shape[1]
        start = time.perf_counter()
        kmeans = faiss.Kmeans(dim, n_components, niter=self.config.kmeans_iters, seed=self.config.seed,
                              max_points_per_centroid=len(vectors))
        kmeans.train(vectors)
        _, label = kmeans.index.search(vectors, 1)
        label = label[:, 0]
        floor = self.config.covariance_floor * float(vectors.var(axis=0).mean()) * np.eye(dim)
        counts = np.bincount(label, minlength=n_components)
        used = np.flatnonzero(counts >= 2)  # a cluster of one item has no spread to copy
        self.weights = counts[used] / counts[used].sum()  # (K,)
        self.means = np.stack([vectors[label == k].mean(axis=0) for k in used])  # (K, D)
        covariances = [np.cov(vectors[label == k].astype(np.float64), rowvar=False) + floor for k in used]
        self.cholesky = np.linalg.cholesky(np.stack(covariances)).astype(np.float32)  # (K, D, D) lower
        self.fit_s = time.perf_counter() - start
        log.info("fitted %d Gaussians to %d x %d item vectors in %.1f s", len(used), *vectors.shape, self.fit_s)
        return self

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n_items: int, seed: int = 0, block: int = 1 << 20) -> np.ndarray:
        """(n_items + 1, D) float32 SYNTHETIC item table, row 0 = padding (zeros). Drawn in
        blocks of ``block`` rows; components are shuffled within a block, so any slice of rows
        (the last 10k, say) is a draw from the whole mixture."""
        rng = np.random.default_rng(seed)
        out = np.empty((n_items + 1, self.dim), dtype=np.float32)
        out[0] = 0.0
        for start in range(1, n_items + 1, block):
            stop = min(start + block, n_items + 1)
            component = rng.choice(len(self.weights), size=stop - start, p=self.weights)
            noise = rng.standard_normal((stop - start, self.dim), dtype=np.float32)
            rows = out[start:stop]
            for k in np.unique(component):
                chosen = component == k
                rows[chosen] = self.means[k] + noise[chosen] @ self.cholesky[k].T
        return out


def nearest_distances(queries: np.ndarray, base: np.ndarray, same: bool = False) -> np.ndarray:
    """(Q,) Euclidean distance from each query row to its nearest base row (exact, faiss flat);
    ``same``: the queries are the base, so each row's own zero distance is skipped."""
    index = faiss.IndexFlatL2(base.shape[1])
    index.add(np.ascontiguousarray(base, dtype=np.float32))
    squared, _ = index.search(np.ascontiguousarray(queries, dtype=np.float32), 2 if same else 1)
    return np.sqrt(np.maximum(squared[:, 1 if same else 0], 0.0))


def variance_spectrum(vectors: np.ndarray) -> np.ndarray:
    """(D,) eigenvalues of the covariance, largest first, as shares of the total variance."""
    centred = np.asarray(vectors, dtype=np.float64) - vectors.mean(axis=0)
    eig = np.linalg.svd(centred, compute_uv=False) ** 2
    return eig / eig.sum()


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {f"q{round(q * 100):02d}": float(np.quantile(values, q)) for q in QUANTILES}


@dataclass
class CatalogueComparison:
    """Real table against a same-size synthetic draw (quantiles keyed q01 .. q99)."""

    n_real: int
    spectrum: dict[str, dict[str, float]]  # real / synthetic: cumulative variance share of the first k components
    effective_rank: dict[str, float]  # real / synthetic: exp(entropy of the variance shares)
    norms: dict[str, dict[str, float]]  # real / synthetic: quantiles of the L2 norms
    nn_distance: dict[str, dict[str, float]]  # real / synthetic: distance to the nearest other row of the same table
    copy_distance: dict[str, float]  # quantiles of each synthetic row's distance to its nearest real row
    # share of synthetic rows closer to a real row than the real table's 1st-percentile
    # neighbour distance: about 0.01 for fresh draws, near 1 for copies
    near_copy_share: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare_catalogues(real: np.ndarray, synthetic: np.ndarray) -> CatalogueComparison:
    """Compare rows 1.. of a real item table with the first as many rows of a synthetic one."""
    real_vectors = np.asarray(real[1:], dtype=np.float32)
    n = len(real_vectors)
    if len(synthetic) - 1 < n:
        raise NimbleError(f"the synthetic table has {len(synthetic) - 1} items, fewer than the real {n}",
                          fix="compare against a synthetic draw at least as large as the real table")
    synthetic_vectors = np.asarray(synthetic[1 : n + 1], dtype=np.float32)
    spectra = {"real": variance_spectrum(real_vectors), "synthetic": variance_spectrum(synthetic_vectors)}
    real_nn = nearest_distances(real_vectors, real_vectors, same=True)
    copy = nearest_distances(synthetic_vectors, real_vectors)
    return CatalogueComparison(
        n_real=n,
        spectrum={name: {f"top{k}": float(s[:k].sum()) for k in SPECTRUM_PCS if k <= len(s)}
                  for name, s in spectra.items()},
        effective_rank={name: float(np.exp(-(s[s > 0] * np.log(s[s > 0])).sum())) for name, s in spectra.items()},
        norms={"real": _quantiles(np.linalg.norm(real_vectors, axis=1)),
               "synthetic": _quantiles(np.linalg.norm(synthetic_vectors, axis=1))},
        nn_distance={"real": _quantiles(real_nn),
                     "synthetic": _quantiles(nearest_distances(synthetic_vectors, synthetic_vectors, same=True))},
        copy_distance=_quantiles(copy),
        near_copy_share=float((copy < np.quantile(real_nn, 0.01)).mean()),
    )  # fmt: skip
