"""Pruning for any ``torch.nn.Module``: the paper's magnitude loop and structured pruning.

Unstructured, Shao et al. formulas 5-7: in round k of K, per layer, the threshold θ is the
magnitude below which a fraction p_k of the layer's weights falls (|{w : |w| < θ}| / n = p_k),
the mask M = [|w| >= θ] zeroes them (W_k = W_{k-1} ⊙ M), and the network is fine-tuned on its
task loss with the mask held (``torch.nn.utils.prune`` keeps ``weight_orig`` and
``weight_mask`` and recomputes ``weight`` before every forward, so masked weights get zero
gradient). The paper does not give the per-round schedule; we raise the target linearly,
p_k = p·k/K, to p = 40% after K = 3 rounds (the paper's figures). After the last round the
masks are folded into the weights. Zeros in dense matrices are not faster on any of our
runtimes: this shrinks nothing but the compressed file.

Structured: whole attention heads and FFN neurons go, by importance, and the matrices are
physically rebuilt smaller, which is what saves FLOPs. A :class:`ChannelGroup` names the
Linear layers whose output rows (producers) and input columns (consumers) carry the units.
We wrote this (about 80 lines) rather than use torch-pruning: our Q/K/V projections are
separate Linear layers whose rows group per head, the caller must write the kept sizes back
into its own config so the shrunk model rebuilds from its folder, and torch-pruning's
dependency tracing would need a hand-made head mapping anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune

log = logging.getLogger(__name__)


@dataclass
class PruneConfig:
    """The closed loop's settings (Shao et al. section III)."""

    sparsity: float = 0.4  # fraction of each layer's weights zeroed after the last round (paper: ~40%)
    rounds: int = 3  # prune -> fine-tune rounds K (paper: K = 3)

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0 or self.rounds < 1:
            raise ValueError(f"need 0 <= sparsity < 1 and rounds >= 1, got {self.sparsity}, {self.rounds}")

    def targets(self) -> list[float]:
        """Per-layer sparsity after each round: p·k/K."""
        return [self.sparsity * k / self.rounds for k in range(1, self.rounds + 1)]


@dataclass
class PruneRound:
    """One round of the loop: the target, the thresholds chosen and the sparsity measured
    after its fine-tuning (equal to the target when the masks held)."""

    round: int
    target: float  # fraction of weights per layer
    thresholds: dict[str, float]  # layer name -> θ (weight magnitude)
    sparsity_after_finetune: float  # over all pruned tensors

    def to_dict(self) -> dict:
        return asdict(self)


def prunable_layers(module: nn.Module, names: list[str] | None = None) -> dict[str, nn.Module]:
    """The layers whose ``weight`` is pruned: ``names`` (module paths), or every Linear and Embedding."""
    if names is not None:
        return {name: module.get_submodule(name) for name in names}
    return {name: m for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}


def current_weight(layer: nn.Module) -> torch.Tensor:
    """The weight as the next forward will see it (masked when pruning is attached)."""
    if hasattr(layer, "weight_orig"):
        return (layer.weight_orig * layer.weight_mask).detach()
    return layer.weight.detach()


def magnitude_mask(weight: torch.Tensor, fraction: float) -> tuple[torch.Tensor, float]:
    """Mask zeroing exactly round(fraction·n) smallest-magnitude weights, and θ: the largest
    pruned magnitude (every kept weight is >= θ)."""
    n_prune = round(fraction * weight.numel())
    mask = torch.ones_like(weight)
    if n_prune == 0:
        return mask, 0.0
    magnitude = weight.abs().flatten()
    order = magnitude.argsort(stable=True)[:n_prune]
    mask.view(-1)[order] = 0.0
    return mask, float(magnitude[order[-1]])


def sparsity(layers: dict[str, nn.Module]) -> float:
    """Fraction of zero weights over the layers' (masked) weights."""
    zeros = sum(int((current_weight(layer) == 0).sum()) for layer in layers.values())
    return zeros / max(sum(current_weight(layer).numel() for layer in layers.values()), 1)


def magnitude_prune(
    module: nn.Module,
    finetune: Callable[[nn.Module, int], object],
    config: PruneConfig | None = None,
    layer_names: list[str] | None = None,
) -> list[PruneRound]:
    """The paper's loop on ``module`` in place: K rounds of (per-layer threshold, mask,
    ``finetune(module, round)`` on the task loss with masks held); masks made permanent at the end."""
    config = config or PruneConfig()
    layers = prunable_layers(module, layer_names)
    rounds = []
    for k, target in enumerate(config.targets(), start=1):
        thresholds = {}
        for name, layer in layers.items():
            mask, thresholds[name] = magnitude_mask(current_weight(layer), target)
            prune.custom_from_mask(layer, "weight", mask)  # multiplies into an existing mask
        log.info("pruning round %d/%d: %.1f%% of each layer's weights masked", k, config.rounds, 100 * target)
        finetune(module, k)
        rounds.append(PruneRound(k, target, thresholds, sparsity(layers)))
    for layer in layers.values():
        prune.remove(layer, "weight")
    return rounds


