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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nimbleml.progress import track

log = logging.getLogger(__name__)

Inputs = dict[str, np.ndarray]


@dataclass
class BenchConfig:
    """How long and how often each row is measured."""

    warmup: int = 5  # untimed calls before timing (lazy init, caches, thread pools)
    rounds: int = 6  # each row is timed this many times, rows interleaved round-robin; the figures are
    # medians over rounds with an order-statistic interval (6 is the fewest whose [min, max] covers >= 95%)
    latency_runs: int = 100  # batch-1 calls timed for p50 / p99 per round (at most)
    latency_seconds: float = 0.5  # ...or until this many seconds have passed, per round
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64, 128, 256)  # tried for throughput
    throughput_seconds: float = 0.25  # per batch size per round
    min_calls: int = 3  # per batch size, even past the time limit
    input_pool: int = 32  # distinct inputs drawn per batch size and cycled while timing: a cost that
    # depends on the data (trimmed padding) is then averaged over many requests, not one draw


@dataclass
class Estimate:
    """The median of repeated measurements and a distribution-free interval for it.

    ci95: [x_(k), x_(n-k+1)] of the sorted samples, the narrowest such pair whose coverage of the
    true median, 1 - 2 P(Binomial(n, 1/2) < k), is at least 95%; with fewer than 6 samples no pair
    reaches 95% and the interval is [min, max] with its lower coverage in ``coverage``."""

    median: float
    ci95: tuple[float, float]
    n: int
    coverage: float  # the interval's exact coverage of the median (1.0 for a single sample)

    @classmethod
    def of(cls, samples: Sequence[float], confidence: float = 0.95) -> Estimate:
        from scipy.stats import binom

        x = np.sort(np.asarray(samples, dtype=float))
        n = len(x)
        if n == 0:
            raise ValueError("no samples")
        k, coverage = 1, 1.0 if n == 1 else 1 - 2 * float(binom.cdf(0, n, 0.5))
        while k + 1 <= (n + 1) // 2 and 1 - 2 * float(binom.cdf(k, n, 0.5)) >= confidence:
            k += 1
            coverage = 1 - 2 * float(binom.cdf(k - 1, n, 0.5))
        return cls(float(np.median(x)), (float(x[k - 1]), float(x[n - k])), n, coverage)

    def clears(self, other: Estimate, higher_is_better: bool = True) -> bool:
        """True when this interval lies wholly on the better side of ``other``'s."""
        return self.ci95[0] > other.ci95[1] if higher_is_better else self.ci95[1] < other.ci95[0]

    def to_dict(self) -> dict:
        return {"median": self.median, "ci95": list(self.ci95), "n": self.n, "coverage": self.coverage}


def winner(estimates: dict[str, Estimate], higher_is_better: bool = True) -> str:
    """The name with the best median when its interval clears the runner-up's, else ``"tie"``."""
    if not estimates:
        raise ValueError("no estimates")
    ranked = sorted(estimates, key=lambda k: estimates[k].median, reverse=higher_is_better)
    if len(ranked) == 1 or estimates[ranked[0]].clears(estimates[ranked[1]], higher_is_better):
        return ranked[0]
    return "tie"


def round_robin(n_rows: int, rounds: int) -> list[tuple[int, int]]:
    """(round, row) in the order rows are timed: every row once per round, rows in turn, so that
    a slow spell of the machine (another process, a frequency change) lands on every row alike."""
    return [(r, i) for r in range(rounds) for i in range(n_rows)]


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


def input_pool(make_inputs: Callable[[int], Inputs], batch: int, config: BenchConfig) -> list[Inputs]:
    """``config.input_pool`` draws of ``make_inputs(batch)``: the requests one row size is timed on."""
    return [make_inputs(batch) for _ in range(max(1, config.input_pool))]


