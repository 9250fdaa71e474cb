"""Pruning: the closed loop hits each round's sparsity and holds masks through fine-tuning;
structured pruning shrinks shapes and keeps the forward valid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nimbleml.compress.prune import (
    ChannelGroup,
    PruneConfig,
    magnitude_mask,
    magnitude_prune,
    structured_prune,
)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))


def _train_steps(module: nn.Module, steps: int = 5) -> None:
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(16, 20)
        loss = (module(x) - x[:, :5]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_magnitude_mask_prunes_the_smallest_exactly() -> None:
    weight = torch.tensor([[0.5, -0.1, 0.3], [-0.2, 0.05, 0.4]])
    mask, theta = magnitude_mask(weight, 0.5)
    assert mask.sum() == 3 and theta == pytest.approx(0.2)
    assert (weight.abs()[mask == 1] > theta).all() and (weight.abs()[mask == 0] <= theta).all()


def test_loop_reaches_each_round_target_and_holds_masks() -> None:
    module = _mlp()
    seen: list[tuple[int, float, float]] = []

    def finetune(m: nn.Module, k: int) -> None:
        zeros_before = [(layer.weight_mask == 0).clone() for layer in (m[0], m[2])]
        _train_steps(m)
        m(torch.randn(1, 20))  # the forward pre-hook recomputes weight = weight_orig * mask
        for layer, zeros in zip((m[0], m[2]), zeros_before):
            assert (layer.weight[zeros] == 0).all()  # masked weights stayed zero through training
            seen.append((k, float((layer.weight == 0).float().mean()), layer.weight.numel()))

    rounds = magnitude_prune(module, finetune, PruneConfig(sparsity=0.4, rounds=3))
    for k, fraction, n in seen:
        assert fraction == pytest.approx(round(0.4 * k / 3 * n) / n)
    assert [r.target for r in rounds] == pytest.approx([0.4 / 3, 0.8 / 3, 0.4])
    assert rounds[-1].sparsity_after_finetune == pytest.approx(0.4, abs=0.01)
    assert not hasattr(module[0], "weight_orig")  # made permanent
    assert float((module[0].weight == 0).float().mean()) == pytest.approx(0.4, abs=0.01)


@pytest.mark.parametrize("with_loss", [False, True])
def test_structured_pruning_shrinks_and_keeps_the_forward(with_loss: bool) -> None:
    module = _mlp()
    with torch.no_grad():
        module[0].weight[:10] *= 10  # units 0..9 are clearly the important ones
    group = ChannelGroup("hidden", producers=["0"], consumers=["2"], width=1)
    loss = (lambda m: m(torch.randn(64, 20)).pow(2).sum()) if with_loss else None
    report = structured_prune(module, [group], ratio=0.5, loss=loss)
    assert module[0].weight.shape == (15, 20) and module[0].bias.shape == (15,)
    assert module[2].weight.shape == (5, 15)
    assert set(range(10)) <= set(report.kept["hidden"])
    assert report.removed_params == 15 * 20 + 15 + 5 * 15
    assert module(torch.randn(3, 20)).shape == (3, 5)


def test_structured_pruning_removes_whole_units_of_width() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))  # 4 "heads" of 3
    x = torch.randn(5, 8)
    expected_rows = torch.cat([module[0].weight[3:6], module[0].weight[9:12]])
    with torch.no_grad():
        module[0].weight[[0, 1, 2, 6, 7, 8]] *= 0.01
    report = structured_prune(module, [ChannelGroup("heads", ["0"], ["2"], width=3)], ratio=0.5)
    assert report.kept["heads"] == [1, 3]
    torch.testing.assert_close(module[0].weight, expected_rows)
    assert module(x).shape == (5, 4)
