"""The recommender side of compression: task loss, fine-tuning, calibration, quality, recipes.

``compress`` is domain-agnostic (modules and callables); this module ties it to
:class:`~nimbleml.rec.model.SeqRec`. Every recipe takes a trained model and returns a smaller
or faster one, fine-tuned on the task loss where it changed the weights; recipes chain
(``distill`` then ``quantize-static``) and :func:`compress_model` writes a model folder:

- ``config.json`` + ``model.safetensors`` (what ``rec.train.load_checkpoint`` reads; the
  config carries the lightweight-attention switches and structured sizes), plus the parent's
  training settings, so a compressed folder can be compressed again;
- ``variant.json``: recipes, per-recipe report and build seconds, parameter counts, parent
  folder and the 50-candidate quality on validation users before and after;
- ``model.onnx`` for the int8 recipes: the quantised serving graph (``ServingRanker``)
  the runtimes load (``variant.json``: ``"onnx": "model.onnx", "precision": "int8"``).

Fine-tuning reuses ``rec.train.train`` (sampled softmax with the parent's settings, a lower
learning rate, a time limit checked after each epoch, the best validation epoch kept).
Quality is the serving task of ``rec.evaluate.evaluate_candidates`` on validation targets,
so the test targets stay untouched for the benchmark.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from nimbleml.compress.distill import DistillConfig, distillation_loss
from nimbleml.compress.prune import ChannelGroup, PruneConfig, magnitude_prune, structured_prune
from nimbleml.compress.quantize import (
    quantization_aware_training,
    quantize_dynamic_onnx,
    quantize_static_onnx,
    weight_error_steps,
)
from nimbleml.environment import environment
from nimbleml.errors import NimbleError
from nimbleml.rec.data import LeaveLastOut, SequenceData, leave_last_out
from nimbleml.rec.evaluate import SeqRecScorer, evaluate_candidates, evaluate_full
from nimbleml.rec.model import GroupedLinear, LowRankLinear, SeqRec, SeqRecConfig, ServingRanker
from nimbleml.rec.train import (
    CONFIG_FILE,
    MODEL_FILE,
    TrainConfig,
    TrainingWindows,
    _batch_tensors,
    _proposal_log_q,
    _sampled_softmax_loss,
    load_checkpoint,
    pick_device,
    save_checkpoint,
    train,
)
from nimbleml.runtime.backends import get_backend
from nimbleml.runtime.export import check_onnx_file, export_onnx

log = logging.getLogger(__name__)

VARIANT_FILE = "variant.json"
ONNX_FILE = "model.onnx"
# ops int8 recipes quantise: the matrix products and the embedding tables. The attention and
# history masks (Where) carry -inf, which has no int8 range, so they stay float.
INT8_OPS = ["MatMul", "Gemm", "Gather"]
HISTORY_WIDTH = 100  # events per request in the serving contract (the graphs' widest history)
# the graphs' history axis is dynamic up to HISTORY_WIDTH, so callers may trim columns that are
# padding in every row of a batch (runtime.padding; exact: padding keys are masked)
SEQUENCE_DIMS = {"history": {1: ("events", HISTORY_WIDTH)}, "behaviors": {1: ("events", HISTORY_WIDTH)}}
# the candidate axis is dynamic too, so the very graph a row serves can score the whole catalogue
# (`bench rec`'s full-catalogue NDCG@10 per row, int8 graphs included); never trimmed
CANDIDATE_DIMS = {"candidates": {1: ("candidates", 2**20)}}


@dataclass
class CompressConfig:
    """Recipe settings and budgets. The defaults keep every variant of ``bench rec --variants
    all`` on the default preset (Amazon Video Games) within about 15 minutes on 2 cores."""

    finetune_seconds: float = 60.0  # per fine-tune; checked after each epoch over finetune_users
    # users (a fresh random subset per fine-tune) so the limit bites every few seconds; None = all users
    finetune_users: int | None = 8000
    finetune_lr: float = 3e-4  # Adam learning rate when fine-tuning (training used 1e-3)
    prune_sparsity: float = 0.4  # unstructured: fraction of each layer's weights zeroed (paper: 40%)
    prune_rounds: int = 3  # unstructured: prune -> fine-tune rounds (paper: K = 3), each finetune_seconds
    structured_ratio: float = 0.5  # structured: fraction of heads and of FFN neurons removed per block
    head_rank: int = 8  # lowrank: rank of each head's Q/K/V projection (head width 32 on the default preset)
    qkv_groups: int = 2  # grouped: block-diagonal groups of the Q/K/V and output projections
    attention_window: int = 16  # local: events a query sees (plus the global ones)
    n_global: int = 2  # local: the user's first events every query still sees
    student_fraction: float = 0.2  # distill: student parameters / teacher parameters (paper: 32M -> 6.4M)
    student_dim: int | None = None  # distill: the student's width; None = the width that meets student_fraction
    distill_seconds: float = 240.0  # distill: training time limit, checked after each batch
    distill_batch_size: int = 128  # distill: user sequences per step
    distill_lr: float = 2e-3  # distill: Adam learning rate (the student starts mostly from scratch)
    distill_negatives: int = 255  # distill: shared popularity negatives beside each target in the score KL
    distill: DistillConfig = field(default_factory=DistillConfig)
    calibration_users: int = 512  # static int8: training histories used to calibrate activation ranges
    calibration_batch: int = 64  # static int8: users per calibration batch
    valid_users: int = 5000  # validation users for the before/after quality (random, fixed by seed)
    finetune_valid_users: int = 2000  # validation users the fine-tuning epochs select on
    seed: int = 0
    threads: int = 2  # torch CPU threads

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RecipeContext:
    """What every recipe may use: the data and its split, the settings, and where to write."""

    data: SequenceData
    split: LeaveLastOut
    config: CompressConfig
    train_config: TrainConfig  # the parent's training settings, the base of every fine-tune
    workdir: Path  # scratch folder for intermediate files
    onnx_path: Path | None = None  # set by an int8 recipe: the quantised graph
    n_finetunes: int = 0  # fine-tunes run so far (each draws its own user subset)
    report: dict = field(default_factory=dict)  # the running recipe's details for variant.json


# ---------------------------------------------------------------- task loss, fine-tuning, data


def count_parameters(model: nn.Module) -> dict[str, int]:
    """total, nonzero, and the split between embedding tables and the rest (the encoder)."""
    params = list(model.parameters())
    embeddings = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    total = sum(p.numel() for p in params)
    return {
        "total": total,
        "nonzero": int(sum(int((p != 0).sum()) for p in params)),
        "embedding": embeddings,
        "encoder": total - embeddings,
    }


def finetune(model: SeqRec, context: RecipeContext) -> dict:
    """Fine-tune on the task loss with the parent's training settings, a lower learning rate
    and a time limit; keeps the best validation epoch. Returns a summary for variant.json."""
    config = context.config
    train_config = replace(
        context.train_config, lr=config.finetune_lr, epochs=1000, patience=2, eval_every=1,
        time_limit_s=config.finetune_seconds,
        max_valid_users=config.finetune_valid_users, seed=config.seed, threads=config.threads,
    )
    data = context.data
    if config.finetune_users is not None and data.n_users > config.finetune_users:
        rng = np.random.default_rng([config.seed, context.n_finetunes])
        data = user_subset(data, np.sort(rng.choice(data.n_users, size=config.finetune_users, replace=False)))
    context.n_finetunes += 1
    result = train(model, data, train_config)
    return {
        "epochs": result.epochs_run, "seconds": round(result.train_seconds, 1),
        "valid_full_ndcg@10": result.best_valid.get("ndcg@10"), "stopped_because": result.stopped_because,
    }


def user_subset(data: SequenceData, users: np.ndarray) -> SequenceData:
    """The sequences of ``users`` (sorted indices) with the same catalogue: each user's split
    depends on that user's events only, so a subset leaks nothing."""
    starts, ends = data.offsets[users], data.offsets[users + 1]
    events = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])
    return replace(
        data, offsets=np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64), items=data.items[events],
        behaviors=data.behaviors[events], categories=data.categories[events], timestamps=data.timestamps[events],
        user_ids=data.user_ids[users],
    )


