"""`nimbleml bench rec`: every compressed variant of a recommender on every CPU runtime, side by side.

The paper's Table I on this machine, in one process: build each variant with its default
fine-tune budget (``nimbleml.rec.compression``; reused when its folder already exists), export it,
then time every row together, interleaved round-robin over ``--rounds`` rounds on the same
requests (medians with 95% intervals): batch-1 latency, throughput at the best batch size and at
the server's batcher settings; FLOPs per request (attention included), fraction of the measured
sgemm, memory, and quality: the 50-candidate protocol of ``rec.evaluate`` on the test users and
full-catalogue HR@10 / NDCG@10, both through the row's own graph and runtime (int8 included).

A request is one user: 100 history events and 50 candidates. The ``baseline`` row is the trained
model as ``nimbleml rec train`` leaves it, ``SeqRec.forward`` (every position computed) in PyTorch
eager FP32, fed the same length-grouped, trimmed batches as every other row (dynamic padding: only
the history columns some row of the batch uses; ``runtime.padding``), as any user of a sequence
model gets; every ratio is against it. ``baseline-padded`` is the same forward on the full
100-wide window, kept for the record. ``+trim`` rows run their graph on trimmed batches too, and
throughput batches are cut from length-sorted queues of real requests (``--bucket-window``), as
the server's batcher groups them; ``edge+trim`` is the ORT-format edge artefact.

``--timing-users N`` times every row on N SYNTHETIC users instead, generated in memory, whose
histories fill the model's window (``max_len`` events; the paper's workload is the last 100
behaviours, while Video.txt's test users hold a few events in the 100-wide window, so trimming
dominates there). Quality stays on the real test users of ``--data``. ``bench.json`` says which
requests timed the rows: ``timing_requests``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from nimbleml.bench.harness import (BenchConfig, BenchRow, Candidate, Estimate, cpu_limits, flops_per_call,
                                    measure_rows, physical_cores, winner)
from nimbleml.bench.report import rows_table, write_bench
from nimbleml.commands.model_folder import N_CANDIDATES, ModelFolder, open_model_folder
from nimbleml.environment import environment
from nimbleml.errors import NimbleError
from nimbleml.progress import track
from nimbleml.rec.compression import CANDIDATE_DIMS, serving_inputs
from nimbleml.runtime.backends import available_backends, get_backend
from nimbleml.runtime.edge import convert_to_ort
from nimbleml.runtime.export import export_onnx, has_dynamic_axis
from nimbleml.runtime.padding import trim_left_padding
from nimbleml.serve.batcher import BatcherConfig

log = logging.getLogger(__name__)

HELP = "recommender variants x runtimes side by side: latency, throughput, FLOPs, quality (the paper's Table I)"

# variant name -> recipe chain for rec.compression.compress_model ("baseline"/"serving": none)
VARIANTS: dict[str, list[str]] = {
    # SeqRec.forward in eager FP32 on the same length-grouped, trimmed batches as every other row
    # (dynamic padding): the competent baseline every ratio is against
    "baseline": [],
    # SeqRec.forward on the full 100-wide window, untrimmed (the pre-issue-28 baseline), for the record
    "baseline-padded": [],
    "serving": [],
    "prune": ["prune"],
    "prune-structured": ["prune-structured"],
    "lowrank": ["lowrank"],
    "grouped": ["grouped"],
    "local": ["local"],
    "quantize-dynamic": ["quantize-dynamic"],
    "quantize-static": ["quantize-static"],
    "qat": ["qat"],
    "distill": ["distill"],
    "distill+quantize-static": ["distill", "quantize-static"],
    # the chain the Taobao head pointed at: structured pruning was the best FP32 row at full length,
    # dynamic int8 the best single int8 recipe on ONNX Runtime (the pruned folder is reused)
    "prune-structured+quantize-dynamic": ["prune-structured", "quantize-dynamic"],
    # "+trim": the same graph fed only the history columns some row of the batch uses (exact:
    # padding keys are masked and positions count back from the latest event; runtime.padding)
    "serving+trim": [],
    "prune-structured+trim": ["prune-structured"],
    "lowrank+trim": ["lowrank"],
    "quantize-dynamic+trim": ["quantize-dynamic"],
    "quantize-static+trim": ["quantize-static"],
    "prune-structured+quantize-dynamic+trim": ["prune-structured", "quantize-dynamic"],
    # the edge artefact (`nimbleml export --target edge`): the serving graph in ONNX Runtime's ORT
    # format with a reduced operator set, run by ONNX Runtime, trimmed
    "edge+trim": [],
}
BASELINES = ("baseline", "baseline-padded")
P50_TARGET = 0.40  # issue 28's bar: at most 40% of the baseline's batch-1 p50 (the paper: 41% on a V100)
EDGE = "edge+trim"
# --variants presets. fast: no recipe that fine-tunes or distils (minutes on 2 cores): the two
# baselines, trimming, dynamic int8 and the edge artefact. paper: the paper's route (distillation,
# int8, a runtime) beside the baselines. all: every variant (compression builds dominate the time)
PRESETS: dict[str, list[str]] = {
    "fast": ["baseline", "baseline-padded", "serving+trim", "quantize-dynamic+trim", EDGE],
    "paper": ["baseline", "baseline-padded", "serving+trim", "distill", "distill+quantize-static",
              "quantize-static+trim", "qat"],
    "all": list(VARIANTS),
}
TRIM = "+trim"
QUALITY_COLUMNS = {"hr@10": "HR@10", "ndcg@10": "NDCG@10", "full_hr@10": "full HR@10", "full_ndcg@10": "full NDCG@10"}
CPU_BACKENDS = ("torch", "torch-compile", "onnxruntime", "openvino")
COMPILED_VARIANTS = ("serving",)  # torch.compile takes minutes per model on 2 cores: the uncompressed ranker only

# The paper's Table I (Shao et al.): V100 GPU figures and the CPU figures from its text.
PAPER_TABLE = [
    {"variant": "paper baseline (V100)", "p50_ms": 52.4, "throughput_rps": 190},
    {"variant": "paper baseline (CPU)", "p50_ms": 120.7, "throughput_rps": 80},
    {"variant": "paper distilled + TensorRT FP16 (V100)", "p50_ms": 21.5, "throughput_rps": 460},
    {"variant": "paper distilled + OpenVINO (CPU)", "p50_ms": 54.8, "throughput_rps": 180},
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="trained model folder (`nimbleml rec train`)")
    parser.add_argument("--data", type=Path, required=True, help="prepared data folder (`nimbleml rec prepare`)")
    parser.add_argument("--out", type=Path, required=True, help="writes bench.json, bench.md and variants/<name>/")
    parser.add_argument("--variants", default="all",
                        help="a preset or a comma list of variants. Presets: "
                             + "; ".join(f"{name} = {', '.join(chosen)}" for name, chosen in PRESETS.items() if name != "all")
                             + f"; all = every variant. Variants: {', '.join(VARIANTS)}")
    parser.add_argument("--backends", default="all", help="'all' (every available CPU/GPU runtime) or a comma list")
    parser.add_argument("--max-users", type=int, default=10_000,
                        help="random test users for the quality columns (same users for every row; 0 = all)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild variant folders that already exist")
    parser.add_argument("--bucket-window", type=int, default=8,
                        help="throughput batches are cut from a queue of this many batches of timing requests "
                             "sorted by history length, as a length-bucketing batcher does (1 = random batches)")
    parser.add_argument("--timing-users", type=int, default=0,
                        help="time every row on this many SYNTHETIC users whose histories fill the model's window "
                             "(items by training popularity, behaviours by the training mix; the paper's shape); "
                             "0 = the real test users' requests. Quality stays on the real test users")
    parser.add_argument("--rounds", type=int, default=BenchConfig.rounds,
                        help="times each row is timed, rows interleaved round-robin (medians and 95%% intervals over rounds)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads every runtime is told to use (torch intra-op, ORT intra_op_num_threads, "
                             "OpenVINO INFERENCE_NUM_THREADS); 0 = the physical cores")
    parser.add_argument("--quick", action="store_true", help="short timings and fine-tunes (tests, smoke runs)")


def _pick(spec: str, known: list[str], what: str, presets: dict[str, list[str]] | None = None) -> list[str]:
    """A preset's list, 'all', or the comma list ``spec`` checked against ``known``."""
    if presets and spec in presets:
        return list(presets[spec])
    if spec == "all":
        return known
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in known]
    if unknown:
        raise NimbleError(f"unknown {what}: {', '.join(unknown)}", fix=f"choose from {', '.join(known)}")
    return chosen


