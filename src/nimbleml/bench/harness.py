"""Side-by-side speed measurement of model variants on runtime backends, in one process.

Domain-agnostic: a row is a ``predict(inputs) -> outputs`` callable, a function that makes the
inputs of a batch of requests, a FLOP count per request and a quality callable. Everything is
bounded in count and time; nothing here asserts a speed (benchmarks report, tests check).

Units: milliseconds per call for latency, requests per second for throughput, megabytes (MiB)
for memory, FLOPs (multiply-add = 2) per request.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

Inputs = dict[str, np.ndarray]


@dataclass
class BenchConfig:
    """How long and how often each row is measured."""

    warmup: int = 5  # untimed calls before timing (lazy init, caches, thread pools)
    latency_runs: int = 300  # batch-1 calls timed for p50 / p99 (at most)
    latency_seconds: float = 3.0  # ...or until this many seconds have passed
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64, 128, 256)  # tried for throughput
    throughput_seconds: float = 1.5  # per batch size
    min_calls: int = 3  # per batch size, even past the time limit
    input_pool: int = 32  # distinct inputs drawn per batch size and cycled while timing: a cost that
    # depends on the data (trimmed padding) is then averaged over many requests, not one draw


@dataclass
class LatencyStats:
    p50_ms: float
    p99_ms: float
    mean_ms: float
    n: int


def _timed_calls(predict: Callable[[Inputs], Any], inputs: Inputs | list[Inputs], max_calls: int, seconds: float,
                 min_calls: int = 3) -> np.ndarray:
    """Seconds per call; a list of inputs is cycled (one call each, in order)."""
    pool = inputs if isinstance(inputs, list) else [inputs]
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() < deadline):
        batch = pool[len(times) % len(pool)]
        t0 = time.perf_counter()
        predict(batch)
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def measure_latency(predict: Callable[[Inputs], Any], inputs: Inputs | list[Inputs], config: BenchConfig) -> LatencyStats:
    """Per-call latency of one request (batch 1): p50 / p99 over up to ``latency_runs`` calls,
    cycling through ``inputs`` when it is a list (different requests)."""
    pool = inputs if isinstance(inputs, list) else [inputs]
    for i in range(config.warmup):
        predict(pool[i % len(pool)])
    times = _timed_calls(predict, pool, config.latency_runs, config.latency_seconds, config.min_calls) * 1e3
    return LatencyStats(float(np.percentile(times, 50)), float(np.percentile(times, 99)), float(times.mean()),
                        len(times))


def input_pool(make_inputs: Callable[[int], Inputs], batch: int, config: BenchConfig) -> list[Inputs]:
    """``config.input_pool`` draws of ``make_inputs(batch)``: the requests one row size is timed on."""
    return [make_inputs(batch) for _ in range(max(1, config.input_pool))]


def measure_throughput(predict: Callable[[Inputs], Any], make_inputs: Callable[[int], Inputs],
                       config: BenchConfig) -> dict[int, float]:
    """Requests per second at each batch size (one call = ``batch`` requests, back to back,
    cycling through a pool of distinct batches)."""
    out = {}
    for batch in config.batch_sizes:
        pool = input_pool(make_inputs, batch, config)
        for inputs in pool[:2]:
            predict(inputs)  # warm this shape
        times = _timed_calls(predict, pool, 10_000, config.throughput_seconds, config.min_calls)
        out[batch] = float(batch * len(times) / times.sum())
    return out


def flops_per_call(module: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """FLOPs of one eager forward, counted by ``torch.utils.flop_counter`` (matmuls, convs,
    attention: the ops that dominate; element-wise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    module.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*inputs.values())
    return int(counter.get_total_flops())