def _sdpa_flops(query_shape, key_shape, value_shape, *_: Any, **__: Any) -> int:
    """The two matmuls of attention, 2·B·H·Lq·Lk·(d_k + d_v) (torch's own SDPA formula; the
    softmax and mask are element-wise and not counted, like every other element-wise op)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def attention_flop_mapping() -> dict[Any, Callable[..., int]]:
    """A ``FlopCounterMode`` ``custom_mapping`` for the fused CPU attention kernel: on the CPU
    ``F.scaled_dot_product_attention`` dispatches ``aten._scaled_dot_product_flash_attention_for_cpu``,
    which torch's flop registry has no formula for (its flash / efficient / cudnn entries are the
    GPU kernels), so attention counted as zero. Empty where torch already registers it."""
    from torch.utils.flop_counter import flop_registry

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None or op in flop_registry else {op: _sdpa_flops}


def flops_per_call(module: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """FLOPs of one eager forward, counted by ``torch.utils.flop_counter`` (matmuls, convs and
    attention, the fused CPU kernel included: the ops that dominate; element-wise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    module.eval()
    counter = FlopCounterMode(display=False, custom_mapping=attention_flop_mapping())
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
    """What the CPU can do: measured FP32 and int8 GEMM rates on the physical cores, the
    datasheet-style ceilings, and whether it has int8 dot-product instructions."""

    threads: int  # the physical cores every rate here was measured on
    cpu: str
    mhz: float
    isa: list[str]
    fp32_measured_gflops: float  # torch sgemm n^3 (torch.matmul FP32) on `threads` threads: the practical FP32 peak
    fp32_theoretical_gflops: float  # physical cores x GHz x FLOP/cycle (2 FMA pipes x lanes x 2)
    int8_theoretical_gops: float  # x4 with VNNI, x2 without (pmaddubsw): an approximate ceiling
    int8_measured_gops: float  # torch._int_mm (int8 x int8 -> int32) n^3 on `threads` threads
    int8_instructions: dict[str, bool] = field(default_factory=dict)  # avx512_vnni, avx_vnni, amx_int8

    def to_dict(self) -> dict:
        return asdict(self)


INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def _cpuinfo() -> str:
    """/proc/cpuinfo's text; empty off Linux (the figures that need it then read 'unknown')."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_flags(text: str | None = None) -> tuple[str, float, list[str]]:
    text = _cpuinfo() if text is None else text
    name, mhz, flags = platform.processor() or "unknown", 0.0, []
    if m := re.search(r"model name\s*:\s*(.+)", text):
        name = m.group(1).strip()
    if m := re.search(r"cpu MHz\s*:\s*([\d.]+)", text):
        mhz = float(m.group(1))
    if m := re.search(r"flags\s*:\s*(.+)", text):
        flags = sorted(f for f in m.group(1).split() if re.match(r"(avx|fma|amx|.*vnni|.*bf16)", f))
    return name, mhz, flags


def physical_cores(text: str | None = None) -> int:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; the logical count where absent."""
    text = _cpuinfo() if text is None else text
    pairs, socket = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            socket = value.strip()
        elif key.strip() == "core id":
            pairs.add((socket, value.strip()))
    return len(pairs) or os.cpu_count() or 1


def cpu_limits(n: int = 2048, repeats: int = 5, threads: int | None = None) -> CpuLimits:
    """Measure the FP32 and int8 GEMM rates with torch on ``threads`` (default: the physical
    cores) and compute the theoretical ceilings. torch's thread count is restored afterwards."""
    cores = physical_cores()
    threads = threads or cores
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)
        measured = 2 * n**3 / min(_timed_calls(lambda _: torch.matmul(a, b), {}, repeats, 60.0, repeats)) / 1e9
        qa = torch.randint(-128, 128, (n, n), dtype=torch.int8)
        qb = torch.randint(-128, 128, (n, n), dtype=torch.int8)
        torch._int_mm(qa, qb)
        int8 = 2 * n**3 / min(_timed_calls(lambda _: torch._int_mm(qa, qb), {}, repeats, 60.0, repeats)) / 1e9
    finally:
        torch.set_num_threads(before)
    name, mhz, isa = _cpu_flags()
    lanes = 16 if "avx512f" in isa else 8 if "avx2" in isa else 4
    per_cycle = 2 * lanes * (2 if "fma" in isa else 1)  # two FMA pipes
    if "avx512f" in isa and re.search("AMD", name):
        per_cycle = 32  # Zen 4 runs AVX-512 on 256-bit pipes
    fp32 = cores * mhz / 1e3 * per_cycle
    int8_ceiling = fp32 * (4 if any("vnni" in f for f in isa) else 2)
    return CpuLimits(threads, name, mhz, isa, measured, fp32, int8_ceiling, int8,
                     {flag: flag in isa for flag in INT8_FLAGS})


