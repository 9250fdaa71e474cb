"""Int8 quantisation: dynamic and static post-training quantisation of an exported ONNX graph,
and quantisation-aware training (QAT) of a ``torch.nn.Module``.

The paper (Shao et al., formulas 8-9) quantises each weight matrix W with b bits through the
step ``s = (max W - min W) / (2^b - 1)`` and ``ŵ = clip(round(w / s) · s, min W, max W)``.
ONNX Runtime (``onnxruntime.quantization``, which we use) stores ``q = clip(round(w / s) + z,
qmin, qmax)`` and computes with ``(q - z) · s``:

- weights (``QInt8``, symmetric, per output channel here): z = 0 and s = max|w| / 127, i.e.
  the paper's step over the symmetric range [-max|w|, max|w|] with 2^8 - 2 levels, so 0 is
  exact and an int8 x int8 product needs no offset correction;
- activations (``QUInt8``, asymmetric): s = (max - min) / 255 and z = round(-min / s): exactly
  the paper's step, with the range's offset kept as the zero point instead of added back.

Either way a weight moves by at most half a step (``weight_error_steps`` measures it).

- :func:`quantize_dynamic_onnx`: int8 weights, activations quantised at run time from their
  own range (no calibration).
- :func:`quantize_static_onnx`: int8 weights and activations, activation ranges calibrated
  (min/max) on sample inputs, written as a QDQ graph that the runtimes fuse into int8 kernels.
- :func:`quantization_aware_training`: fine-tune with fake-quantised weights (per channel,
  symmetric int8, as ORT writes them) and Linear inputs (per tensor, uint8, EMA range), with
  straight-through gradients: ``torch.fake_quantize_per_{channel,tensor}_affine``, core torch
  ops whose backward passes the gradient inside the range. We use these rather than
  ``torch.ao.quantization`` (deprecated in favour of torchao, and its converted modules do not
  go through the ONNX exporter) or torchao (its QAT targets its own int8/int4 kernels, not an
  ONNX QDQ graph). ``torch.export`` cannot trace the fake-quant ops, so the QAT-trained float
  weights are then written as int8 by :func:`quantize_static_onnx` with the same scheme: the
  weights have learnt to sit well on the int8 grid, and the activation ranges are calibrated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)
from torch import nn
from torch.nn.utils import parametrize

log = logging.getLogger(__name__)


def _preprocessed(float_path: Path, out_path: Path) -> Path:
    """ORT's recommended pre-pass (shape inference, graph optimisation) before quantising."""
    prepared = out_path.with_name(out_path.stem + ".prep.onnx")
    quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
    return prepared


def quantize_dynamic_onnx(
    float_path: str | Path, out_path: str | Path, per_channel: bool = True, op_types: list[str] | None = None
) -> Path:
    """Dynamic-range int8: weights int8 (symmetric), activations quantised per call from their
    range. op_types: ONNX op types to quantise (None = ORT's default set)."""
    float_path, out_path = Path(float_path), Path(out_path)
    prepared = _preprocessed(float_path, out_path)
    try:
        quantize_dynamic(str(prepared), str(out_path), per_channel=per_channel, weight_type=QuantType.QInt8,
                         op_types_to_quantize=op_types)
    finally:
        prepared.unlink(missing_ok=True)
    return out_path