def rss_mb() -> float:
    """Resident memory of this process now, MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """High-water mark of resident memory of this process, MiB (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class CpuLimits:
    """What the CPU could do: a measured FP32 GEMM rate and the datasheet-style ceilings."""

    threads: int
    cpu: str
    mhz: float
    isa: list[str]
    fp32_measured_gflops: float  # torch sgemm 2048^3 on all threads: the practical FP32 peak
    fp32_theoretical_gflops: float  # cores x GHz x FLOP/cycle (2 FMA pipes x 8 lanes x 2 with AVX2+FMA)
    int8_theoretical_gops: float  # x4 with VNNI, x2 without (pmaddubsw): an approximate ceiling

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_flags() -> tuple[str, float, list[str]]:
    name, mhz, flags = platform.processor() or "unknown", 0.0, []
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return name, mhz, flags
    if m := re.search(r"model name\s*:\s*(.+)", text):
        name = m.group(1).strip()
    if m := re.search(r"cpu MHz\s*:\s*([\d.]+)", text):
        mhz = float(m.group(1))
    if m := re.search(r"flags\s*:\s*(.+)", text):
        flags = sorted(f for f in m.group(1).split() if re.match(r"(avx|fma|amx|.*vnni|.*bf16)", f))
    return name, mhz, flags


def cpu_limits(n: int = 2048, repeats: int = 5) -> CpuLimits:
    """Measure the FP32 GEMM rate with torch and compute the theoretical ceilings."""
    threads = torch.get_num_threads()
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed_calls(lambda _: torch.mm(a, b), {}, repeats, 60.0, repeats))
    measured = 2 * n**3 / best / 1e9
    name, mhz, isa = _cpu_flags()
    lanes = 16 if "avx512f" in isa else 8 if "avx2" in isa else 4
    per_cycle = 2 * lanes * (2 if "fma" in isa else 1)  # two FMA pipes
    if "avx512f" in isa and re.search("AMD", name):
        per_cycle = 32  # Zen 4 runs AVX-512 on 256-bit pipes
    cores = os.cpu_count() or 1
    fp32 = cores * mhz / 1e3 * per_cycle
    int8 = fp32 * (4 if any("vnni" in f for f in isa) else 2)
    return CpuLimits(threads, name, mhz, isa, measured, fp32, int8)


@dataclass
class BenchRow:
    """One variant on one backend. Quality keys are filled by the caller's quality callable."""

    variant: str
    backend: str
    params_m: float  # parameters, millions (non-zero ones for pruned variants are in `extra`)
    size_mb: float  # the model file the backend loads, MiB
    flops_per_request: int
    p50_ms_b1: float
    p99_ms_b1: float
    best_batch: int
    throughput_rps: float  # at best_batch
    peak_fraction: float  # flops_per_request x throughput / the CPU's theoretical FP32 peak
    peak_rss_mb: float  # process high-water mark after this row (rows run in order)
    rss_delta_mb: float  # resident memory this row's model and session added
    throughput_by_batch: dict[int, float] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["throughput_by_batch"] = {str(k): v for k, v in self.throughput_by_batch.items()}
        quality = out.pop("quality")
        out.update(quality)
        return out


@dataclass
class Candidate:
    """A variant ready to measure on one backend."""

    variant: str
    backend: str
    build: Callable[[], Callable[[Inputs], Any]]  # loads the model/session, returns predict
    params_m: float
    size_mb: float
    # FLOPs per request: a number, or flops(inputs) -> FLOPs of one call on that batch when the
    # cost depends on the data (trimmed padding); then averaged over requests at the best batch
    flops_per_request: int | Callable[[Inputs], float]
    quality: Callable[[Callable[[Inputs], Any]], dict[str, float]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def measure(candidate: Candidate, make_inputs: Callable[[int], Inputs], config: BenchConfig,
            peak_gflops: float) -> BenchRow:
    """Build, warm and measure one candidate; then its quality, if a callable is given."""
    gc.collect()
    before = rss_mb()
    predict = candidate.build()
    latency = measure_latency(predict, input_pool(make_inputs, 1, config), config)
    by_batch = measure_throughput(predict, make_inputs, config)
    best = max(by_batch, key=by_batch.get)
    quality = candidate.quality(predict) if candidate.quality is not None else {}
    rps = by_batch[best]
    flops = candidate.flops_per_request
    if callable(flops):  # the mean over a fresh pool of requests at the best batch size
        pool = input_pool(make_inputs, best, config)
        flops = int(sum(candidate.flops_per_request(inputs) for inputs in pool) / (best * len(pool)))
    row = BenchRow(
        variant=candidate.variant, backend=candidate.backend, params_m=candidate.params_m,
        size_mb=candidate.size_mb, flops_per_request=flops,
        p50_ms_b1=latency.p50_ms, p99_ms_b1=latency.p99_ms, best_batch=best, throughput_rps=rps,
        peak_fraction=flops * rps / (peak_gflops * 1e9), peak_rss_mb=peak_rss_mb(),
        rss_delta_mb=rss_mb() - before, throughput_by_batch=by_batch, quality=quality, extra=candidate.extra,
    )
    del predict
    gc.collect()
    return row
