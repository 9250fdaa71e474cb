"""Per-asset tasks on joblib and on a local Ray: same answers as a plain loop."""

import numpy as np
import pytest

from nimbleml.errors import NimbleError
from nimbleml.risk.baselines import GARCHBaseline
from nimbleml.risk.parallel import map_tasks


def _square(x: int) -> int:
    return x * x


def test_joblib_and_a_loop_agree():
    assert map_tasks(_square, list(range(6)), n_jobs=2) == [x * x for x in range(6)]


def test_garch_fits_in_parallel_equal_the_serial_fits():
    rng = np.random.default_rng(0)
    histories = [rng.standard_t(6, 800) * 0.01 for _ in range(3)]
    serial = [GARCHBaseline()._fit_one(r)[1] for r in histories]
    parallel = [res[1] for res in map_tasks(GARCHBaseline(n_jobs=2)._fit_one, histories, n_jobs=2)]
    for a, b in zip(serial, parallel):
        np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-3)  # worker BLAS threads differ: optimiser noise


def test_local_ray_runs_the_same_tasks():
    ray = pytest.importorskip("ray")
    try:
        assert map_tasks(_square, [1, 2, 3], n_jobs=1, executor="ray") == [1, 4, 9]
    finally:
        ray.shutdown()


@pytest.mark.parametrize(("executor", "jobs"), [("dask", 1), ("joblib", 0)])
def test_bad_executor_or_jobs(executor, jobs):
    with pytest.raises(NimbleError):
        map_tasks(_square, [1], n_jobs=jobs, executor=executor)