# ---------------------------------------------------------------- structured


@dataclass
class ChannelGroup:
    """Units (heads, neurons) removed together: unit u is rows ``u*width .. (u+1)*width`` of
    every producer Linear (weight and bias) and the same columns of every consumer Linear."""

    name: str  # e.g. "blocks.0.heads"
    producers: list[str]  # module paths of Linear layers whose outputs are the channels
    consumers: list[str]  # module paths of Linear layers whose inputs are the channels
    width: int = 1  # channels per unit: the head width for heads, 1 for FFN neurons
    min_units: int = 1  # never remove the last units

    def n_units(self, module: nn.Module) -> int:
        return module.get_submodule(self.producers[0]).out_features // self.width


@dataclass
class StructuredReport:
    """Which units each group kept, by index into the original units."""

    kept: dict[str, list[int]] = field(default_factory=dict)
    removed_params: int = 0
    importance: str = "magnitude"  # "taylor" when a loss was given

    def to_dict(self) -> dict:
        return asdict(self)


def _unit_slices(group: ChannelGroup, module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(weight, grad (zeros when none), axis) of every tensor that carries the group's channels."""
    parts = []
    for path in group.producers:
        layer = module.get_submodule(path)
        parts.append((layer.weight, 0))
        if layer.bias is not None:
            parts.append((layer.bias, 0))
    parts += [(module.get_submodule(path).weight, 1) for path in group.consumers]
    return [(p, torch.zeros_like(p) if p.grad is None else p.grad, axis) for p, axis in parts]


def unit_importance(module: nn.Module, group: ChannelGroup, taylor: bool) -> torch.Tensor:
    """(n_units,) importance: the L2 norm of each unit's weights, or with ``taylor`` the
    first-order estimate of the loss change when it is removed, |sum w·dL/dw| (Molchanov et
    al. 2019), from gradients already in ``.grad``."""
    n_units = group.n_units(module)
    score = torch.zeros(n_units)
    for weight, grad, axis in _unit_slices(group, module):
        w = weight.detach().movedim(axis, 0).reshape(n_units, group.width, -1)
        if taylor:
            g = grad.detach().movedim(axis, 0).reshape(n_units, group.width, -1)
            score += (w * g).sum(dim=(1, 2)).abs()
        else:
            score += w.pow(2).sum(dim=(1, 2))
    return score if taylor else score.sqrt()


def _shrunk_linear(layer: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    weight = layer.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None)
    with torch.no_grad():
        out.weight.copy_(weight)
        if layer.bias is not None:
            out.bias.copy_(layer.bias.detach() if rows is None else layer.bias.detach()[rows])
    return out.to(layer.weight.device)


def _replace(module: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, name, new)


def remove_units(module: nn.Module, group: ChannelGroup, keep: list[int]) -> None:
    """Rebuild the group's Linear layers with only the ``keep`` units (in place)."""
    index = torch.tensor([u * group.width + c for u in keep for c in range(group.width)], dtype=torch.int64)
    for path in group.producers:
        _replace(module, path, _shrunk_linear(module.get_submodule(path), index, None))
    for path in group.consumers:
        _replace(module, path, _shrunk_linear(module.get_submodule(path), None, index))


def structured_prune(
    module: nn.Module,
    groups: list[ChannelGroup],
    ratio: float,
    loss: Callable[[nn.Module], torch.Tensor] | None = None,
) -> StructuredReport:
    """Remove ``ratio`` of the units of every group (at least ``min_units`` stay), least
    important first, shrinking the matrices in place. ``loss(module)`` -> scalar task loss on
    a sample batch selects by Taylor importance; without it, by weight magnitude. Fine-tune
    afterwards: the caller rebuilds its model from the kept sizes (see ``StructuredReport.kept``)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    before = sum(p.numel() for p in module.parameters())
    if loss is not None:
        module.zero_grad(set_to_none=True)
        loss(module).backward()
    report = StructuredReport(importance="taylor" if loss is not None else "magnitude")
    for group in groups:
        importance = unit_importance(module, group, taylor=loss is not None)
        n_keep = max(group.min_units, len(importance) - round(ratio * len(importance)))
        keep = sorted(importance.argsort(descending=True, stable=True)[:n_keep].tolist())
        remove_units(module, group, keep)
        report.kept[group.name] = keep
    module.zero_grad(set_to_none=True)
    report.removed_params = before - sum(p.numel() for p in module.parameters())
    log.info("structured pruning removed %d parameters (%s importance)", report.removed_params, report.importance)
    return report