def sample_candidates(rng: np.random.Generator, popularity: np.ndarray, n_rows: int, n: int = 50) -> np.ndarray:
    """(n_rows, n) candidate ids drawn in proportion to training popularity (calibration inputs)."""
    weights = popularity.astype(np.float64).copy()
    weights[0] = 0.0
    return rng.choice(len(weights), size=(n_rows, n), p=weights / weights.sum())


def _serving_width(rows: np.ndarray) -> np.ndarray:
    """(B, L) -> (B, HISTORY_WIDTH) int64: the last events, left-padded with 0."""
    rows = np.asarray(rows, dtype=np.int64)[:, -HISTORY_WIDTH:]
    return np.pad(rows, ((0, 0), (HISTORY_WIDTH - rows.shape[1], 0)))


def serving_inputs(
    config: SeqRecConfig, history: np.ndarray, candidates: np.ndarray, behaviors: np.ndarray | None
) -> dict[str, np.ndarray]:
    """The serving contract's named inputs: history (B, 100), candidates (B, C), and
    behaviors (B, 100) when the model uses them (the model itself keeps the last max_len)."""
    inputs = {"history": _serving_width(history), "candidates": np.asarray(candidates, dtype=np.int64)}
    if config.use_behavior:
        inputs["behaviors"] = _serving_width(behaviors)
    return inputs


