"""Run independent per-asset tasks (expert fits and refits) in parallel: joblib locally, or Ray.

joblib (loky processes) is the default; ``executor="ray"`` sends the same tasks to a Ray
cluster (``ray.init()`` joins the one in ``RAY_ADDRESS`` or starts a local one), so a user with
thousands of series uses an existing distributed engine rather than ours.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from nimbleml.errors import NimbleError

log = logging.getLogger(__name__)

EXECUTORS: tuple[str, ...] = ("joblib", "ray")


def check_executor(executor: str, n_jobs: int) -> None:
    """Validate the executor name and job count once, at the boundary."""
    if executor not in EXECUTORS:
        raise NimbleError(f"unknown executor {executor!r}", fix=f"use one of {', '.join(EXECUTORS)}")
    if n_jobs == 0 or n_jobs < -1:
        raise NimbleError(f"-j {n_jobs}: need a positive number of jobs or -1 (all cores)", fix="pass -j 2")


def map_tasks(fn: Callable[[Any], Any], items: Sequence[Any], n_jobs: int = 1, executor: str = "joblib") -> list[Any]:
    """[fn(x) for x in items], in order, on ``n_jobs`` workers of ``executor``; fn and items must pickle."""
    check_executor(executor, n_jobs)
    if executor == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=None if n_jobs == -1 else n_jobs, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        remote = ray.remote(fn)
        return ray.get([remote.remote(x) for x in items])
    if n_jobs == 1 or len(items) < 2:
        return [fn(x) for x in items]
    from joblib import Parallel, delayed

    return Parallel(n_jobs=n_jobs)(delayed(fn)(x) for x in items)
