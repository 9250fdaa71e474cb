"""Training loop for :class:`~nimbleml.rec.model.SeqRec`, with early stopping and checkpoints.

Each user contributes the training part of their sequence (every event but the last two):
the input is events[:-1] of it and the target at every position is the next event, so
the validation and test items never appear as inputs, targets or in negative sampling.
Early stopping watches full-catalogue NDCG@10 on the validation targets; the SASRec paper's
100-sampled-negative NDCG@10 and HR@10 on the same users are logged beside it (not used to select).

Losses (``TrainConfig.loss``):

- ``"ce"``: softmax cross-entropy over the whole catalogue at every position (the default;
  it beats SASRec's one-negative BCE by a wide margin). The logits are computed in chunks
  of rows so the (rows, n_items) matrix stays in cache.
- ``"sampled_softmax"``: softmax over the target and ``n_negatives`` items shared by the
  batch, drawn by popularity (or uniformly), with the logQ correction (subtract log of the sampling
  probability) so the estimate is unbiased for the full softmax.
- ``"bce"``: SASRec's loss, one uniform negative per position, not from the user's
  training sequence.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from nimbleml.errors import NimbleError
from nimbleml.logs import configure_logging
from nimbleml.progress import make_progress
from nimbleml.rec.data import LeaveLastOut, SequenceData, leave_last_out, left_padded
from nimbleml.rec.evaluate import SeqRecScorer, evaluate_full, evaluate_sampled
from nimbleml.rec.model import SeqRec, SeqRecConfig

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class TrainConfig:
    """Optimisation settings. The defaults are the library's: full-softmax cross-entropy, which
    wants a GPU on a large catalogue; ``rec.commands.TRAIN_PRESETS`` holds the settings the CLI
    uses on CPU (2048-negative sampled softmax, 17-minute limit)."""

    epochs: int = 60  # upper bound; early stopping usually ends sooner
    batch_size: int = 128  # user sequences per step
    # optimiser steps an epoch takes at least: on a small log (815 Taobao users = 7 batches) an
    # epoch repeats the data this often, so early stopping judges as much learning as it does
    # on a large one (an Adam parameter moves ~lr per step: 7 steps barely move the repeat bonus);
    # 0 = one pass over the data
    min_steps_per_epoch: int = 0
    lr: float = 1e-3  # Adam learning rate (SASRec: 1e-3)
    # learning rate of the repeat-score parameters (SeqRecConfig.repeat_scores: ~200 bonus
    # scalars and the propensity gate), without weight decay; None = lr, decayed like the rest.
    # At lr an Adam step moves a bonus by ~1e-3, so 2,000 steps leave it near its start
    # (Taobao head: bonuses 0.1-0.4, flat in recency) and recency hardly ranks the past.
    repeat_lr: float | None = None
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    loss: Literal["ce", "sampled_softmax", "bce"] = "ce"
    n_negatives: int = 2048  # shared negatives per batch for sampled_softmax
    # sampled_softmax proposal (logQ-corrected): "popularity" (training counts + 1), "uniform", or
    # "mixed" = half of each. Popularity negatives are the hard ones for full-catalogue ranking;
    # uniform ones keep pushing the long tail down, which is what sampled-negative metrics measure.
    negatives_from: Literal["popularity", "uniform", "mixed"] = "popularity"
    # weight of an auxiliary SASRec BCE term (one uniform negative per position) added to the
    # ce / sampled_softmax loss; 0 = off. It pushes the positive above random long-tail items,
    # which is what the 100-sampled-negative protocol rewards.
    bce_weight: float = 0.0
    ce_chunk_rows: int = 256  # rows of the (rows, n_items) logit matrix computed at once
    # exponential moving average of the weights (Polyak averaging): validation, early stopping
    # and the saved model use the average instead of the last step's weights; 0 = off.
    # 0.999 averages over the last ~1,000 optimiser steps (about 4 epochs of Video.txt).
    # Bias-corrected like Adam's moments (started at zero, divided by 1 - decay^steps): started
    # at the initial weights instead, a 1,200-step run (12 epochs of 100 steps: the Taobao head,
    # the synthetic repeat logs) kept 0.999^1200 = 30% of the random initialisation in the
    # saved model, which shrank the repeat bonuses toward their starting values.
    ema_decay: float = 0.0
    patience: int = 5  # evaluations without a better validation NDCG@10 before stopping
    # learning-rate drops on a plateau (torch's ReduceLROnPlateau on validation NDCG@10): after
    # ``lr_plateau_patience`` + 1 evaluations that do not beat the best by ``lr_plateau_threshold``
    # (absolute), every rate is multiplied by ``lr_plateau_factor``; 1.0 = off (constant rate).
    # The threshold is absolute because EMA weights creep up by ~1e-4 an epoch on a plateau.
    # Video.txt, default preset with factor 0.3: best validation full NDCG@10 0.0628 -> 0.0633,
    # sampled-100 0.5660 -> 0.5679, within the preset's own run-to-run spread, so the preset keeps it off.
    lr_plateau_factor: float = 1.0
    lr_plateau_patience: int = 1
    lr_plateau_threshold: float = 5e-4
    eval_every: int = 1  # epochs between validation evaluations
    max_valid_users: int | None = 10_000  # validation users (random, fixed) per evaluation; None = all
    time_limit_s: float | None = None  # stop after this many seconds of training (None = no limit)
    seed: int = 0  # seeds torch and numpy: same data + config + seed = same model
    threads: int = 2  # torch CPU threads
    device: str | None = None  # "cpu", "cuda", ...; None picks CUDA when available
    # "bf16": torch.autocast to bfloat16 for the step's matmuls (weights, optimiser and loss
    # stay float32), the paper's mixed precision; "fp32" = plain float32
    precision: Literal["fp32", "bf16"] = "fp32"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """What a training run did. history: one dict per evaluated epoch."""

    best_epoch: int  # epoch (1-based) whose weights were kept
    epochs_run: int
    train_seconds: float  # wall-clock time of the whole loop, evaluations included
    history: list[dict] = field(default_factory=list)
    best_valid: dict = field(default_factory=dict)  # validation metrics of the kept weights
    stopped_because: str = ""  # "early stopping", "epochs", "time limit"

    def to_dict(self) -> dict:
        return asdict(self)


def pick_device(device: str | None = None) -> torch.device:
    """The requested device, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class TrainingWindows:
    """Per user, the last ``max_len`` (input, next-item target) pairs of the training part.

    inputs, targets, behaviors: (U, max_len) int64, left-padded; a position is trained when
    its input is not 0. Users with fewer than 2 training events have no pair and are left out.
    """

    inputs: np.ndarray
    targets: np.ndarray
    behaviors: np.ndarray

    @classmethod
    def from_split(cls, split: LeaveLastOut, max_len: int) -> TrainingWindows:
        starts, ends = split.train_offsets[:-1], split.train_offsets[1:]
        keep = (ends - starts) >= 2
        items = left_padded(split.train_items, starts[keep], ends[keep], max_len + 1)
        behaviors = left_padded(split.train_behaviors, starts[keep], ends[keep], max_len + 1)
        return cls(inputs=items[:, :-1], targets=items[:, 1:], behaviors=behaviors[:, :-1])

    def __len__(self) -> int:
        return len(self.inputs)

    def batches(self, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Shuffled batches of row indices, grouped by similar length so padding is trimmed."""
        order = rng.permutation(len(self))
        lengths = (self.inputs != 0).sum(axis=1)
        pool = batch_size * 32
        batches = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]


def _batch_tensors(windows: TrainingWindows, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(inputs, targets, behaviors) of the batch with its all-padding leading columns cut."""
    inputs = windows.inputs[rows]
    width = inputs.shape[1] - int((inputs != 0).any(axis=0).argmax())
    arrays = (inputs, windows.targets[rows], windows.behaviors[rows])
    return tuple(torch.as_tensor(a[:, -width:], device=device) for a in arrays)


@dataclass
class PrefixRepeats:
    """For a repeat-aware model (``SeqRecConfig.repeat_scores``): at every trained position,
    the items of the history so far and how recently each was last seen.

    items, recency, count: (N, T) for the N trained positions of a (B, T) batch: items[n, p] is
    the batch row's input at column p, recency[n, p] = t - p + 1 when column p holds the latest
    occurrence of its item at or before that position t, else 0 (later, padding, or repeated),
    count[n, p] = occurrences of that item in columns 0..t; decayed[n, p] (float32, only with a
    ``gamma``) = Σ gamma^(t - q) over the columns q <= t that hold that item."""

    items: torch.Tensor
    recency: torch.Tensor
    count: torch.Tensor
    decayed: torch.Tensor | None = None
    share: torch.Tensor | None = None  # (N,) float32 repeat share of the history so far (the mixture's gate feature)
    dots: torch.Tensor | None = None  # (N, T) mixture_query(state) · each column's item embedding (set by the loss step)

    def rows(self, rows: slice) -> PrefixRepeats:
        """The same for a slice of the N trained positions."""
        optional = [None if t is None else t[rows] for t in (self.decayed, self.share, self.dots)]
        return PrefixRepeats(self.items[rows], self.recency[rows], self.count[rows], *optional)

    @classmethod
    def from_inputs(cls, inputs: torch.Tensor, mask: torch.Tensor, gamma: torch.Tensor | None = None) -> PrefixRepeats:
        """inputs: (B, T) left-padded ids; mask: (B, T) bool, the trained positions; gamma: the
        model's decay (a scalar tensor; gradients flow into it) for ``decayed``, or None."""
        width = inputs.shape[1]
        column = torch.arange(width, device=inputs.device)
        same = inputs.unsqueeze(2) == inputs.unsqueeze(1)  # (B, p, q): columns p and q hold one item
        later_same = same & (column.view(1, 1, -1) > column.view(1, -1, 1))
        next_same = torch.where(later_same, column.view(1, 1, -1), width).amin(-1)  # (B, T): next column with the item
        t, p = column.view(1, -1, 1), column.view(1, 1, -1)
        valid = (p <= t) & (t < next_same.unsqueeze(1)) & (inputs != 0).unsqueeze(1)  # (B, t, p)
        recency = torch.where(valid, t - p + 1, 0)
        count = torch.where(valid, same.to(torch.int64).cumsum(-1).transpose(1, 2), 0)  # (B, t, p): same items in 0..t
        items = inputs.unsqueeze(1).expand(-1, width, -1)[mask]
        real = inputs != 0
        repeated = (same & (column.view(1, 1, -1) < column.view(1, -1, 1))).any(-1) & real  # (B, T): item seen earlier
        share = repeated.cumsum(1).float() / real.cumsum(1).clamp(min=1).float()
        decayed = None
        if gamma is not None:  # (B, p, q) @ (q, t): Σ_q same[p, q] gamma^(t - q) over q <= t
            age = column.view(-1, 1) - column.view(1, -1)  # (t, q)
            with torch.autocast(inputs.device.type, enabled=False):  # float32 sums under bf16 training too
                powers = torch.where(age >= 0, gamma.float() ** age.clamp(min=0).float(), 0.0)
                sums = (same.float() @ powers.T).transpose(1, 2)  # (B, t, p)
            decayed = torch.where(valid, sums, 0.0)[mask]
        return cls(items=items, recency=recency[mask], count=count[mask], decayed=decayed, share=share[mask])

    def bonus(self, model: SeqRec, states: torch.Tensor) -> torch.Tensor:
        """(N, D) states -> (N, T) repeat bonus of each row's history items."""
        return model.repeat_bonus(states, self.recency, self.count, self.decayed)


def _ce_chunk(model: SeqRec, states: torch.Tensor, targets: torch.Tensor, repeats: PrefixRepeats | None) -> torch.Tensor:
    """Summed cross-entropy of a chunk of rows over the whole catalogue (plus repeat bonuses,
    or the mixture's log-probabilities)."""
    logits = states @ model.item_emb.weight.T
    if repeats is not None and model.mixture_query is not None:
        log_probs = model.mixture_log_probs(
            states, logits, repeats.items, repeats.recency, repeats.count, repeats.decayed, repeats.dots, repeats.share
        )
        return F.nll_loss(log_probs, targets, reduction="sum")
    if repeats is not None:
        bonus = model.repeat_bonus(states, repeats.recency, repeats.count, repeats.decayed)
        logits = logits.scatter_add(1, repeats.items, bonus.to(logits.dtype))
    logits[:, 0] = float("-inf")  # never predict padding
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _ce_loss(
    model: SeqRec, states: torch.Tensor, targets: torch.Tensor, chunk_rows: int, repeats: PrefixRepeats | None = None
) -> torch.Tensor:
    """Full-softmax cross-entropy, the mean over rows, computed chunk by chunk with activation
    checkpointing: each chunk's (rows, n_items) logits are dropped after its forward and
    recomputed in backward, so memory stays at one chunk while the loss is a single graph
    (which DistributedDataParallel needs). ``repeats`` adds the repeat bonus of each row's
    history items to their logits (or, for the mixture, makes the loss its exact NLL)."""
    total = states.new_zeros((), dtype=torch.float32)
    for start in range(0, len(states), chunk_rows):
        rows = slice(start, start + chunk_rows)
        chunk = None if repeats is None else repeats.rows(rows)
        total = total + checkpoint(_ce_chunk, model, states[rows], targets[rows], chunk, use_reentrant=False)
    return total / max(len(states), 1)


def _proposal_log_q(popularity: np.ndarray, negatives_from: str) -> torch.Tensor:
    """(n_items + 1,) float32 log-probability of drawing each item as a sampled-softmax negative
    (-inf for the padding id 0). popularity: (n_items + 1,) training counts."""
    counts = torch.as_tensor(popularity, dtype=torch.float64) + 1.0
    counts[0] = 0.0
    uniform = (counts > 0).double()
    by_popularity, by_uniform = counts / counts.sum(), uniform / uniform.sum()
    q = {"popularity": by_popularity, "uniform": by_uniform, "mixed": 0.5 * (by_popularity + by_uniform)}
    if negatives_from not in q:
        raise NimbleError(f"unknown negatives_from {negatives_from!r}", fix=f"use one of {', '.join(q)}")
    return torch.log(q[negatives_from]).float()


def _sampled_softmax_loss(
    model: SeqRec, states: torch.Tensor, targets: torch.Tensor, n_negatives: int, log_q: torch.Tensor,
    generator: torch.Generator, repeats: PrefixRepeats | None = None, seen_dots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax over the target and shared sampled negatives, logQ-corrected: the negatives'
    exp(s - log q) sum to ``n_negatives`` times the catalogue's partition sum in expectation.

    With ``repeats`` (and ``seen_dots``, (N, T) state · embedding of each history column) the
    target and every other history item enter as exact logits with their bonuses, scaled by
    ``n_negatives`` to the negatives' scale, and the history items' bonus-free sampled copies are
    taken out of the negatives' sum (the item's draw count times its corrected term), so the loss
    tends to the full softmax as the negatives grow. Before, the exact terms stood at
    1/n_negatives of their weight and the copies stayed in: a bonus was rewarded when its item
    was the target but hardly charged when it was not (with 200,000 uniform negatives the
    repeat-gate gradient was -0.64 against the full softmax's -0.39). Without repeats the loss
    is as it was (the target's logit logQ-corrected like a sampled one), the form the default
    preset was tuned with on Video.txt."""
    weight = model.item_emb.weight
    negatives = torch.multinomial(log_q.exp().cpu(), n_negatives, replacement=True, generator=generator)
    negatives = negatives.to(states.device)
    positive = (states * weight[targets]).sum(-1, keepdim=True) - log_q[targets].unsqueeze(1)
    negative = states @ weight[negatives].T - log_q[negatives]
    negative = negative.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
    if repeats is None:
        logits = torch.cat([positive, negative], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.int64, device=states.device))
    bonus = repeats.bonus(model, states)
    is_target = repeats.items == targets.unsqueeze(1)
    log_n = math.log(n_negatives)
    exact = (states * weight[targets]).sum(-1, keepdim=True) + log_n
    positive = exact + (bonus * is_target).sum(-1, keepdim=True)  # only the latest occurrence has a bonus
    other = (repeats.recency == 0) | is_target  # columns that are not another history item
    seen = (seen_dots + bonus + log_n).masked_fill(other, float("-inf"))
    # the history items' sampled copies: draws of the item times its corrected term
    draws = torch.bincount(negatives, minlength=weight.shape[0]).float()[repeats.items]
    # a finite floor, not -inf: logsumexp's gradient is NaN on a row with no finite entry
    copies = torch.where(other | (draws == 0), -1e4, seen_dots - log_q[repeats.items] + torch.log(draws.clamp(min=1.0)))
    sampled = torch.logsumexp(negative.clamp(min=-1e4), dim=1, keepdim=True)  # finite even if every draw was the target
    share = torch.exp(torch.logsumexp(copies, dim=1, keepdim=True) - sampled).clamp(max=1.0 - 1e-6)
    rest = sampled + torch.log1p(-share)  # log of the negatives' sum without the history items
    logits = torch.cat([positive, rest, seen], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.int64, device=states.device))


def _mixture_sampled_loss(
    model: SeqRec, states: torch.Tensor, targets: torch.Tensor, n_negatives: int, log_q: torch.Tensor,
    generator: torch.Generator, repeats: PrefixRepeats, seen_dots: torch.Tensor,
) -> torch.Tensor:
    """The mixture's NLL (``repeat_mode="mixture"``) with the explore normaliser estimated from
    shared logQ-corrected negatives. The repeat channel is exact: its softmax runs over every
    distinct history item of the row. A novel target's explore probability is its exact term
    over the estimate of Σ exp(s) over the items outside the history: the target's exact term
    plus the negatives' corrected sum without the target's draws and without the history items'
    sampled copies (the draw count times the corrected term, as in :func:`_sampled_softmax_loss`),
    so the loss tends to the full-softmax mixture as the negatives grow."""
    weight = model.item_emb.weight
    negatives = torch.multinomial(log_q.exp().cpu(), n_negatives, replacement=True, generator=generator)
    negatives = negatives.to(states.device)
    target_dot = (states * weight[targets]).sum(-1).float()
    negative = (states @ weight[negatives].T).float() - log_q[negatives]
    negative = negative.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
    latest = repeats.recency > 0
    draws = torch.bincount(negatives, minlength=weight.shape[0]).float()[repeats.items]
    copies = torch.where(~latest | (draws == 0), -1e4, seen_dots.float() - log_q[repeats.items] + torch.log(draws.clamp(min=1.0)))
    sampled = torch.logsumexp(negative.clamp(min=-1e4), dim=1)  # finite even if every draw was the target
    share = torch.exp(torch.logsumexp(copies, dim=1) - sampled).clamp(max=1.0 - 1e-6)
    rest = sampled + torch.log1p(-share)  # log of the negatives' sum outside the history
    log_n = math.log(n_negatives)
    log_z = torch.logaddexp(target_dot + log_n, rest) - log_n  # log Σ exp(s) outside the history (estimate)
    gate = model.repeat_gate(states).squeeze(-1).float() + model.repeat_share_weight * repeats.share
    log_explore = target_dot - log_z - F.softplus(gate)
    repeat = (repeats.dots.float() + model.repeat_features(repeats.recency, repeats.count, repeats.decayed).float())
    log_repeat = torch.log_softmax(repeat.masked_fill(~latest, -1e4), -1) - F.softplus(-gate).unsqueeze(-1)
    is_target = latest & (repeats.items == targets.unsqueeze(1))
    log_p = torch.where(is_target.any(-1), log_repeat.masked_fill(~is_target, 0.0).sum(-1), log_explore)
    return -log_p.mean()


def _bce_loss(
    model: SeqRec, states: torch.Tensor, targets: torch.Tensor, sequence: torch.Tensor, mask: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """SASRec's loss: per position one negative drawn uniformly, redrawn (a few times) while
    it is in the user's training window."""
    n_items = model.config.n_items
    negatives = torch.randint(1, n_items + 1, targets.shape, generator=generator, device="cpu").to(targets.device)
    for _ in range(3):
        clash = (negatives.unsqueeze(-1) == sequence.unsqueeze(1)).any(-1)
        redraw = torch.randint(1, n_items + 1, targets.shape, generator=generator, device="cpu").to(targets.device)
        negatives = torch.where(clash, redraw, negatives)
    weight = model.item_emb.weight
    pos = (states * weight[targets]).sum(-1)[mask]
    neg = (states * weight[negatives]).sum(-1)[mask]
    return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + F.binary_cross_entropy_with_logits(
        neg, torch.zeros_like(neg)
    )


class LossStep(nn.Module):
    """The loss of one batch as a module, so DistributedDataParallel can wrap it (it averages
    the gradients of the parameters used in ``forward`` across processes during backward).

    forward(inputs, targets, behaviors): (B, T) int64 each -> scalar mean loss over the
    trained positions; under ``precision="bf16"`` the step runs in torch.autocast (bfloat16
    matmuls, float32 weights, softmax and loss)."""

    def __init__(self, model: SeqRec, config: TrainConfig, log_q: torch.Tensor, generator: torch.Generator):
        super().__init__()
        self.model = model
        self.config = config
        self.log_q = log_q
        self.generator = generator

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, behaviors: torch.Tensor) -> torch.Tensor:
        model, config = self.model, self.config
        mask = inputs != 0
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            hidden = model.encode(inputs, behaviors if model.config.use_behavior else None)
            sequence = torch.cat([inputs, targets[:, -1:]], 1)
            repeats = None
            if model.config.repeat_scores:
                gamma = model.decay_gamma() if model.config.repeat_decay else None
                repeats = PrefixRepeats.from_inputs(inputs, mask, gamma)
                if model.mixture_query is not None:  # (B, T, T) in batch space, then the trained rows
                    repeats.dots = torch.bmm(model.mixture_query(hidden), model.item_emb(inputs).transpose(1, 2))[mask]
            if config.loss == "ce":
                loss = _ce_loss(model, hidden[mask], targets[mask], config.ce_chunk_rows, repeats)
            elif config.loss == "sampled_softmax":
                seen_dots = None
                if repeats is not None:  # (B, T, T) in batch space, then the trained rows
                    seen_dots = torch.bmm(hidden, model.item_emb(inputs).transpose(1, 2))[mask]
                sampled_loss = _mixture_sampled_loss if model.mixture_query is not None else _sampled_softmax_loss
                loss = sampled_loss(
                    model, hidden[mask], targets[mask], config.n_negatives, self.log_q, self.generator, repeats, seen_dots
                )
            else:
                loss = _bce_loss(model, hidden, targets, sequence, mask, self.generator)
            if config.bce_weight > 0 and config.loss != "bce":
                loss = loss + config.bce_weight * _bce_loss(model, hidden, targets, sequence, mask, self.generator)
        return loss.float()


def process_group() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_process_group() -> None:
    """Join the process group the environment describes (torchrun's RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT): NCCL when CUDA is available, else gloo."""
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _local_worker(rank: int, world: int, port: int, function: Callable[..., object], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    if rank == 0:
        configure_logging(verbose=False)
    else:
        logging.disable(logging.INFO)  # one process reports
    init_process_group()
    try:
        function(*args)
    finally:
        dist.destroy_process_group()


def launch_local(function: Callable[..., object], nproc: int, *args: object) -> None:
    """Run ``function(*args)`` in ``nproc`` processes on this machine, joined in one process
    group on 127.0.0.1 (what ``torchrun --nproc-per-node N`` does); returns when all finish."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_local_worker, args=(nproc, port, function, args), nprocs=nproc, join=True)


def _from_rank0(value: object) -> object:
    """Rank 0's value on every process (itself when not distributed)."""
    if process_group()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _swap_in(params: list[torch.Tensor], values: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    """Copy ``values`` into ``params``; returns the values they held (None: nothing to swap)."""
    if values is None:
        return None
    with torch.no_grad():
        held = [p.detach().clone() for p in params]
        for p, value in zip(params, values):
            p.copy_(value)
    return held


def _debiased(averaged: list[torch.Tensor] | None, decay: float, n_steps: int) -> list[torch.Tensor] | None:
    """The bias-corrected moving average (Adam's correction): the zero-started average divided
    by 1 - decay^n_steps, a weighted mean of the weights after each step. None: no averaging."""
    if averaged is None or n_steps == 0:
        return None
    correction = 1.0 - decay**n_steps
    return [mean / correction for mean in averaged]


def _param_groups(model: SeqRec, config: TrainConfig) -> list[dict]:
    """AdamW parameter groups: everything at ``lr``, or with ``repeat_lr`` the repeat-score
    parameters in a group of their own (that rate, no weight decay)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    repeat = [p for n, p in named if n.startswith("repeat_")]
    if config.repeat_lr is None or not repeat:
        return [{"params": [p for _, p in named]}]
    rest = [p for n, p in named if not n.startswith("repeat_")]
    return [{"params": rest}, {"params": repeat, "lr": config.repeat_lr, "weight_decay": 0.0}]


def train(model: SeqRec, data: SequenceData, config: TrainConfig | None = None) -> TrainResult:
    """Fit ``model`` on the training part of ``data``; keeps the weights of the epoch with the
    best validation NDCG@10 (full catalogue) and returns what happened.

    Inside an initialised torch.distributed process group (``rec train --nproc N`` or
    torchrun) every process takes its share of each batch and DistributedDataParallel
    averages the gradients, so N processes take the same steps on the same batches as one;
    rank 0 evaluates and decides when to stop, and every process keeps the same weights."""
    config = config or TrainConfig()
    if config.precision not in ("fp32", "bf16"):
        raise NimbleError(f"unknown precision {config.precision!r}", fix="use fp32 or bf16")
    if config.loss not in ("ce", "sampled_softmax", "bce"):
        raise NimbleError(f"unknown loss {config.loss!r}", fix="use ce, sampled_softmax or bce")
    if not 0.0 <= config.ema_decay < 1.0:
        raise NimbleError(f"ema_decay {config.ema_decay} is not in [0, 1)", fix="use 0 (off) or e.g. 0.999")
    if not 0.0 < config.lr_plateau_factor <= 1.0:
        raise NimbleError(f"lr_plateau_factor {config.lr_plateau_factor} is not in (0, 1]", fix="use 1.0 (off) or e.g. 0.3")
    if config.repeat_lr is not None and not config.repeat_lr > 0:
        raise NimbleError(f"repeat_lr {config.repeat_lr} is not > 0", fix="use None (= lr) or e.g. 0.01")
    if config.loss == "bce" and model.config.repeat_scores:
        raise NimbleError("the bce loss does not train repeat scores", fix="use ce or sampled_softmax, or repeat_scores=False")
    if data.n_items != model.config.n_items:
        raise NimbleError(
            f"data has {data.n_items} items but the model was built for {model.config.n_items}",
            fix="build the model from this data's n_items",
        )
    rank, world = process_group()
    torch.set_num_threads(max(1, config.threads // world) if world > 1 else config.threads)
    torch.manual_seed(config.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    rng = np.random.default_rng(config.seed)  # the same batches on every process
    generator = torch.Generator().manual_seed(config.seed)
    device = pick_device(config.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    model.to(device)
    max_len = model.config.max_len

    split = leave_last_out(data, max_len=max_len)
    windows = TrainingWindows.from_split(split, max_len)
    if len(windows) == 0:
        raise NimbleError("no user has 2 training events", fix="prepare with min_events >= 4")
    valid_users = np.arange(data.n_users)
    if config.max_valid_users is not None and data.n_users > config.max_valid_users:
        valid_users = np.sort(rng.choice(data.n_users, size=config.max_valid_users, replace=False))
    valid_behaviors = split.valid_behaviors[valid_users] if model.config.use_behavior else None
    # every item each validation user saw before the validation target (sampled negatives avoid them)
    valid_seen = [data.items[data.offsets[u] : data.offsets[u + 1] - 2] for u in valid_users]
    track_sampled = data.n_items - 1 - max((len(np.unique(s)) for s in valid_seen), default=0) >= 100
    log_q = _proposal_log_q(data.item_popularity(), config.negatives_from).to(device)

    step = LossStep(model, config, log_q, generator)
    if world > 1:
        step = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(config.seed + rank)  # dropout differs per process, like separate batch rows
    optimizer = torch.optim.AdamW(_param_groups(model, config), lr=config.lr, weight_decay=config.weight_decay)
    plateau = None
    if config.lr_plateau_factor < 1.0:
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=config.lr_plateau_factor, patience=config.lr_plateau_patience,
            threshold=config.lr_plateau_threshold, threshold_mode="abs",
        )
    params = [p for p in model.parameters() if p.requires_grad]
    averaged = [torch.zeros_like(p) for p in params] if config.ema_decay > 0 else None
    n_steps = 0  # optimiser steps taken: the average's bias correction
    scorer = SeqRecScorer(model, device=device)
    result = TrainResult(best_epoch=0, epochs_run=0, train_seconds=0.0, best_valid={"ndcg@10": -1.0})
    best_state: dict[str, torch.Tensor] | None = None
    since_best = 0
    log.info(
        "training %s on %d sequences (%d users, %d items), loss=%s, precision=%s, device=%s, process %d of %d",
        type(model).__name__, len(windows), data.n_users, data.n_items, config.loss, config.precision, device,
        rank + 1, world,
    )
    def _validate(epoch: int, loss: float) -> tuple[bool, float]:
        """Evaluate on the validation users, log and record it -> (best so far?, NDCG@10)."""
        valid = evaluate_full(
            scorer, split.valid_input[valid_users], split.valid_target[valid_users], valid_behaviors,
            exclude_history=model.config.exclude_history, ks=(10,),
        ).to_dict()
        sampled: dict = {"hr@10": None, "ndcg@10": None}  # catalogue too small for 100 negatives
        if track_sampled:
            sampled = evaluate_sampled(
                scorer, split.valid_input[valid_users], split.valid_target[valid_users], data.n_items,
                valid_behaviors, max_users=None, seed=config.seed, seen=valid_seen,
                exclude_history=model.config.exclude_history,
            ).to_dict()
        row = {"epoch": epoch, "loss": loss, "seconds": time.perf_counter() - start, "lr": optimizer.param_groups[0]["lr"]}
        row.update({f"valid_{k}": v for k, v in valid.items() if k != "n_users"})
        row.update({f"valid_sampled100_{k}": sampled[k] for k in ("hr@10", "ndcg@10")})
        result.history.append(row)
        log.info(
            "epoch %d: loss %.4f, valid ndcg@10 %.4f hr@10 %.4f, sampled-100 ndcg@10 %s (%.0f s)",
            epoch, row["loss"], valid["ndcg@10"], valid["hr@10"],
            "n/a" if sampled["ndcg@10"] is None else f"{sampled['ndcg@10']:.4f}", row["seconds"],
        )
        improved = valid["ndcg@10"] > result.best_valid["ndcg@10"]
        if improved:
            result.best_valid = valid
        return improved, valid["ndcg@10"]

    start = time.perf_counter()
    with make_progress() as progress:
        n_batches = math.ceil(len(windows) / config.batch_size)
        passes = max(1, math.ceil(config.min_steps_per_epoch / max(n_batches, 1)))  # data passes per epoch
        task = progress.add_task("training", total=config.epochs * n_batches * passes, info="")
        for epoch in range(1, config.epochs + 1):
            model.train()
            epoch_loss, epoch_rows = 0.0, 0
            batches = [rows for _ in range(passes) for rows in windows.batches(config.batch_size, rng)]
            for rows in batches:
                if len(rows) < world:  # every process needs rows; all skip the same batches
                    continue
                inputs, targets, behaviors = _batch_tensors(windows, rows[rank::world], device)
                optimizer.zero_grad(set_to_none=True)
                loss = step(inputs, targets, behaviors)
                loss.backward()
                optimizer.step()
                n_steps += 1
                with torch.no_grad():
                    model.item_emb.weight[0].zero_()
                    if averaged is not None:
                        for mean, p in zip(averaged, params):
                            mean.lerp_(p.detach(), 1.0 - config.ema_decay)
                n_rows = int((inputs != 0).sum())
                epoch_loss += float(loss.detach()) * n_rows
                epoch_rows += n_rows
                progress.update(task, advance=1, info=f"epoch {epoch} loss {epoch_loss / max(epoch_rows, 1):.3f}")
            result.epochs_run = epoch
            elapsed = time.perf_counter() - start
            out_of_time = _from_rank0(config.time_limit_s is not None and elapsed > config.time_limit_s)
            if epoch % config.eval_every and epoch != config.epochs and not out_of_time:
                continue
            raw = _swap_in(params, _debiased(averaged, config.ema_decay, n_steps))  # validate (and keep) the averaged weights
            improved, score = _from_rank0(_validate(epoch, epoch_loss / max(epoch_rows, 1)) if rank == 0 else None)
            if plateau is not None:
                plateau.step(score)  # on every process, so the rates stay equal
            if improved:
                result.best_epoch, since_best = epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
            _swap_in(params, raw)
            if since_best >= config.patience:
                result.stopped_because = "early stopping"
                break
            if out_of_time:
                result.stopped_because = "time limit"
                break
        else:
            result.stopped_because = "epochs"
    if world > 1:
        # release DistributedDataParallel (its reducer holds the process group) on every process
        # at one synchronised point, not whenever a collector finds its reference cycles: rank 1
        # of the 2-process test died with SIGABRT ("terminate called without an active
        # exception", from a C++ thread) in a few runs in a hundred, once in CI
        del step
        gc.collect()
        dist.barrier()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.train_seconds = time.perf_counter() - start
    (log.info if rank == 0 else log.debug)(  # the other processes never validated
        "stopped after %d epochs (%s); best epoch %d, valid ndcg@10 %.4f, %.0f s",
        result.epochs_run, result.stopped_because, result.best_epoch, result.best_valid["ndcg@10"], result.train_seconds,
    )
    return result


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(model: SeqRec, config_dict: dict, directory: str | Path) -> Path:
    """Write ``model.safetensors`` (weights) and ``config.json`` ({"model": SeqRecConfig, **config_dict})."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / MODEL_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps({"model": model.config.to_dict(), **config_dict}, indent=2) + "\n")
    return directory


def load_checkpoint(directory: str | Path, device: str | torch.device | None = "cpu") -> SeqRec:
    """Rebuild a :class:`SeqRec` from what :func:`save_checkpoint` wrote; NimbleError if missing or broken."""
    directory = Path(directory)
    weights, config_path = directory / MODEL_FILE, directory / CONFIG_FILE
    for required in (weights, config_path):
        if not required.is_file():
            raise NimbleError("checkpoint file not found", path=required, fix="train a model with `nimbleml rec train`")
    try:
        config = SeqRecConfig(**json.loads(config_path.read_text())["model"])
    except (ValueError, KeyError, TypeError) as exc:
        raise NimbleError(f"bad model config ({exc})", path=config_path, fix="re-train or restore config.json") from exc
    model = SeqRec(config)
    try:
        model.load_state_dict(load_file(weights))
    except (RuntimeError, OSError) as exc:
        raise NimbleError(f"weights do not match the config ({exc})", path=weights, fix="re-train the model") from exc
    return model.to(pick_device(None) if device is None else device).eval()