@dataclass
class BenchRow:
    """One variant on one backend. Quality keys are filled by the caller's quality callable.

    Speed figures are medians over ``BenchConfig.rounds`` interleaved rounds; the intervals are in
    ``p50`` / ``throughput`` (``Estimate``), written to JSON as ``p50_ms`` and ``throughput_rps``
    ``{median, ci95, n, coverage}``."""

    variant: str
    backend: str
    params_m: float  # parameters, millions (non-zero ones for pruned variants are in `extra`)
    size_mb: float  # the model file the backend loads, MiB
    flops_per_request: int
    p50_ms_b1: float  # median over rounds of each round's batch-1 p50, milliseconds
    p99_ms_b1: float  # over every batch-1 call of every round
    best_batch: int  # the batch size with the highest median throughput
    throughput_rps: float  # median over rounds at best_batch, requests per second
    peak_fraction: float  # flops_per_request x throughput / the peak the caller passes (measured sgemm)
    peak_rss_mb: float  # process high-water mark once every row was built (rows are timed together)
    rss_delta_mb: float  # resident memory this row's model and session added when built
    p50: Estimate | None = None
    throughput: Estimate | None = None
    throughput_by_batch: dict[int, float] = field(default_factory=dict)  # median per batch size
    server: Estimate | None = None  # requests/s at the server's batch settings (`server_batch`)
    server_batch: dict[str, int] = field(default_factory=dict)  # {"max_batch_size", "group_window"}
    threads: dict[str, Any] = field(default_factory=dict)  # what the runtime was told: threads, streams, hint
    quality: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["throughput_by_batch"] = {str(k): v for k, v in self.throughput_by_batch.items()}
        for key, estimate in (("p50_ms", self.p50), ("throughput_rps", self.throughput),
                              ("throughput_rps_server", self.server)):
            out.pop({"p50_ms": "p50", "throughput_rps": "throughput", "throughput_rps_server": "server"}[key])
            if estimate is not None:
                out[key] = estimate.to_dict()
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
    # a second predict for the batched timings (e.g. OpenVINO with the THROUGHPUT hint and async
    # requests); None: `build`'s predict is timed for both
    build_throughput: Callable[[], Callable[[Inputs], Any]] | None = None
    threads: dict[str, Any] = field(default_factory=dict)  # recorded on the row


@dataclass
class _Timed:
    """One built candidate and the samples its rounds collect."""

    candidate: Candidate
    predict: Callable[[Inputs], Any]
    batched: Callable[[Inputs], Any]
    rss_delta_mb: float
    p50_ms: list[float] = field(default_factory=list)
    latency_ms: list[np.ndarray] = field(default_factory=list)
    rps: dict[int, list[float]] = field(default_factory=dict)
    server_rps: list[float] = field(default_factory=list)


