"""ONNX export of any ``torch.nn.Module`` with a dynamic batch axis, and a parity check.

We use torch's own exporter (``torch.onnx.export(dynamo=True)``: torch.export + onnxscript).
The legacy TorchScript exporter writes an ``EyeLike`` on booleans for our attention mask,
which ONNX Runtime has no kernel for; the dynamo exporter emits plain ops.

Exported graphs name their inputs after the keys of ``example_inputs`` (in order), so one
``dict[str, ndarray]`` feeds every backend. Model files are ONNX (or safetensors), never pickles.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nimbleml.errors import NimbleError
from nimbleml.logs import library_noise_as_debug

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18  # ONNX Runtime, OpenVINO and TensorRT all read opset 18

# What torch's exporter says on every export that a user cannot act on (shown under -v only):
# its op registry skips torchvision's detection ops (nms, roi_align, roi_pool, deform_conv2d)
# when torchvision is absent, and none of our models uses them; its own internal deprecation;
# and a note that the shared dynamic "batch" axis is named once. Anything else still shows.
EXPORTER_NOISE_LOGS = {"torch.onnx._internal.exporter._registration": ("torchvision is not installed",)}
EXPORTER_NOISE_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (UserWarning, r"# The axis name: .* will not be used, since it shares the same shape constraints"),
)


def export_onnx(
    module: nn.Module,
    example_inputs: dict[str, torch.Tensor],
    path: str | Path,
    output_names: list[str] | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_dims: dict[str, dict[int, tuple[str, int]]] | None = None,
) -> Path:
    """Write ``module`` as an ONNX graph with a dynamic batch axis (dim 0) on every input and output.

    example_inputs: name -> tensor, in the order of ``module.forward``'s positional arguments;
    use a batch of at least 2 so the exporter does not specialise the batch to 1.
    dynamic_dims: further dynamic axes, input name -> {axis: (dim name, largest size)}; inputs
    naming the same dim share it (e.g. a left-padded sequence axis the caller may trim).
    Give example inputs at the largest size so the exporter does not specialise to it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    output_names = output_names or ["scores"]
    if any(t.shape[0] < 2 for t in example_inputs.values()):
        raise ValueError("export with a batch of at least 2 so the batch axis stays dynamic")
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic_shapes = {name: {0: batch} for name in example_inputs}
    shared: dict[str, torch.export.Dim] = {}
    for name, axes in (dynamic_dims or {}).items():
        if name not in example_inputs:
            continue  # e.g. behaviours for a model without them
        for axis, (dim_name, largest) in axes.items():
            dim = shared.setdefault(dim_name, torch.export.Dim(dim_name, min=1, max=largest))
            dynamic_shapes[name][axis] = dim
    log.debug("exporting %s to ONNX opset %d: inputs %s, dynamic axes %s", type(module).__name__, opset,
              {name: tuple(t.shape) for name, t in example_inputs.items()},
              {name: {axis: str(dim) for axis, dim in axes.items()} for name, axes in dynamic_shapes.items()})
    was_training = module.training
    module.eval()
    try:
        with library_noise_as_debug(EXPORTER_NOISE_LOGS, EXPORTER_NOISE_WARNINGS), torch.no_grad():
            program = torch.onnx.export(
                module,
                tuple(example_inputs.values()),
                input_names=list(example_inputs),
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
        program.save(str(path))
    finally:
        module.train(was_training)
    log.debug("exported %s -> %s (%.2f MB)", type(module).__name__, path, path.stat().st_size / 2**20)
    return path


def check_onnx_file(path: str | Path) -> Path:
    """One clear error for a missing or corrupt ONNX file (instead of a protobuf traceback)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise NimbleError("ONNX model file not found", path=path, fix="export it with `nimbleml export`")
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx raises several unrelated types for a broken file
        raise NimbleError(f"not a valid ONNX model ({exc.__class__.__name__}: {str(exc)[:200]})", path=path,
                          fix="re-export the model with `nimbleml export`") from exc
    return path


def has_dynamic_axis(path: str | Path, input_name: str, axis: int) -> bool:
    """Whether ``input_name``'s ``axis`` in the ONNX graph at ``path`` is symbolic (any size)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    for tensor in graph.input:
        if tensor.name == input_name:
            dims = tensor.type.tensor_type.shape.dim
            return axis < len(dims) and not dims[axis].HasField("dim_value")
    raise NimbleError(f"the graph has no input {input_name!r}", path=path, fix="re-export the model")


def topk_overlap(reference: np.ndarray, other: np.ndarray, k: int = 10, atol: float = 1e-5) -> float:
    """Mean share of each row's top-k by ``other`` that is also in the top-k by ``reference``.

    Ties count: an item is in the reference's top-k when its score is at least the k-th largest
    minus ``atol`` (score units), so candidates that tie at the boundary (a candidate listed twice,
    or two scores within float rounding) and swap places are not a disagreement."""
    k = min(k, reference.shape[1])
    kth = np.sort(reference, axis=1)[:, -k]  # the reference's k-th largest score per row
    top_other = np.argsort(-other, axis=1, kind="stable")[:, :k]
    inside = np.take_along_axis(reference, top_other, axis=1) >= kth[:, None] - atol
    return float(inside.mean())


@dataclass
class ParityReport:
    """How far a runtime's outputs are from PyTorch eager FP32 on the same inputs."""

    backend: str
    max_abs_diff: float  # in output units (scores)
    top10_overlap: float  # 1.0 = the same top 10 per row
    n_rows: int

    def to_dict(self) -> dict:
        return asdict(self)


def parity(
    module: nn.Module,
    onnx_path: str | Path,
    inputs: dict[str, torch.Tensor],
    backend: str = "onnxruntime",
) -> ParityReport:
    """Run ``module`` (eager, eval) and the ONNX file on ``backend`` on the same inputs and compare.

    Scores of -inf (masked candidates) must be -inf in both; they are left out of the difference.
    """
    from nimbleml.runtime.backends import get_backend

    module.eval()
    with torch.no_grad():
        reference = module(*inputs.values()).float().numpy()
    runner = get_backend(backend).load(Path(onnx_path))
    other = runner.predict({name: t.numpy() for name, t in inputs.items()}).astype(np.float32)
    if other.shape != reference.shape:
        raise NimbleError(f"{backend} returned shape {other.shape}, torch {reference.shape}", path=onnx_path,
                          fix="re-export the model")
    finite = np.isfinite(reference)
    if not np.array_equal(finite, np.isfinite(other)):
        raise NimbleError(f"{backend} and torch disagree on which scores are finite", path=onnx_path,
                          fix="re-export; check the masking ops")
    diff = float(np.max(np.abs(reference[finite] - other[finite]))) if finite.any() else 0.0
    if reference.ndim == 2 and reference.shape[1] > 1:
        overlap = topk_overlap(np.where(finite, reference, -np.inf), np.where(finite, other, -np.inf))
    else:
        overlap = 1.0
    return ParityReport(backend=backend, max_abs_diff=diff, top10_overlap=overlap, n_rows=int(reference.shape[0]))
