"""`nimbleml bench risk`: the risk CNN through the same compress → export → runtime path, side by side.

Trains the CNN on the chronological split of ``--data`` (default: the arch package's real
series; or loads ``--model``, a folder written by ``CNNForecaster.save`` for the same data and
features), then measures each variant on each CPU runtime in one process: PyTorch eager FP32
(the baseline), the FP32 ONNX graph, dynamic and static int8 (static calibrated on training
images). Quality is each row's own test-period QLIKE and RMSE of the volatility forecast, so a
quantised row that hurts the forecast shows it. A request is one asset window as one image.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from nimbleml.bench.harness import BenchConfig, Candidate, cpu_limits, flops_per_call, measure_rows
from nimbleml.bench.report import rows_table, write_bench
from nimbleml.compress.quantize import quantize_dynamic_onnx, quantize_static_onnx
from nimbleml.environment import environment
from nimbleml.errors import NimbleError
from nimbleml.runtime.backends import available_backends, get_backend
from nimbleml.runtime.export import export_onnx

log = logging.getLogger(__name__)

HELP = "risk CNN variants x runtimes side by side: latency, throughput, FLOPs, test QLIKE/RMSE"
QUALITY_COLUMNS = {"qlike": "QLIKE", "rmse": "RMSE", "max_abs_diff": "max |Δ out|"}
VARIANTS = ("baseline", "fp32", "quantize-dynamic", "quantize-static")
CPU_BACKENDS = ("onnxruntime", "openvino")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="arch", help="'arch' (bundled real series) or a market folder")
    parser.add_argument("--assets", type=int, default=None, help="first N assets")
    parser.add_argument("--model", type=Path, default=None, help="a saved CNNForecaster folder (else train one)")
    parser.add_argument("--epochs", type=int, default=5, help="CNN max epochs when training here")
    parser.add_argument("--out", type=Path, required=True, help="writes bench.json, bench.md and the ONNX graphs")
    parser.add_argument("--max-samples", type=int, default=20_000, help="test samples scored for quality")
    parser.add_argument("--quick", action="store_true", help="short timings (tests, smoke runs)")


class _RiskProbe:
    """Test-period images, classes and targets, and the forecaster's output -> volatility map."""

    def __init__(self, args: argparse.Namespace):
        from nimbleml.risk.cnn import CNNForecaster
        from nimbleml.risk.experiment import RiskRunConfig, make_model
        from nimbleml.risk.features import build_samples, compute_features, fit_scaler
        from nimbleml.risk.protocol import make_splits
        from nimbleml.risk.data import load_panel

        cfg = RiskRunConfig(data=args.data, assets=args.assets, models=("cnn",), epochs=args.epochs)
        fp = compute_features(load_panel(cfg.data, cfg.assets), cfg.features)
        split = make_splits("chronological", fp.sample_date, fp.sample_target_end, cfg.seed)[0]
        scaler = fit_scaler(fp, split.train)
        train, val, test = (build_samples(fp, scaler, idx) for idx in (split.train, split.val, split.test))
        if args.model is not None:
            self.forecaster = CNNForecaster.load(args.model, device="cpu")
        else:
            self.forecaster = make_model("cnn", cfg, len(fp.feature_names)).fit(train, val)
        rng = np.random.default_rng(0)
        keep = np.sort(rng.choice(len(test), min(len(test), args.max_samples), replace=False))
        encoder = self.forecaster.encoder
        self.images = encoder.encode(test.windows[keep]).astype(np.float32)
        self.classes = test.asset_class[keep].astype(np.int64)
        self.target = test.target[keep]
        self.assets = test.asset[keep]
        self.floor = self.forecaster.floor_.rows(self.assets)  # the run's per-asset variance floor
        calib = rng.choice(len(train), min(len(train), 512), replace=False)
        self.calibration = [{"images": encoder.encode(train.windows[calib[i : i + 64]]).astype(np.float32),
                             "asset_class": train.asset_class[calib[i : i + 64]].astype(np.int64)}
                            for i in range(0, len(calib), 64)]
        self.network = self.forecaster.model_.float().eval()
        with torch.inference_mode():
            self.reference = self.network(torch.from_numpy(self.images), torch.from_numpy(self.classes)).numpy()

    def inputs(self, batch: int) -> dict[str, np.ndarray]:
        rows = np.arange(batch) % len(self.images)
        return {"images": self.images[rows], "asset_class": self.classes[rows]}

    def quality(self, predict: Callable[[dict[str, np.ndarray]], np.ndarray]) -> dict[str, float]:
        from nimbleml.risk.evaluate import qlike_loss

        out = np.concatenate([predict({"images": self.images[i : i + 512], "asset_class": self.classes[i : i + 512]})
                              for i in range(0, len(self.images), 512)]).reshape(-1)
        vol = self.forecaster.volatility_from_output(out, self.assets, self.classes)
        return {"qlike": float(np.mean(qlike_loss(self.target**2, vol**2, self.floor))),
                "rmse": float(np.sqrt(np.mean((vol - self.target) ** 2))),
                "max_abs_diff": float(np.max(np.abs(out - self.reference)))}


