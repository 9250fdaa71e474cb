"""Int8 quantisation: ORT's weights within one step of the originals, outputs near the float
graph's; fake quantisation with straight-through gradients; QAT leaves plain float layers."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from nimbleml.compress.quantize import (
    WeightFakeQuant,
    quantization_aware_training,
    quantize_dynamic_onnx,
    quantize_static_onnx,
    weight_error_steps,
)
from nimbleml.runtime.export import export_onnx


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.emb(ids).mean(1))


@pytest.fixture(scope="module")
def float_graph(tmp_path_factory) -> tuple[nn.Module, object]:
    net = _Net().eval()
    path = export_onnx(net, {"ids": torch.randint(0, 50, (2, 7))}, tmp_path_factory.mktemp("q") / "float.onnx", ["out"])
    return net, path


def _run(path, ids: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_int8_weights_within_one_step(float_graph, tmp_path, kind: str) -> None:
    net, path = float_graph
    ids = np.random.default_rng(0).integers(0, 50, (32, 7))
    out = tmp_path / f"{kind}.onnx"
    if kind == "dynamic":
        quantize_dynamic_onnx(path, out)
    else:
        quantize_static_onnx(path, out, ({"ids": ids[i : i + 8]} for i in range(0, 32, 8)))
    errors = weight_error_steps(path, out)
    assert len(errors) >= 2  # both MatMul weights (and the table where quantised)
    assert max(errors.values()) <= 0.5 + 1e-3  # round to nearest: half a step, so within one
    reference = _run(path, ids)
    error = np.abs(_run(out, ids) - reference).mean()
    assert error < 0.1 * np.abs(reference).mean()  # int8 activations of a unit-normal table: a few %


def test_fake_quant_is_within_one_step_with_straight_through_gradient() -> None:
    weight = torch.randn(6, 10, requires_grad=True)
    quantized = WeightFakeQuant()(weight)
    step = weight.detach().abs().amax(1, keepdim=True) / 127
    assert ((quantized - weight).abs() <= step / 2 + 1e-6).all()
    assert len(torch.unique(torch.round(quantized.detach() / step))) <= 255
    quantized.sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones_like(weight))


def test_qat_trains_through_fake_quant_and_leaves_plain_layers() -> None:
    net = _Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    losses = []

    def finetune(module: nn.Module) -> None:
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
        for _ in range(20):
            ids = torch.randint(0, 50, (16, 7))
            loss = (module(ids) - 1.0).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))

    assert quantization_aware_training(net, finetune) == 2
    assert losses[-1] < losses[0]
    assert net.state_dict().keys() == before.keys()  # parametrisations gone, same names
    assert not torch.equal(net.mlp[0].weight, before["mlp.0.weight"])
    assert not net.mlp[0]._forward_pre_hooks
