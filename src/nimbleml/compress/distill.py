"""Knowledge distillation: a small student learns a trained teacher's attention and scores.

The student's loss is ``task + α · L_att + β · T² · KL(softmax(t / T) ‖ softmax(s / T))``:

- ``L_att`` is the paper's formula 3, ``KL(S_teacher ‖ S_student)`` between attention maps:
  every query row of a map is a distribution over keys; the KL is summed over keys and
  averaged over heads, valid (non-padding) query rows and mapped layers.
- Layers: student layer l of L_s learns from teacher layer ``ceil((l + 1) · L_t / L_s) - 1``
  (TinyBERT's uniform mapping: the last student layer always learns from the last teacher layer).
- Heads: when the student has fewer heads (H_t = g · H_s), student head h learns the mean of
  teacher heads ``h·g .. h·g + g - 1`` (a mean of distributions is a distribution); when it
  has more (H_s = g · H_t), teacher head h teaches student heads ``h·g .. h·g + g - 1``;
  otherwise every student head learns the teacher's head-averaged map.
- The score term is Hinton et al.'s soft-target KL over the candidate list, scaled by T² so
  its gradient does not shrink with the temperature.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

EPS = 1e-8  # added inside the logs so masked keys (probability 0 in both maps) contribute 0


@dataclass
class DistillConfig:
    """Weights of the distillation terms beside the task loss."""

    attention_weight: float = 1.0  # α on the attention-map KL (paper formula 3)
    score_weight: float = 1.0  # β on the candidate-score KL
    temperature: float = 2.0  # T of the soft targets (Hinton et al.: 2-4 is typical)

    def to_dict(self) -> dict:
        return asdict(self)


def layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layer index for each student layer (uniform, last aligned with last)."""
    return [math.ceil((layer + 1) * n_teacher / n_student) - 1 for layer in range(n_student)]


def match_heads(teacher: torch.Tensor, n_student_heads: int) -> torch.Tensor:
    """(B, H_t, Lq, L) teacher maps -> (B, H_s, Lq, L) targets for the student's heads."""
    n_teacher_heads = teacher.shape[1]
    if n_teacher_heads == n_student_heads:
        return teacher
    if n_teacher_heads % n_student_heads == 0:
        shape = (teacher.shape[0], n_student_heads, n_teacher_heads // n_student_heads, *teacher.shape[2:])
        return teacher.reshape(shape).mean(dim=2)
    if n_student_heads % n_teacher_heads == 0:
        return teacher.repeat_interleave(n_student_heads // n_teacher_heads, dim=1)
    return teacher.mean(dim=1, keepdim=True).expand(-1, n_student_heads, -1, -1)


def attention_kl(
    teacher_maps: list[torch.Tensor], student_maps: list[torch.Tensor], query_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Formula 3 averaged over the student's layers: maps are (B, H, Lq, L) attention
    probabilities per layer; query_mask (B, Lq) bool marks the rows that count (None = all).
    Zero when the maps are identical, positive otherwise."""
    total = student_maps[0].new_zeros(())
    for student, index in zip(student_maps, layer_map(len(teacher_maps), len(student_maps))):
        teacher = match_heads(teacher_maps[index].detach(), student.shape[1])
        kl = (teacher * (torch.log(teacher + EPS) - torch.log(student + EPS))).sum(-1).mean(1)  # (B, Lq)
        if query_mask is None:
            total = total + kl.mean()
        else:
            total = total + (kl * query_mask).sum() / query_mask.sum().clamp_min(1)
    return total / len(student_maps)


def score_kl(teacher_scores: torch.Tensor, student_scores: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) over the last axis, mean over rows. Scores of
    -inf in the teacher (excluded candidates) are left out of both distributions."""
    keep = torch.isfinite(teacher_scores)
    floor = torch.finfo(student_scores.dtype).min / 4  # finite, so 0·log(0) stays 0
    teacher = torch.where(keep, teacher_scores.detach(), floor) / temperature
    student = torch.where(keep, student_scores, floor) / temperature
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def distillation_loss(
    task: torch.Tensor,
    teacher_maps: list[torch.Tensor],
    student_maps: list[torch.Tensor],
    teacher_scores: torch.Tensor,
    student_scores: torch.Tensor,
    config: DistillConfig,
    query_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The student's total loss and its parts (floats, for logging)."""
    attention = attention_kl(teacher_maps, student_maps, query_mask)
    scores = score_kl(teacher_scores, student_scores, config.temperature)
    total = task + config.attention_weight * attention + config.score_weight * scores
    parts = {"task": task, "attention_kl": attention, "score_kl": scores}
    return total, {name: float(value.detach()) for name, value in parts.items()}