class _QualityProbe:
    """The 50-candidate protocol on the test users through a row's own ``predict``."""

    def __init__(self, data_dir: Path, folder: ModelFolder, max_users: int | None, seed: int = 0):
        from nimbleml.rec.data import SequenceData, leave_last_out

        data = SequenceData.load(data_dir)
        config = folder.reference.config
        if data.n_items != config.n_items:
            raise NimbleError(f"model has {config.n_items} items, data has {data.n_items}", path=data_dir,
                              fix="benchmark on the prepared data the model was trained on")
        self.data, self.config, self.seed, self.max_users = data, config, seed, max_users or None
        self.split = leave_last_out(data, max_len=config.max_len)
        self.popularity = data.item_popularity()
        self.seen = [data.items[s : e - 1] for s, e in zip(data.offsets[:-1], data.offsets[1:])]

    def candidates(self, predict: Callable, batch: int = 256) -> dict[str, float]:
        from nimbleml.rec.evaluate import evaluate_candidates

        scorer = _PredictScorer(predict, self.config, batch)
        behaviors = self.split.test_behaviors if self.config.use_behavior else None
        result = evaluate_candidates(scorer, self.split.test_input, self.split.test_target, self.popularity,
                                     behaviors, seed=self.seed, seen=self.seen, max_users=self.max_users)
        return {k: float(v) for k, v in result.metrics.items() if k in ("hr@10", "ndcg@10", "mrr")}

    def full_users(self) -> np.ndarray:
        """The test users of the full-catalogue figures: the same random subset for every row."""
        users = np.arange(len(self.split.test_target))
        if self.max_users is not None and len(users) > self.max_users:
            users = np.sort(np.random.default_rng(self.seed).choice(users, self.max_users, replace=False))
        return users

    def full(self, predict: Callable, width: int | None) -> dict[str, float]:
        """Full-catalogue HR@10 and NDCG@10 through a row's own ``predict`` (its own graph and
        runtime, int8 included): every item is a candidate. width: the graph's fixed candidate
        count (None: any), for graphs exported before the candidate axis was dynamic."""
        from nimbleml.rec.evaluate import evaluate_full

        users = self.full_users()
        behaviors = self.split.test_behaviors[users] if self.config.use_behavior else None
        result = evaluate_full(_PredictScorer(predict, self.config, 256, width), self.split.test_input[users],
                               self.split.test_target[users], behaviors)
        return {"full_ndcg@10": float(result.metrics["ndcg@10"]), "full_hr@10": float(result.metrics["hr@10"])}

    def row_quality(self, predict: Callable, width: int | None) -> dict[str, float]:
        """A row's quality, all through its own ``predict``: the sampled 50-candidate gate and the
        full catalogue."""
        return {**self.candidates(predict), **self.full(predict, width)}


