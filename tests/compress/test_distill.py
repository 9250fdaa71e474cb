"""Distillation losses: attention KL is zero for identical maps and positive otherwise;
layer and head mapping; the score KL."""

from __future__ import annotations

import torch

from nimbleml.compress.distill import DistillConfig, attention_kl, distillation_loss, layer_map, match_heads, score_kl


def _maps(heads: int, seed: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    logits = torch.randn(3, heads, 6, 6, generator=torch.Generator().manual_seed(seed))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def test_attention_kl_zero_for_identical_positive_otherwise() -> None:
    causal = torch.ones(6, 6, dtype=torch.bool).tril()  # masked keys have probability 0
    teacher = [_maps(2, 0, causal), _maps(2, 1, causal)]
    assert attention_kl(teacher, [m.clone() for m in teacher]) == 0
    student = [_maps(2, 2, causal), _maps(2, 3, causal)]
    assert attention_kl(teacher, student) > 0
    rows = torch.zeros(3, 6, dtype=torch.bool)
    rows[:, -1] = True  # only the last query row counts
    assert attention_kl(teacher, student, rows) > 0


def test_layer_and_head_mapping() -> None:
    assert layer_map(2, 2) == [0, 1] and layer_map(2, 1) == [1] and layer_map(4, 2) == [1, 3] and layer_map(3, 2) == [1, 2]
    teacher = _maps(4, 0)
    two = match_heads(teacher, 2)
    torch.testing.assert_close(two[:, 0], teacher[:, :2].mean(1))
    torch.testing.assert_close(two.sum(-1), torch.ones(3, 2, 6))
    assert match_heads(_maps(2, 0), 4).shape == (3, 4, 6, 6)
    assert match_heads(_maps(3, 0), 2).shape == (3, 2, 6, 6)
    # a one-layer, one-head student learns the last teacher layer's head-averaged map
    student = [match_heads(teacher, 1)]
    assert attention_kl([_maps(4, 9), teacher], student) == 0


def test_score_kl_and_total_loss() -> None:
    teacher = torch.randn(4, 50)
    assert score_kl(teacher, teacher.clone()) == 0
    assert score_kl(teacher, torch.randn(4, 50)) > 0
    masked = teacher.clone()
    masked[:, 3] = float("-inf")
    assert torch.isfinite(score_kl(masked, torch.randn(4, 50)))
    maps = [_maps(2, 0)]
    total, parts = distillation_loss(torch.tensor(1.5), maps, maps, teacher, teacher, DistillConfig())
    assert float(total) == 1.5 and parts == {"task": 1.5, "attention_kl": 0.0, "score_kl": 0.0}