class _Batches(CalibrationDataReader):
    """ORT's calibration reader over an iterable of input dicts."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]]):
        self._batches: Iterator[dict[str, np.ndarray]] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_static_onnx(
    float_path: str | Path,
    out_path: str | Path,
    calibration: Iterable[dict[str, np.ndarray]],
    per_channel: bool = True,
    op_types: list[str] | None = None,
) -> Path:
    """Static int8 as a QDQ graph: weights int8 (symmetric, per channel), activations uint8
    with min/max ranges calibrated on ``calibration`` (input name -> array, one dict per batch).
    op_types: ONNX op types to quantise (None = ORT's default set; leave out ops whose
    outputs can be -inf, such as masking ``Where``: an infinite range has no int8 step)."""
    float_path, out_path = Path(float_path), Path(out_path)
    prepared = _preprocessed(float_path, out_path)
    try:
        quantize_static(
            str(prepared), str(out_path), _Batches(calibration), quant_format=QuantFormat.QDQ,
            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=op_types,
        )
    finally:
        prepared.unlink(missing_ok=True)
    return out_path


def _dequantized(graph: onnx.GraphProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Original weight name -> (dequantised weight, step broadcast to it) for every int8 weight
    (QDQ ``DequantizeLinear`` on an initializer, or dynamic quantisation's ``*_quantized``)."""
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        shape = [1] * q.ndim
        if scale.ndim:
            shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.astype(np.float32).reshape(shape)
        return (q.astype(np.float32) - zero) * scale, np.broadcast_to(scale, q.shape)

    out = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in init and init[node.input[0]].dtype == np.int8:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            name = node.input[0].removesuffix("_quantized")
            out[name] = dequantize(init[node.input[0]], init[node.input[1]], init[node.input[2]], axis)
    for name, q in init.items():
        base = name.removesuffix("_quantized")
        if name.endswith("_quantized") and base not in out and f"{base}_scale" in init:
            scale = init[f"{base}_scale"]
            axis = 1 if q.ndim == 2 and scale.ndim and scale.shape[0] == q.shape[1] else 0
            out[base] = dequantize(q, scale, init[f"{base}_zero_point"], axis)
    return out


def weight_error_steps(float_path: str | Path, quantized_path: str | Path) -> dict[str, float]:
    """Per quantised weight, max |dequantised - original| in units of its step (<= 0.5 for
    round-to-nearest; the paper's clip can cost up to one step)."""
    originals = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(float_path)).graph.initializer}
    errors = {}
    for name, (weight, step) in _dequantized(onnx.load(str(quantized_path)).graph).items():
        base = name.removesuffix("_Transposed")  # ORT's pre-pass turns Gemm(transB) into MatMul(W^T)
        original = originals.get(base)
        if original is not None and base != name:
            original = original.T
        if original is not None and original.shape == weight.shape:
            errors[base] = float(np.max(np.abs(weight - original) / np.maximum(step, 1e-12)))
    return errors


# ---------------------------------------------------------------- QAT


class WeightFakeQuant(nn.Module):
    """Parametrisation: the weight as int8 would store it (symmetric, one step per output row,
    s = max|w| / 127), gradients straight through."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = (weight.detach().abs().amax(dim=1) / 127.0).clamp_min(1e-8)
        zero = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -127, 127)


class ActivationFakeQuant:
    """Forward pre-hook on a Linear: fake-quantises its input to uint8 over a running range
    (min/max, exponential moving average while training), as static calibration would."""

    def __init__(self, momentum: float = 0.05):
        self.momentum = momentum  # weight of the newest batch in the running min/max
        self.low: float | None = None
        self.high: float | None = None

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if module.training or self.low is None:
            low, high = min(float(x.detach().min()), 0.0), max(float(x.detach().max()), 0.0)
            if self.low is None:
                self.low, self.high = low, high
            else:
                self.low += self.momentum * (low - self.low)
                self.high += self.momentum * (high - self.high)
        scale = max((self.high - self.low) / 255.0, 1e-8)
        zero = int(min(max(round(-self.low / scale), 0), 255))
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255), *args[1:])


def quantization_aware_training(
    module: nn.Module, finetune: Callable[[nn.Module], object], layer_types: tuple[type, ...] = (nn.Linear,)
) -> int:
    """Fine-tune ``module`` in place with every ``layer_types`` layer's weight and input
    fake-quantised (straight-through gradients), then remove the fake quantisation and keep
    the trained float weights. Returns the number of layers trained this way."""
    layers = [m for m in module.modules() if isinstance(m, layer_types)]
    hooks = []
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", WeightFakeQuant())
        hooks.append(layer.register_forward_pre_hook(ActivationFakeQuant()))
    try:
        finetune(module)
    finally:
        for hook in hooks:
            hook.remove()
        for layer in layers:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    log.info("quantisation-aware training of %d layers done", len(layers))
    return len(layers)