def calibration_batches(model: SeqRec, context: RecipeContext) -> Iterator[dict[str, np.ndarray]]:
    """Training histories (the last max_len training events of random users) with popularity
    candidates: activation ranges come from training data, never validation or test."""
    config = context.config
    windows = TrainingWindows.from_split(context.split, model.config.max_len)
    rng = np.random.default_rng(config.seed)
    rows = rng.choice(len(windows), size=min(config.calibration_users, len(windows)), replace=False)
    popularity = context.data.item_popularity()
    for start in range(0, len(rows), config.calibration_batch):
        batch = rows[start : start + config.calibration_batch]
        candidates = sample_candidates(rng, popularity, len(batch))
        yield serving_inputs(model.config, windows.inputs[batch], candidates, windows.behaviors[batch])


def export_serving(model: SeqRec, path: Path) -> Path:
    """ONNX of the serving-shaped forward, inputs named by the serving contract; dynamic batch,
    history and candidate axes."""
    ones = np.ones((2, HISTORY_WIDTH), dtype=np.int64)
    example = serving_inputs(model.config, ones, ones[:, :50], ones)
    return export_onnx(ServingRanker(model).eval(), {k: torch.as_tensor(v) for k, v in example.items()}, path,
                       dynamic_dims={**SEQUENCE_DIMS, **CANDIDATE_DIMS})


class OnnxScorer:
    """An ONNX serving graph as a ``rec.evaluate`` scorer (50-candidate protocol only)."""

    def __init__(self, path: Path, config: SeqRecConfig, backend: str = "onnxruntime"):
        self.runner = get_backend(backend).load(path)
        self.config = config

    def score(self, history: np.ndarray, candidates: np.ndarray, behaviors: np.ndarray | None = None) -> np.ndarray:
        return self.runner.predict(serving_inputs(self.config, history, candidates, behaviors))

    def score_all(self, history: np.ndarray, behaviors: np.ndarray | None = None) -> np.ndarray:
        raise NimbleError("an ONNX serving graph scores candidate lists only", fix="use the 50-candidate protocol")


def validation_quality(model: SeqRec, context: RecipeContext, onnx_path: Path | None = None) -> dict:
    """HR@10, NDCG@10 and MRR of the 50-candidate task on ``valid_users`` validation users
    (torch, or the ONNX graph when given); the same users and candidates for every variant."""
    data, split, config = context.data, context.split, context.config
    rng = np.random.default_rng(config.seed)
    users = np.arange(data.n_users)
    if data.n_users > config.valid_users:
        users = np.sort(rng.choice(data.n_users, size=config.valid_users, replace=False))
    seen = [data.items[data.offsets[u] : data.offsets[u + 1] - 2] for u in users]
    behaviors = split.valid_behaviors[users] if model.config.use_behavior else None
    scorer = SeqRecScorer(model) if onnx_path is None else OnnxScorer(onnx_path, model.config)
    result = evaluate_candidates(
        scorer, split.valid_input[users], split.valid_target[users], data.item_popularity(), behaviors,
        seed=config.seed, seen=seen,
    )
    return result.to_dict()


# ---------------------------------------------------------------- recipes


class Recipe(ABC):
    """One compression step: SeqRec in, SeqRec out (and, for int8, an ONNX graph)."""

    name: str
    int8 = False  # writes the quantised ONNX graph: must be the last recipe of a chain

    @abstractmethod
    def apply(self, model: SeqRec, context: RecipeContext) -> SeqRec:
        """Return the compressed model; put details for variant.json in ``context.report``."""