def measure_rows(candidates: Sequence[Candidate], make_inputs: Callable[[int], Inputs], config: BenchConfig,
                 peak_gflops: float, server: tuple[int, Callable[[int], Inputs]] | None = None,
                 server_batch: dict[str, int] | None = None) -> list[BenchRow]:
    """Build every candidate, then time them together: ``config.rounds`` rounds, each row once per
    round in turn (``round_robin``), every row on the same requests (one pool per batch size,
    drawn once). server: (batch size, make_inputs) for one more throughput figure at the server's
    batch settings (recorded as ``server_batch``). Quality is computed after all timing."""
    timed = []
    for candidate in candidates:
        gc.collect()
        before = rss_mb()
        predict = candidate.build()
        batched = candidate.build_throughput() if candidate.build_throughput is not None else predict
        timed.append(_Timed(candidate, predict, batched, rss_mb() - before))
    latency_pool = input_pool(make_inputs, 1, config)
    pools = {batch: input_pool(make_inputs, batch, config) for batch in config.batch_sizes}
    server_pool = input_pool(server[1], server[0], config) if server is not None else []
    for t in timed:  # warm every shape before any timing
        for i in range(config.warmup):
            t.predict(latency_pool[i % len(latency_pool)])
        for pool in [*pools.values(), server_pool]:
            for inputs in pool[:2]:
                t.batched(inputs)
    began = time.perf_counter()
    for r, i in track(round_robin(len(timed), config.rounds), f"timing {len(timed)} rows x {config.rounds} rounds"):
        if i == 0 and r > 0:  # a line per round where no bar is drawn (a log file)
            log.info("timing round %d/%d done, %.0f s", r, config.rounds, time.perf_counter() - began)
        t = timed[i]
        ms = _timed_calls(t.predict, latency_pool, config.latency_runs, config.latency_seconds, config.min_calls) * 1e3
        t.latency_ms.append(ms)
        t.p50_ms.append(float(np.percentile(ms, 50)))
        for batch, pool in pools.items():
            times = _timed_calls(t.batched, pool, 10_000, config.throughput_seconds, config.min_calls)
            t.rps.setdefault(batch, []).append(float(batch * len(times) / times.sum()))
        if server is not None:
            times = _timed_calls(t.batched, server_pool, 10_000, config.throughput_seconds, config.min_calls)
            t.server_rps.append(float(server[0] * len(times) / times.sum()))
    rss_high = peak_rss_mb()
    log.info("timing done in %.0f s; quality of each row on its own graph", time.perf_counter() - began)
    rows = []
    for t in track(timed, "quality per row"):
        candidate = t.candidate
        by_batch = {batch: float(np.median(v)) for batch, v in t.rps.items()}
        best = max(by_batch, key=by_batch.get)
        throughput = Estimate.of(t.rps[best])
        flops = candidate.flops_per_request
        if callable(flops):  # the mean over the requests timed at the best batch size
            flops = int(sum(flops(inputs) for inputs in pools[best]) / (best * len(pools[best])))
        rows.append(BenchRow(
            variant=candidate.variant, backend=candidate.backend, params_m=candidate.params_m,
            size_mb=candidate.size_mb, flops_per_request=flops, p50_ms_b1=float(np.median(t.p50_ms)),
            p99_ms_b1=float(np.percentile(np.concatenate(t.latency_ms), 99)), best_batch=best,
            throughput_rps=throughput.median, peak_fraction=flops * throughput.median / (peak_gflops * 1e9),
            peak_rss_mb=rss_high, rss_delta_mb=t.rss_delta_mb, p50=Estimate.of(t.p50_ms), throughput=throughput,
            throughput_by_batch=by_batch, server=Estimate.of(t.server_rps) if t.server_rps else None,
            server_batch=dict(server_batch or {}) if server is not None else {}, threads=candidate.threads,
            quality=candidate.quality(t.predict) if candidate.quality is not None else {}, extra=candidate.extra,
        ))
        # free the row's runtime now: its arena grew to the quality pass's shapes (a 55k-item
        # catalogue as candidates), and 44 rows holding theirs took a 24 GB machine to 23.5 GB
        t.predict = t.batched = None
        gc.collect()
    del timed
    gc.collect()
    return rows


def measure(candidate: Candidate, make_inputs: Callable[[int], Inputs], config: BenchConfig,
            peak_gflops: float) -> BenchRow:
    """One candidate alone (``measure_rows`` of one): its rounds run back to back."""
    return measure_rows([candidate], make_inputs, config, peak_gflops)[0]