def run(args: argparse.Namespace) -> int:
    console = Console(width=max(Console().width, 180))  # the table has 15 columns
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    probe = _RiskProbe(args)
    if not len(probe.images):
        raise NimbleError("no test samples", path=args.data, fix="use more data or fewer assets")
    network = probe.network
    example = {"images": torch.from_numpy(probe.images[:2]), "asset_class": torch.from_numpy(probe.classes[:2])}
    flops = flops_per_call(network, {k: v[:1] for k, v in example.items()})
    params = sum(p.numel() for p in network.parameters()) / 1e6
    fp32 = export_onnx(network, example, args.out / "riskcnn.onnx", output_names=["forecast"])
    graphs = {
        "fp32": fp32,
        "quantize-dynamic": quantize_dynamic_onnx(fp32, args.out / "riskcnn.int8-dynamic.onnx"),
        "quantize-static": quantize_static_onnx(fp32, args.out / "riskcnn.int8-static.onnx", probe.calibration),
    }
    backends = [b for b in (*CPU_BACKENDS, "onnxruntime-cuda", "onnxruntime-tensorrt") if b in available_backends()]
    torch_backend = get_backend("torch")
    candidates = [Candidate("baseline", "torch", lambda: torch_backend.from_module(network).predict, params,
                            fp32.stat().st_size / 2**20, flops, probe.quality)]
    for name, path in graphs.items():
        for backend in backends:
            cls = get_backend(backend)
            candidates.append(Candidate(name, backend, lambda cls=cls, path=path: cls.load(path).predict, params,
                                        path.stat().st_size / 2**20, flops, probe.quality,
                                        extra={"precision": "fp32" if name == "fp32" else "int8"}))
    config = (BenchConfig(rounds=3, latency_seconds=0.1, throughput_seconds=0.05, batch_sizes=(1, 16, 64))
              if args.quick else BenchConfig())
    limits = cpu_limits()
    # every row timed in the same interleaved rounds on the same inputs, as bench rec does
    rows = measure_rows(candidates, probe.inputs, config, limits.fp32_measured_gflops)
    payload = {"environment": environment(), "cpu": limits.to_dict(),
               "flops_peak_gflops": limits.fp32_measured_gflops,  # % peak is against the measured sgemm
               "rounds": config.rounds,  # each row timed this many times, interleaved round-robin
               "batch_sizes": list(config.batch_sizes), "data": str(args.data), "n_test_samples": int(len(probe.images)),
               "wall_seconds": time.perf_counter() - started}
    write_bench(args.out, payload, rows, rows[0], QUALITY_COLUMNS)
    console.print(rows_table(rows, rows[0], "risk CNN variants x runtimes (one request = one asset window image)",
                             QUALITY_COLUMNS))
    console.print(f"wrote {args.out / 'bench.json'}")
    return 0