def _rebuilt(model: SeqRec, **changes: object) -> SeqRec:
    """A SeqRec with a changed config and every parameter whose name and shape still match copied."""
    new = SeqRec(SeqRecConfig(**{**model.config.to_dict(), **changes}))
    state = new.state_dict()
    state.update({k: v for k, v in model.state_dict().items() if k in state and state[k].shape == v.shape})
    new.load_state_dict(state)
    return new


def _block_linears(model: SeqRec) -> list[str]:
    return [f"blocks.{name}" for name, m in model.blocks.named_modules() if isinstance(m, nn.Linear)]


class PruneRecipe(Recipe):
    """The paper's loop: per layer (every Linear of the blocks and the item table), K rounds
    of magnitude threshold + mask + fine-tune, 40% in the end; zeros stay dense."""

    name = "prune"

    def apply(self, model: SeqRec, context: RecipeContext) -> SeqRec:
        config = context.config
        tunes: list[dict] = []
        rounds = magnitude_prune(
            model, lambda m, k: tunes.append(finetune(m, context)),
            PruneConfig(sparsity=config.prune_sparsity, rounds=config.prune_rounds),
            layer_names=_block_linears(model) + ["item_emb"],
        )
        context.report["rounds"] = [
            {"round": r.round, "target": r.target, "sparsity": round(r.sparsity_after_finetune, 4),
             "max_threshold": round(max(r.thresholds.values()), 6), "finetune": t}
            for r, t in zip(rounds, tunes)
        ]
        return model


def task_loss(model: SeqRec, context: RecipeContext, n_users: int = 512) -> torch.Tensor:
    """The training loss (sampled softmax with the parent's negatives) on a fixed sample of
    training windows: the loss structured pruning's Taylor importance differentiates."""
    windows = TrainingWindows.from_split(context.split, model.config.max_len)
    rng = np.random.default_rng(context.config.seed)
    rows = np.sort(rng.choice(len(windows), size=min(n_users, len(windows)), replace=False))
    device = next(model.parameters()).device
    inputs, targets, behaviors = _batch_tensors(windows, rows, device)
    mask = inputs != 0
    hidden = model.encode(inputs, behaviors if model.config.use_behavior else None)
    log_q = _proposal_log_q(context.data.item_popularity(), context.train_config.negatives_from).to(device)
    generator = torch.Generator().manual_seed(context.config.seed)
    return _sampled_softmax_loss(
        model, hidden[mask], targets[mask], context.train_config.n_negatives, log_q, generator
    )


class StructuredPruneRecipe(Recipe):
    """Whole heads and FFN neurons out by first-order Taylor importance on the task loss; the
    matrices shrink and the per-block sizes go into the config; then fine-tune."""

    name = "prune-structured"

    def apply(self, model: SeqRec, context: RecipeContext) -> SeqRec:
        if model.config.qkv_groups > 1 or model.config.head_rank:
            raise NimbleError("structured pruning needs dense Q/K/V projections",
                              fix="run prune-structured before grouped or lowrank")
        groups = []
        for b in range(model.config.n_blocks):
            prefix = f"blocks.{b}"
            groups.append(ChannelGroup(
                f"{prefix}.heads", [f"{prefix}.attn.{p}" for p in "qkv"], [f"{prefix}.attn.proj"],
                width=model.config.head_width,
            ))
            groups.append(ChannelGroup(f"{prefix}.ffn", [f"{prefix}.ffn.0"], [f"{prefix}.ffn.3"]))
        report = structured_prune(model, groups, context.config.structured_ratio, lambda m: task_loss(m, context))
        sizes = {
            "block_heads": [len(report.kept[f"blocks.{b}.heads"]) for b in range(model.config.n_blocks)],
            "block_ffn": [len(report.kept[f"blocks.{b}.ffn"]) for b in range(model.config.n_blocks)],
            "head_dim": model.config.head_width,
        }
        shrunk = SeqRec(SeqRecConfig(**{**model.config.to_dict(), **sizes}))
        shrunk.load_state_dict(model.state_dict())  # shapes must match the new config exactly
        context.report.update(sizes=sizes, importance=report.importance, removed_params=report.removed_params,
                              finetune=finetune(shrunk, context))
        return shrunk