class _PredictScorer:
    """A backend's ``predict`` as a ``rec.evaluate`` scorer: 50-candidate lists, or the whole
    catalogue as candidates (``score_all``), cut into calls of about ``SCORES_PER_CALL`` scores."""

    SCORES_PER_CALL = 200_000  # users x candidates per call: bounds the (users, candidates, dim) gathers

    def __init__(self, predict: Callable, config, batch: int, width: int | None = None):
        self.predict, self.config, self.batch, self.width = predict, config, batch, width

    def score(self, history: np.ndarray, candidates: np.ndarray, behaviors: np.ndarray | None = None) -> np.ndarray:
        out = []
        for start in range(0, len(history), self.batch):
            rows = slice(start, start + self.batch)
            out.append(self.predict(serving_inputs(self.config, history[rows], candidates[rows],
                                                   None if behaviors is None else behaviors[rows])))
        return np.concatenate(out)

    def score_all(self, history: np.ndarray, behaviors: np.ndarray | None = None) -> np.ndarray:
        """(U, n_items + 1) scores; column 0 (padding) is -inf."""
        n = self.config.n_items
        width = self.width or n
        items = np.arange(1, n + 1, dtype=np.int64)
        per_call = max(1, self.SCORES_PER_CALL // width)
        out = np.full((len(history), n + 1), -np.inf, dtype=np.float32)
        for start in range(0, len(history), per_call):
            rows = slice(start, start + per_call)
            users = len(history[rows])
            for first in range(0, n, width):
                chunk = items[first : first + width]
                padded = np.resize(chunk, width)  # a fixed-width graph: repeat items to fill, then drop them
                scores = self.predict(serving_inputs(self.config, history[rows], np.tile(padded, (users, 1)),
                                                     None if behaviors is None else behaviors[rows]))
                out[rows, 1 + first : 1 + first + len(chunk)] = scores[:, : len(chunk)]
        return out


SYNTHETIC_SEED = 0  # the synthetic timing users' generator seed (recorded in bench.json)
N_TIMING_CANDIDATES = 50  # candidates per timed request, uniform over the catalogue


@dataclass
class TimingRequests:
    """The users every row is timed on: left-padded (U, max_len) histories and behaviour codes
    (None when the model uses none). source: "test-users" (the real test users of --data) or
    "synthetic-full-length" (``synthetic_users``)."""

    source: str
    history: np.ndarray
    behaviors: np.ndarray | None
    seed: int | None = None
    generate_seconds: float = 0.0

    @property
    def lengths(self) -> np.ndarray:
        return (self.history != 0).sum(axis=1)

    def to_dict(self) -> dict[str, Any]:
        lengths = self.lengths
        return {"source": self.source, "n_users": len(self.history),
                "history_length": {"median": float(np.median(lengths)), "min": int(lengths.min()),
                                   "max": int(lengths.max())},
                "seed": self.seed, "generate_seconds": self.generate_seconds}

    def describe(self, data: Path) -> str:
        """One sentence for bench.md and the console: what the timings and the quality ran on."""
        lengths = self.lengths
        if self.source == "synthetic-full-length":
            users = f"{len(lengths):,} synthetic full-length users ({int(np.median(lengths))} events each, seed {self.seed})"
        else:
            users = f"{len(lengths):,} real test users of {data} (history length median {np.median(lengths):.0f})"
        return (f"Timings (latency, throughput, FLOPs) on {users}; quality columns (HR@10, NDCG@10, full "
                f"HR@10 / NDCG@10) on the real test users of {data}.")


def _draw_codes(rng: np.random.Generator, counts: np.ndarray | None, size: int, shape: tuple[int, ...],
                what: str) -> np.ndarray:
    """(shape) int64 codes in 1..size, drawn in proportion to ``counts`` ((size + 1,), index 0 =
    padding, never drawn); uniform over 1..size, with a warning, when there are no counts."""
    weights = None if counts is None else np.asarray(counts, dtype=np.float64)[1 : size + 1]
    if weights is None or weights.sum() <= 0:
        log.warning("no training counts of %s: drawing them uniformly over 1..%d", what, size)
        weights = np.ones(size)
    cdf = np.cumsum(weights)
    # side="right": a code with zero count is never drawn (its cdf step is empty)
    return 1 + np.searchsorted(cdf, rng.random(shape) * cdf[-1], side="right").astype(np.int64)


def synthetic_users(n_users: int, max_len: int, n_items: int, popularity: np.ndarray | None,
                    behavior_counts: np.ndarray | None = None, n_behaviors: int = 0,
                    seed: int = SYNTHETIC_SEED) -> TimingRequests:
    """``n_users`` SYNTHETIC users whose histories fill the window: (n_users, max_len) item ids in
    1..n_items drawn by ``popularity`` ((n_items + 1,) training counts; None: uniform, with a
    warning) and, when ``behavior_counts`` is given, behaviour codes in 1..n_behaviors - 1 by
    that mix. Vectorised and seeded: the same seed gives the same users."""
    began = time.perf_counter()
    rng = np.random.default_rng(seed)
    history = _draw_codes(rng, popularity, n_items, (n_users, max_len), "items")
    behaviors = (None if behavior_counts is None else
                 _draw_codes(rng, behavior_counts, n_behaviors - 1, (n_users, max_len), "behaviour codes"))
    return TimingRequests("synthetic-full-length", history, behaviors, seed, time.perf_counter() - began)


def timing_requests(probe: _QualityProbe, n_users: int) -> TimingRequests:
    """The requests every row is timed on: the real test users (n_users = 0) or ``n_users``
    synthetic full-length users with the prepared data's training popularity and behaviour mix."""
    config = probe.config
    if n_users <= 0:
        return TimingRequests("test-users", probe.split.test_input,
                              probe.split.test_behaviors if config.use_behavior else None)
    mix = (np.bincount(probe.split.train_behaviors, minlength=config.n_behaviors)
           if config.use_behavior else None)
    requests = synthetic_users(n_users, config.max_len, config.n_items, probe.popularity, mix, config.n_behaviors)
    log.info("generated %d synthetic full-length timing users (%d events) in %.2f s", n_users, config.max_len,
             requests.generate_seconds)
    return requests


def _timed_inputs(requests: TimingRequests, config, bucket_window: int = 1) -> Callable[[int], dict[str, np.ndarray]]:
    """Batches of the timing users' histories (real or full-length synthetic, not random ids):
    trimmed rows' cost depends on padding.

    bucket_window > 1: each draw of ``bucket_window`` x batch random users is sorted by history
    length and handed out one batch-sized slice at a time, as a batcher that groups queued
    requests by length does; untrimmed rows cost the same either way."""
    rng = np.random.default_rng(1)
    lengths = requests.lengths
    queued: dict[int, list[np.ndarray]] = {}

    def draw(batch: int) -> np.ndarray:
        if bucket_window <= 1 or batch == 1:
            return rng.choice(len(lengths), batch)
        if not queued.get(batch):
            users = rng.choice(len(lengths), batch * bucket_window)
            users = users[np.argsort(lengths[users], kind="stable")]
            queued[batch] = [users[i : i + batch] for i in range(0, len(users), batch)]
        return queued[batch].pop(int(rng.integers(len(queued[batch]))))

    def make(batch: int) -> dict[str, np.ndarray]:
        users = draw(batch)
        candidates = rng.integers(1, config.n_items + 1, (batch, N_TIMING_CANDIDATES), dtype=np.int64)
        return serving_inputs(config, requests.history[users], candidates,
                              None if requests.behaviors is None else requests.behaviors[users])

    return make


def quick_compress_config():
    """Seconds-long budgets for tests and the demo (the numbers then say the path works, not how well)."""
    from nimbleml.rec.compression import CompressConfig

    return CompressConfig(finetune_seconds=3.0, prune_rounds=2, distill_seconds=8.0, calibration_users=128, valid_users=300,
               finetune_valid_users=200)


def _build_variant(name: str, args: argparse.Namespace, quick: bool) -> Path:
    """The variant's model folder, built by rec.compression unless it exists (and --rebuild is off).

    A chain whose first recipes are another variant's (``distill+quantize-static``) starts from
    that variant's folder when it exists, so the student is trained once, not once per chain."""
    recipes = VARIANTS[name]
    if not recipes:
        return args.model
    folder = args.out / "variants" / name.removesuffix(TRIM)
    if (folder / "variant.json").exists() and (not args.rebuild or name.endswith(TRIM)):
        log.info("reusing %s", folder)
        return folder
    from nimbleml.rec.compression import CompressConfig, compress_model

    parent, todo = args.model, recipes
    prefix = next((other for other, chain in VARIANTS.items()
                   if len(chain) < len(recipes) and chain and recipes[: len(chain)] == chain and TRIM not in other), None)
    if prefix is not None and (args.out / "variants" / prefix / "variant.json").exists():
        parent, todo = args.out / "variants" / prefix, recipes[len(VARIANTS[prefix]):]
    config = quick_compress_config() if quick else CompressConfig()
    started = time.perf_counter()
    compress_model(parent, args.data, todo, folder, config)
    log.info("built %s in %.0f s (from %s)", name, time.perf_counter() - started, parent)
    return folder


def _runtime(backend: str, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(load / from_module keywords, the thread settings recorded on the row) for ``backend``:
    every runtime is told its threads rather than left to its default."""
    if backend.startswith("torch"):
        return {"threads": threads}, {"torch_intra_op_threads": threads}
    if backend == "openvino":  # batch-1 latency: the LATENCY hint; the batched timings use _openvino_async
        return {"threads": threads, "hint": "LATENCY"}, {"openvino_threads": threads, "latency_hint": "LATENCY"}
    return {"threads": threads}, {"ort_intra_op_num_threads": threads, "ort_inter_op_num_threads": 1}


def _openvino_latency(cls: type, path: Path, options: dict[str, Any], record: dict[str, Any]) -> Callable:
    """OpenVINO's synchronous request with the LATENCY hint; the streams it chose go into ``record``."""
    backend = cls.load(path, **options)
    record["latency_streams"] = int(backend.compiled.get_property("NUM_STREAMS"))
    return backend.predict


def _openvino_async(path: Path, threads: int, record: dict[str, Any]) -> Callable:
    """OpenVINO with the THROUGHPUT hint: a batch is cut into one slice per infer request of an
    ``AsyncInferQueue`` (the plugin's optimal number) and the slices run at once, one per stream.
    The streams and requests the plugin chose are written into ``record``."""
    from openvino import AsyncInferQueue

    backend = get_backend("openvino").load(path, threads=threads, hint="THROUGHPUT")
    compiled = backend.compiled
    jobs = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    record.update(throughput_hint="THROUGHPUT", throughput_streams=int(compiled.get_property("NUM_STREAMS")),
                  infer_requests=jobs)
    queue = AsyncInferQueue(compiled, jobs)
    results: dict[int, np.ndarray] = {}
    queue.set_callback(lambda request, i: results.__setitem__(
        i, np.array(request.get_output_tensor(0).data, dtype=np.float32)))

    def predict(inputs: dict[str, np.ndarray]) -> np.ndarray:
        rows = len(inputs[backend.input_names[0]])
        bounds = np.linspace(0, rows, min(jobs, rows) + 1).astype(int)
        results.clear()
        for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            queue.start_async({name: inputs[name][start:stop] for name in backend.input_names}, i)
        queue.wait_all()
        return np.concatenate([results[i] for i in range(len(bounds) - 1)])

    return predict


def _candidates(name: str, folder: ModelFolder, backends: list[str], work: Path, probe: _QualityProbe,
                threads: int = 1) -> list[Candidate]:
    """One Candidate per backend this variant runs on, each told to use ``threads`` threads."""
    example = folder.make_inputs(2, 0)
    if name in BASELINES:  # SeqRec.forward as trained: every position, eager FP32
        module = folder.reference
        torch_backend = get_backend("torch")
        build = lambda: torch_backend.from_module(module, threads=threads).predict  # noqa: E731
        flops = flops_per_call(module, folder.make_inputs(1, 0))
        if name == "baseline":  # dynamic padding: the trimmed batches every other +trim row gets
            build = (lambda build=build: _trimmed(build(), folder.sequence_inputs))
            flops = _trimmed_flops(folder, module)
        return [Candidate(name, "torch", build, folder.params_m, _weights_mb(folder.path), flops,
                          lambda p: probe.row_quality(p, None),
                          extra={"precision": "fp32", "trimmed": name == "baseline"},
                          threads=_runtime("torch", threads)[1])]
    flops = flops_per_call(folder.module, folder.make_inputs(1, 0))
    int8 = folder.onnx is not None
    if int8:
        onnx_path = folder.onnx
    else:
        onnx_path = export_onnx(folder.module, example, work / f"{name}.onnx", output_names=folder.output_names,
                                dynamic_dims={**folder.dynamic_dims, **CANDIDATE_DIMS})
    # graphs built before the candidate axis was dynamic score the catalogue N_CANDIDATES at a time
    width = None if has_dynamic_axis(onnx_path, "candidates", 1) else N_CANDIDATES
    if name == EDGE:
        onnx_path = convert_to_ort(onnx_path, work / "edge.ort").ort_path
        backends = [b for b in backends if b == "onnxruntime"]  # the ORT format is ONNX Runtime's own
    size = onnx_path.stat().st_size / 2**20
    trim = name.endswith(TRIM)
    if trim:
        if name != EDGE:  # (the edge model comes from a graph exported just above, axis dynamic)
            _check_trimmable(onnx_path, folder)
        flops = _trimmed_flops(folder)
    out = []
    for backend in backends:
        cls = get_backend(backend)
        if backend == "torch-compile" and name not in COMPILED_VARIANTS:
            continue
        options, record = _runtime(backend, threads)
        if cls.needs_module:
            if int8 or (trim and name != "serving+trim"):
                continue  # the int8 graph exists only as ONNX; trimmed torch once, for the record
            build = (lambda cls=cls, options=options: cls.from_module(folder.module, **options).predict)
        else:
            build = (lambda cls=cls, options=options: cls.load(onnx_path, **options).predict)
        batched = None
        if backend == "openvino":
            build = (lambda cls=cls, options=options, record=record: _openvino_latency(cls, onnx_path, options, record))
            batched = (lambda record=record: _openvino_async(onnx_path, threads, record))
        if trim:
            build = (lambda build=build: _trimmed(build(), folder.sequence_inputs))
            if batched is not None:
                batched = (lambda batched=batched: _trimmed(batched(), folder.sequence_inputs))
        out.append(Candidate(name, backend, build, folder.params_m, size, flops,
                             lambda p, width=(None if cls.needs_module else width): probe.row_quality(p, width),
                             extra={"precision": "int8" if int8 else "fp32", **_variant_extra(folder),
                                    "quality_from": "this row's own graph and runtime"},
                             build_throughput=batched, threads=record))
    return out


def _trimmed(predict: Callable, names: tuple[str, ...]) -> Callable:
    """``predict`` on the history columns that some row of the batch uses."""
    return lambda inputs: predict(trim_left_padding(inputs, names))


def _trimmed_flops(folder: ModelFolder, module: torch.nn.Module | None = None) -> Callable[[dict[str, np.ndarray]], float]:
    """FLOPs of one call of ``module`` (default: the serving module) on a batch after trimming:
    what a trimmed row really computes."""
    module = folder.module if module is None else module

    def count(inputs: dict[str, np.ndarray]) -> float:
        trimmed = trim_left_padding(inputs, folder.sequence_inputs)
        return flops_per_call(module, {k: torch.as_tensor(v) for k, v in trimmed.items()})

    return count


def _check_trimmable(onnx_path: Path, folder: ModelFolder) -> None:
    """A graph exported before its history axis was dynamic cannot take trimmed inputs."""
    if not has_dynamic_axis(onnx_path, "history", 1):
        raise NimbleError(f"{onnx_path.name} has a fixed history width, so it cannot run trimmed inputs",
                          path=onnx_path, fix="rebuild the variant (`nimbleml bench rec ... --rebuild`)")


def _weights_mb(path: Path) -> float:
    return (path / "model.safetensors").stat().st_size / 2**20


def _variant_extra(folder: ModelFolder) -> dict:
    variant = folder.variant
    out = {k: variant[k] for k in ("recipes", "params_m", "build_seconds") if k in variant}
    for when in ("before", "after"):
        if f"valid_{when}" in variant:
            out[f"valid_ndcg@10_{when}"] = variant[f"valid_{when}"].get("ndcg@10")
    return out


def best_row(rows: list[BenchRow], baseline: BenchRow, tolerance: float = 0.01,
             max_p50_ratio: float | None = None, metric: str = "full_ndcg@10") -> BenchRow | None:
    """The highest-throughput row whose ``metric`` (full-catalogue NDCG@10, on the row's own
    graph) is within ``tolerance`` (relative) of the baseline's, and whose batch-1 p50 is at
    most ``max_p50_ratio`` of the baseline's, if given."""
    floor = baseline.quality[metric] * (1 - tolerance)
    ok = [r for r in rows if r.variant not in BASELINES and r.quality.get(metric, -1) >= floor
          and (max_p50_ratio is None or r.p50_ms_b1 <= max_p50_ratio * baseline.p50_ms_b1)]
    return max(ok, key=lambda r: r.throughput_rps, default=None)


def _ratio_interval(row: Estimate, base: Estimate) -> list[float]:
    """A conservative interval for row / base: the ends of both medians' intervals crossed."""
    return [row.ci95[0] / base.ci95[1], row.ci95[1] / base.ci95[0]]


def _summary_row(row: BenchRow | None, baseline: BenchRow, limits) -> dict | None:
    if row is None:
        return None
    achieved = row.flops_per_request * row.throughput_rps / 1e9
    return {"variant": row.variant, "backend": row.backend,
            "throughput_ratio": row.throughput_rps / baseline.throughput_rps,
            "throughput_ratio_ci95": _ratio_interval(row.throughput, baseline.throughput),
            # the issue-28 bar: the throughput ratio's interval clears 1.0
            "throughput_ratio_clears_1": _ratio_interval(row.throughput, baseline.throughput)[0] > 1,
            "p50_ratio": row.p50_ms_b1 / baseline.p50_ms_b1,
            "p50_ratio_ci95": _ratio_interval(row.p50, baseline.p50),
            "peak_fraction": row.peak_fraction, "achieved_gflops": achieved,
            "fraction_of_measured_sgemm": achieved / limits.fp32_measured_gflops,
            "fraction_of_measured_int8_gemm": achieved / limits.int8_measured_gops,
            "fraction_of_int8_ceiling": achieved / limits.int8_theoretical_gops}


def winners(rows: list[BenchRow]) -> dict[str, str]:
    """The fastest row by each figure, named only where its 95% interval clears the runner-up's
    (else "tie"): throughput at the best batch, at the server's batch settings, batch-1 p50."""
    label = {id(r): f"{r.variant} on {r.backend}" for r in rows}
    out = {"throughput": winner({label[id(r)]: r.throughput for r in rows}),
           "p50_b1": winner({label[id(r)]: r.p50 for r in rows}, higher_is_better=False)}
    if all(r.server is not None for r in rows):
        out["throughput_server_batch"] = winner({label[id(r)]: r.server for r in rows})
    return out


def run(args: argparse.Namespace) -> int:
    console = Console(width=max(Console().width, 260))  # the table has 17 columns, intervals included
    started = time.perf_counter()
    variants = _pick(args.variants, list(VARIANTS), "variant", PRESETS)
    if args.timing_users < 0:  # checked before any variant is built
        raise NimbleError(f"--timing-users {args.timing_users}",
                          fix="use 0 (the real test users) or the number of synthetic full-length users")
    if "baseline" not in variants:
        variants.insert(0, "baseline")
    gpu = [b for b in ("onnxruntime-cuda", "onnxruntime-tensorrt") if b in available_backends()]
    backends = _pick(args.backends, [b for b in CPU_BACKENDS if b in available_backends()] + gpu, "backend")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "onnx"
    work.mkdir(exist_ok=True)
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    rounds = 3 if args.quick and args.rounds == BenchConfig.rounds else args.rounds
    config = (BenchConfig(rounds=rounds, latency_seconds=0.1, throughput_seconds=0.05, batch_sizes=(1, 16, 64))
              if args.quick else BenchConfig(rounds=rounds))

    built, build_seconds = {}, {}
    for name in track(variants, "building variants"):
        began = time.perf_counter()
        built[name] = _build_variant(name, args, args.quick)
        build_seconds[name] = time.perf_counter() - began  # ~0 when the folder was reused
    timing_began = time.perf_counter()
    base_folder = open_model_folder(args.model)
    probe = _QualityProbe(args.data, base_folder, args.max_users)
    limits = cpu_limits(threads=threads)
    requests = timing_requests(probe, args.timing_users)
    make_inputs = _timed_inputs(requests, probe.config, args.bucket_window)
    batcher = BatcherConfig()  # the server's defaults (`nimbleml serve`), read rather than copied
    server_batch = {"max_batch_size": batcher.max_batch_size, "group_window": batcher.group_window}

    candidates: list[Candidate] = []
    for name in variants:
        folder = base_folder if not VARIANTS[name] else open_model_folder(built[name])
        candidates += _candidates(name, folder, backends, work, probe, threads)
    log.info("timing %d rows x %d interleaved rounds on %d threads", len(candidates), config.rounds, threads)
    rows = measure_rows(candidates, make_inputs, config, limits.fp32_measured_gflops,
                        server=(batcher.max_batch_size, _timed_inputs(requests, probe.config, batcher.group_window)),
                        server_batch=server_batch)
    for row in rows:  # int8 rows are bounded by the int8 GEMM, not the sgemm: both fractions kept
        row.extra["fraction_of_measured_int8_gemm"] = row.flops_per_request * row.throughput_rps / (
            limits.int8_measured_gops * 1e9)
    baseline = next(r for r in rows if r.variant == "baseline")
    best = best_row(rows, baseline)
    both = best_row(rows, baseline, max_p50_ratio=P50_TARGET)
    summary = {
        "baseline": {"variant": baseline.variant, "backend": baseline.backend},
        "best_within_1pct_ndcg": _summary_row(best, baseline, limits),
        # the issue-28 target row: full-catalogue NDCG@10 within 1% and at most 40% of the baseline's batch-1 p50
        "best_within_1pct_ndcg_and_40pct_p50": _summary_row(both, baseline, limits),
        # a row is named only where its 95% interval clears the runner-up's; otherwise "tie"
        "winners": winners(rows),
    }
    payload = {
        "environment": environment(),
        "cpu": limits.to_dict(),
        "flops_peak_gflops": limits.fp32_measured_gflops,  # % peak is against the measured sgemm
        "threads": threads,
        "rounds": config.rounds,  # each row timed this many times, interleaved round-robin
        "server_batch": server_batch,  # every row also timed at the server's batcher settings
        "batch_sizes": list(config.batch_sizes),
        "bucket_window": args.bucket_window,  # throughput batches: slices of this many batches sorted by length
        "input_pool": config.input_pool,  # distinct requests (batches) cycled per timed size
        # what every row was timed on: the real test users, or synthetic users whose histories
        # fill the window (--timing-users); quality is always on the real test users of --data
        "timing_requests": requests.to_dict(),
        "model": str(args.model), "data": str(args.data),
        "summary": summary,
        "paper": PAPER_TABLE,
        "variants": variants,
        # where the wall time went: building (or reusing) each variant, then timing and quality together
        "build_seconds": build_seconds,
        "measure_seconds": time.perf_counter() - timing_began,
        "wall_seconds": time.perf_counter() - started,
    }
    described = requests.describe(args.data)
    write_bench(args.out, payload, rows, baseline, QUALITY_COLUMNS, note=described)
    console.print(rows_table(rows, baseline, "recommender variants x runtimes (one request = one user's history "
                             f"+ {N_TIMING_CANDIDATES} candidates)", QUALITY_COLUMNS))
    console.print(described)
    paper = Table(title="the paper's Table I figures (not measured here)")
    for column in ("variant", "p50 ms", "req/s"):
        paper.add_column(column)
    for row in PAPER_TABLE:
        paper.add_row(row["variant"], f"{row['p50_ms']}", f"{row['throughput_rps']}")
    console.print(paper)
    for key, label in (("best_within_1pct_ndcg", "best row within 1% full-catalogue NDCG@10 of the baseline"),
                       ("best_within_1pct_ndcg_and_40pct_p50", "best row within 1% full-catalogue NDCG@10 and <= 40% of its p50")):
        if summary[key] is not None:
            row = summary[key]
            low, high = row["throughput_ratio_ci95"]
            console.print(f"{label}: {row['variant']} on {row['backend']}: {row['throughput_ratio']:.2f}x throughput "
                          f"[{low:.2f}-{high:.2f}], "
                          f"{100 * row['p50_ratio']:.0f}% of the baseline's batch-1 p50, "
                          f"{100 * row['peak_fraction']:.0f}% of the measured sgemm")
    for figure, name in summary["winners"].items():
        console.print(f"fastest by {figure}: {name}" + (" (no row's 95% interval clears the runner-up's)"
                                                        if name == "tie" else ""))
    int8 = ", ".join(flag for flag, present in limits.int8_instructions.items() if present) or "none"
    console.print(f"{limits.cpu}, {threads} threads: sgemm {limits.fp32_measured_gflops:.0f} GFLOP/s, int8 GEMM "
                  f"{limits.int8_measured_gops:.0f} GOP/s; int8 instructions: {int8}")
    console.print(f"wrote {args.out / 'bench.json'} ({payload['wall_seconds']:.0f} s)")
    return 0