class LowRankRecipe(Recipe):
    """Per-head rank-r Q/K/V projections, initialised from the trained ones by truncated SVD
    (W_h ≈ U_r S_r V_rᵀ: down = S_r^½ V_rᵀ, up = U_r S_r^½), then fine-tuned."""

    name = "lowrank"

    def apply(self, model: SeqRec, context: RecipeContext) -> SeqRec:
        rank = context.config.head_rank
        new = _rebuilt(model, head_rank=rank)
        energy = []
        with torch.no_grad():
            for old_block, new_block in zip(model.blocks, new.blocks):
                for name in "qkv":
                    dense, low = getattr(old_block.attn, name), getattr(new_block.attn, name)
                    energy.append(_svd_init(dense, low, new_block.attn.n_heads, rank))
        context.report.update(rank=rank, svd_energy_kept=round(float(np.mean(energy)), 4),
                              finetune=finetune(new, context))
        return new


def _svd_init(dense: nn.Linear, low: LowRankLinear, heads: int, rank: int) -> float:
    """Fill ``low`` with the rank-r truncation of each head's rows of ``dense``; returns the
    share of squared singular values kept (1.0 = exact)."""
    head_dim = dense.out_features // heads
    kept, total = 0.0, 0.0
    for h in range(heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        u, s, vt = torch.linalg.svd(dense.weight[rows], full_matrices=False)
        root = s[:rank].sqrt()
        low.down.weight[h * rank : (h + 1) * rank] = root[:, None] * vt[:rank]
        low.up.weight[h] = (u[:, :rank] * root).T
        kept, total = kept + float(s[:rank].pow(2).sum()), total + float(s.pow(2).sum())
    low.up.bias.copy_(dense.bias)
    return kept / max(total, 1e-12)


def _grouped_init(dense: nn.Linear, grouped: GroupedLinear) -> None:
    """Keep the block-diagonal part of a trained dense matrix."""
    g = grouped.groups
    rows, cols = dense.out_features // g, dense.in_features // g
    for i in range(g):
        grouped.weight[i] = dense.weight[i * rows : (i + 1) * rows, i * cols : (i + 1) * cols].T
    grouped.bias.copy_(dense.bias)


class GroupedRecipe(Recipe):
    """Grouped Q/K/V and output projections (k groups), from the block-diagonal part of the
    trained matrices, then fine-tuned."""

    name = "grouped"

    def apply(self, model: SeqRec, context: RecipeContext) -> SeqRec:
        groups = context.config.qkv_groups
        new = _rebuilt(model, qkv_groups=groups)
        with torch.no_grad():
            for old_block, new_block in zip(model.blocks, new.blocks):
                for name in ("q", "k", "v", "proj"):
                    _grouped_init(getattr(old_block.attn, name), getattr(new_block.attn, name))
        context.report.update(groups=groups, finetune=finetune(new, context))
        return new


class LocalRecipe(Recipe):
    """Local-window attention plus the user's first events as global positions; same weights, fine-tuned."""

    name = "local"

    def apply(self, model: SeqRec, context: RecipeContext) -> SeqRec:
        config = context.config
        new = _rebuilt(model, attention_window=config.attention_window, n_global=config.n_global)
        context.report.update(window=config.attention_window, n_global=config.n_global, finetune=finetune(new, context))
        return new


class QuantizeRecipe(Recipe):
    """Post-training int8 of the exported serving graph with ONNX Runtime."""

    int8 = True

    def __init__(self, name: str, static: bool):
        self.name, self.static = name, static

    def apply(self, model: SeqRec, context: RecipeContext) -> SeqRec:
        float_path = export_serving(model, context.workdir / "float.onnx")
        out = context.workdir / ONNX_FILE
        if self.static:
            quantize_static_onnx(float_path, out, calibration_batches(model, context), op_types=INT8_OPS)
            context.report["calibration_users"] = context.config.calibration_users
        else:
            quantize_dynamic_onnx(float_path, out, op_types=INT8_OPS)
        errors = weight_error_steps(float_path, out)
        context.report.update(
            quantized_weights=len(errors), max_weight_error_steps=round(max(errors.values(), default=0.0), 4),
            float_onnx_mb=round(float_path.stat().st_size / 2**20, 3), int8_onnx_mb=round(out.stat().st_size / 2**20, 3),
        )
        context.onnx_path = out
        return model


class QatRecipe(QuantizeRecipe):
    """Fine-tune with fake-quantised Linear weights and inputs (straight-through gradients),
    then static int8 of the serving graph, calibrated as ``quantize-static``."""

    def __init__(self) -> None:
        super().__init__("qat", static=True)

    def apply(self, model: SeqRec, context: RecipeContext) -> SeqRec:
        tune: dict = {}
        layers = quantization_aware_training(model, lambda m: tune.update(finetune(m, context)))
        model = super().apply(model, context)
        context.report.update(fake_quantized_layers=layers, finetune=tune)
        return model


def student_config(teacher: SeqRec, fraction: float) -> SeqRecConfig:
    """The teacher's layout (blocks, heads, switches off) at the width whose parameter count
    is closest to ``fraction`` of the teacher's."""
    target = fraction * count_parameters(teacher)["total"]
    teacher = teacher.config
    base = {**teacher.to_dict(), "qkv_groups": 1, "head_rank": 0, "head_dim": None,
            "block_heads": None, "block_ffn": None}
    best = None
    for dim in range(teacher.n_heads, teacher.dim + 1, teacher.n_heads):
        config = SeqRecConfig(**{**base, "dim": dim})
        gap = abs(sum(p.numel() for p in SeqRec(config).parameters()) - target)
        if best is None or gap < best[0]:
            best = (gap, config)
    return best[1]


def inherit_repeat_terms(teacher: SeqRec, student: SeqRec, basis: torch.Tensor) -> None:
    """Give the student the teacher's repeat bonus: the recency, count and decay terms as they
    are (they do not depend on the width), the gate on the state through ``basis``. The
    distillation loss never trains them (it scores the hidden states only), and left at their
    initial values the Taobao head's student fell from full NDCG@10 0.136 to 0.007."""
    for name in ("repeat_recency", "repeat_count"):
        source, target = getattr(teacher, name), getattr(student, name)
        if source is not None and target is not None:
            target.weight.copy_(source.weight)
    for name in ("repeat_decay_logit", "repeat_decay_weight", "repeat_share_weight"):
        source, target = getattr(teacher, name), getattr(student, name)
        if source is not None and target is not None:
            target.copy_(source)
    if teacher.repeat_gate is not None and student.repeat_gate is not None:
        student.repeat_gate.weight.copy_(teacher.repeat_gate.weight @ basis)
        student.repeat_gate.bias.copy_(teacher.repeat_gate.bias)


class DistillRecipe(Recipe):
    """A student of ~20% of the teacher's parameters trained on the task loss + attention-map
    KL (paper formula 3) + candidate-score KL. Its item table starts from the teacher's
    projected on its top principal directions (keeps the dot products that rank items)."""

    name = "distill"

    def apply(self, model: SeqRec, context: RecipeContext) -> SeqRec:
        config = context.config
        torch.manual_seed(config.seed)
        layout = student_config(model, config.student_fraction)
        if config.student_dim is not None:
            layout = SeqRecConfig(**{**layout.to_dict(), "dim": config.student_dim})
        student = SeqRec(layout)
        if model.config.use_category:
            student.set_item_category(model.item_category)
        if model.rare_emb is not None:
            student.input_known.copy_(model.input_known)
            student.unknown_rate.copy_(model.unknown_rate)
        with torch.no_grad():
            _, _, vt = torch.linalg.svd(model.item_emb.weight, full_matrices=False)
            basis = vt[: student.config.dim].T  # (D_teacher, D_student)
            student.item_emb.weight.copy_(model.item_emb.weight @ basis)
            student.pos_emb.weight.copy_(model.pos_emb.weight @ basis)
            inherit_repeat_terms(model, student, basis)
        history = self._train(model, student, context)
        context.report.update(
            student={"dim": student.config.dim, "n_blocks": student.config.n_blocks, "n_heads": student.config.n_heads},
            fraction=round(count_parameters(student)["total"] / count_parameters(model)["total"], 4),
            distill=config.distill.to_dict(), epochs=history,
        )
        return student

    def _train(self, teacher: SeqRec, student: SeqRec, context: RecipeContext) -> list[dict]:
        config, data = context.config, context.data
        torch.set_num_threads(config.threads)
        device = pick_device(context.train_config.device)
        teacher.to(device).eval()
        student.to(device)
        windows = TrainingWindows.from_split(context.split, student.config.max_len)
        rng = np.random.default_rng(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        log_q = _proposal_log_q(data.item_popularity(), context.train_config.negatives_from).to(device)
        optimizer = torch.optim.AdamW(student.parameters(), lr=config.distill_lr,
                                      weight_decay=context.train_config.weight_decay)
        valid_users = rng.choice(data.n_users, size=min(config.finetune_valid_users, data.n_users), replace=False)
        use_behavior = student.config.use_behavior
        valid_behaviors = context.split.valid_behaviors[valid_users] if use_behavior else None
        scorer = SeqRecScorer(student, device=device)
        best: tuple[float, dict] | None = None
        history: list[dict] = []
        start = time.perf_counter()
        out_of_time = False
        epoch = 0
        while not out_of_time:
            epoch += 1
            student.train()
            parts_sum: dict[str, float] = {}
            n_batches = 0
            for rows in windows.batches(config.distill_batch_size, rng):
                inputs, targets, behaviors = _batch_tensors(windows, rows, device)
                behaviors = behaviors if use_behavior else None
                mask = inputs != 0
                with torch.no_grad():
                    t_hidden, t_maps = teacher.encode_with_attention(inputs, behaviors)
                s_hidden, s_maps = student.encode_with_attention(inputs, behaviors)
                s_states, t_states, target = s_hidden[mask], t_hidden[mask], targets[mask]
                task = _sampled_softmax_loss(
                    student, s_states, target, context.train_config.n_negatives, log_q, generator)
                negatives = torch.multinomial(log_q.exp().cpu(), config.distill_negatives, replacement=True,
                                              generator=generator).to(device)
                t_scores = _candidate_scores(teacher, t_states, target, negatives)
                s_scores = _candidate_scores(student, s_states, target, negatives)
                loss, parts = distillation_loss(task, t_maps, s_maps, t_scores, s_scores, config.distill, mask)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    student.item_emb.weight[0].zero_()
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v
                n_batches += 1
                if time.perf_counter() - start > config.distill_seconds:
                    out_of_time = True
                    break
            valid = evaluate_full(scorer, context.split.valid_input[valid_users], context.split.valid_target[valid_users],
                                  valid_behaviors, ks=(10,))
            row = {"epoch": epoch, "batches": n_batches, "seconds": round(time.perf_counter() - start, 1),
                   "valid_full_ndcg@10": valid["ndcg@10"], **{k: v / max(n_batches, 1) for k, v in parts_sum.items()}}
            history.append(row)
            log.info("distill epoch %d: %s", epoch, row)
            if best is None or valid["ndcg@10"] > best[0]:
                best = (valid["ndcg@10"], {k: v.detach().clone() for k, v in student.state_dict().items()})
        student.load_state_dict(best[1])
        return history


def _candidate_scores(model: SeqRec, states: torch.Tensor, target: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """(N, 1 + n_negatives) scores: each row's target first, then the batch's shared negatives."""
    weight = model.item_emb.weight
    return torch.cat([(states * weight[target]).sum(-1, keepdim=True), states @ weight[negatives].T], dim=1)


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        PruneRecipe(), StructuredPruneRecipe(), QuantizeRecipe("quantize-dynamic", static=False),
        QuantizeRecipe("quantize-static", static=True), QatRecipe(), DistillRecipe(), LowRankRecipe(),
        GroupedRecipe(), LocalRecipe(),
    )
}


# ---------------------------------------------------------------- the face


def _check_chain(recipes: list[str]) -> None:
    unknown = [r for r in recipes if r not in RECIPES]
    if not recipes or unknown:
        raise NimbleError(f"unknown or missing recipe {unknown or recipes}", fix=f"use one of {', '.join(RECIPES)}")
    int8 = [i for i, r in enumerate(recipes) if RECIPES[r].int8]
    if int8 and int8 != [len(recipes) - 1]:
        raise NimbleError(f"int8 recipes must come last and once: {recipes}",
                          fix="e.g. --recipe distill --recipe quantize-static")


def _parent_train_config(model_dir: Path) -> TrainConfig:
    saved = json.loads((model_dir / CONFIG_FILE).read_text()).get("train")
    if not saved:
        raise NimbleError("config.json has no training settings ('train')", path=model_dir / CONFIG_FILE,
                          fix="compress a folder written by `nimbleml rec train` or `nimbleml compress`")
    known = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def compress_model(
    model_dir: Path, data_dir: Path, recipes: list[str], out_dir: Path, config: CompressConfig | None = None
) -> Path:
    """Apply ``recipes`` in order to the model in ``model_dir`` (trained on ``data_dir``) and
    write the compressed model folder ``out_dir`` (see the module docstring). Returns out_dir."""
    config = config or CompressConfig()
    _check_chain(recipes)
    model_dir, data_dir, out_dir = Path(model_dir), Path(data_dir), Path(out_dir)
    model, parent_variant, parent_onnx = load_variant(model_dir)
    if parent_onnx is not None:
        raise NimbleError("this folder is already int8 (model.onnx): recipes after an int8 one would drop it",
                          path=model_dir, fix="compress its float parent and put the int8 recipe last")
    lineage = parent_variant.get("recipes", []) + recipes  # every recipe since `rec train`
    data = SequenceData.load(data_dir)
    if data.n_items != model.config.n_items:
        raise NimbleError(f"model has {model.config.n_items} items, data has {data.n_items}", path=data_dir,
                          fix="pass the prepared data the model was trained on")
    torch.set_num_threads(config.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ONNX_FILE).unlink(missing_ok=True)  # a previous int8 build's graph must not outlive it
    with tempfile.TemporaryDirectory(dir=out_dir) as workdir:
        context = RecipeContext(data, leave_last_out(data, model.config.max_len), config,
                                _parent_train_config(model_dir), Path(workdir))
        params_before = count_parameters(model)
        before = validation_quality(model, context)
        log.info("parent: %.3fM parameters, validation 50-candidate NDCG@10 %.4f", params_before["total"] / 1e6,
                 before["ndcg@10"])
        steps = []
        for name in recipes:
            started = time.perf_counter()
            context.report = {}
            model = RECIPES[name].apply(model, context).cpu().eval()
            steps.append({"recipe": name, "seconds": round(time.perf_counter() - started, 1), **context.report})
            log.info("%s done in %.0f s", name, steps[-1]["seconds"])
        if context.onnx_path is not None:
            context.onnx_path.replace(out_dir / ONNX_FILE)
            context.onnx_path = out_dir / ONNX_FILE
        after = validation_quality(model, context, context.onnx_path)
    saved = json.loads((model_dir / CONFIG_FILE).read_text())
    extras = {k: saved[k] for k in ("preset", "train") if k in saved}
    save_checkpoint(model, {**extras, "compress": {"recipes": lineage, "parent": str(model_dir)}}, out_dir)
    params = count_parameters(model)
    variant = {
        "recipes": lineage,
        "parent": str(model_dir.resolve()),
        "params": params,
        "params_m": round(params["total"] / 1e6, 4),
        "parent_params": params_before,
        "precision": "int8" if context.onnx_path is not None else "fp32",
        "onnx": ONNX_FILE if context.onnx_path is not None else None,
        "build_seconds": round(sum(s["seconds"] for s in steps), 1),
        "steps": steps,
        "valid_before": before,
        "valid_after": after,
        "quality_protocol": f"candidates50 on {before['n_users']} validation users (seed {config.seed})",
        "config": config.to_dict(),
        "environment": environment(),
    }
    (out_dir / VARIANT_FILE).write_text(json.dumps(variant, indent=2) + "\n")
    return out_dir


def load_variant(directory: Path) -> tuple[SeqRec, dict, Path | None]:
    """A compressed (or plain ``rec train``) folder -> (float model, variant.json dict or {},
    int8 ONNX path or None); one NimbleError naming the first missing or corrupt file."""
    directory = Path(directory)
    try:
        model = load_checkpoint(directory)
    except SafetensorError as exc:  # load_checkpoint names missing files; a corrupt one lands here
        raise NimbleError(f"corrupt weights file ({exc})", path=directory / MODEL_FILE,
                          fix="re-run the command that wrote this folder") from exc
    path = directory / VARIANT_FILE
    if not path.exists():
        return model, {}, None
    try:
        variant = json.loads(path.read_text())
        onnx_name = variant["onnx"]
    except (ValueError, KeyError, TypeError) as exc:
        raise NimbleError(f"corrupt variant file ({exc})", path=path, fix="re-run `nimbleml compress`") from exc
    onnx_path = None if onnx_name is None else check_onnx_file(directory / onnx_name)
    return model, variant, onnx_path
