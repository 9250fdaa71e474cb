"""SeqRec: a SASRec/BST-style causal self-attention encoder for next-item recommendation.

A user's history (item ids, oldest first, left-padded with 0) goes through item + learned
position embeddings (plus optional behaviour-type and item-category embeddings), N
pre-LayerNorm transformer blocks with a causal mask and a key-padding mask, and a final
LayerNorm. The item embedding table is shared for scoring (tied): the score of item j after
position t is the dot product of the position-t representation with item j's embedding.

Positions count back from the most recent event: with left padding the last event always
sits at column ``max_len - 1``, so a shorter window of L columns uses positions
``max_len - L .. max_len - 1`` (SASRec's layout, which lets training trim padding columns).

On logs with repeats, history items get repeat scores (``repeat_scores``): an additive bonus
by recency and count (``repeat_mode="bonus"``), or RepeatNet's repeat/explore mixture
(``"mixture"``), whose scores are log-probabilities from a learnt gate over a softmax on the
history's distinct items and a softmax on every other item.

Lightweight attention is a set of config switches of the block (grouped or low-rank Q/K/V
projections, a local window with a few global events), structured sizes (heads and FFN width
per block) let a physically pruned model rebuild from ``config.json``, and
:class:`ServingRanker` is the serving-shaped forward (the last block for the last query only).

This file holds the model and its config only; training is in ``train.py``, metrics in
``evaluate.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nimbleml.errors import NimbleError


@dataclass
class SeqRecConfig:
    """Sizes and switches of :class:`SeqRec`. Defaults are a small CPU ranker; the CLI's default
    preset widens it to dim 128 except on long-tail logs (``rec.commands.model_config``): on
    Amazon Video Games (31k users, 24k items) an epoch then takes ~33 s instead of ~19 s on 2 threads."""

    n_items: int  # catalogue size; ids 1..n_items, 0 is padding
    n_categories: int = 0  # item categories; ids 1..n_categories, 0 = none / padding
    n_behaviors: int = 5  # behaviour codes 0..4: padding, pv, cart, fav, buy
    max_len: int = 100  # history window in events: the serving contract's last 100 behaviours (SASRec: 50 on Games); longer inputs keep the last max_len
    dim: int = 64  # embedding and hidden width (SASRec: 50; the default preset: 128, 64 on long-tail logs)
    n_blocks: int = 2  # transformer blocks (SASRec: 2)
    n_heads: int = 2  # attention heads; dim must divide by it (SASRec: 1)
    ffn_multiplier: int = 4  # feed-forward width = ffn_multiplier * dim (SASRec: 1)
    dropout: float = 0.5  # on embeddings, attention, residual and feed-forward (SASRec: 0.5 on sparse data; 0.3 overfit by epoch 4 on Games)
    use_behavior: bool = False  # add a behaviour-type embedding (Taobao pv/cart/fav/buy)
    use_category: bool = False  # add the item's category embedding (looked up from item_category)
    # score items already in the input history at -inf. For catalogues where users do not
    # re-consume (Amazon Games: 0 repeats in training), a tied-embedding model otherwise puts
    # ~1.2 history items in its top 10 (test full NDCG@10 0.039 -> 0.050 with it on). Off where
    # repeats happen (Taobao views); `rec.commands.model_config` decides from the training data.
    exclude_history: bool = False
    # repeat-aware scores (a copy mechanism, as in RepeatNet): an item already in the history
    # gets a learnt bonus by how recently it was last seen, plus a per-user repeat propensity
    # read from the state. Off = tied dot products only; `rec.commands.model_config` turns it
    # on for repeat-heavy logs (Taobao views), where users mostly revisit what they viewed.
    repeat_scores: bool = False
    # with repeat_scores: also a learnt bonus by how often the item occurs in the history (an
    # item viewed five times is likelier next than one viewed once as long ago). Off in
    # checkpoints written before it existed.
    repeat_counts: bool = False
    # with repeat_scores: also w * log(Σ γ^age) over the item's occurrences in the window (age 0
    # = the last event), w and γ in (0.5, 1) learnt: the exponentially decayed count that the
    # `recent` baseline ranks by. Recency and count bonuses add up; this one lets frequency and
    # recency trade off (three views 10 back against one view 2 back) the way `recent` does.
    repeat_decay: bool = False
    # with repeat_scores: how history items are scored. "bonus": the additive bonus above on the
    # tied dot product. "mixture": RepeatNet's decomposition (Ren et al., AAAI 2019), scores are
    # log-probabilities log P(item) = log P(repeat | state) + log P(item | repeat) for a history
    # item and log P(explore | state) + log P(item | explore) for any other: a learnt gate mixes
    # a softmax over the window's distinct items (a query from the state against their
    # embeddings, plus the recency, count and decayed-count features above) and a softmax over
    # the items not in the window (the tied dot products). Old checkpoints load as "bonus".
    repeat_mode: str = "bonus"
    # inputs: an item seen fewer than this many times in training enters the history as one
    # shared learnt "rare item" vector (its category and behaviour embeddings still added).
    # Why: on a long-tail log the item a user touched last is often new. On the Taobao head 60%
    # of the test inputs end in an item that training never saw (the validation event), whose
    # untrained embedding wrecked the last state (test full NDCG@10 on repeat targets 0.19 vs
    # 0.39 on validation, where the last input is always a training item). Items below the
    # count are scored as candidates as before. 0 = off (every item its own embedding).
    min_input_count: int = 0
    # item-frequency aware input dropout (word dropout, Kiperwasser & Goldberg 2016): in training,
    # an input event of an item seen c times in training becomes the shared unknown-item vector
    # (the rare-item one above) with probability alpha / (alpha + c), so that vector is learnt in
    # the contexts of rare items, and items training never saw (a test input often ends in one:
    # its only event was the validation target) enter histories as it, not as an untrained row.
    # 0 = off; with it on, items with 0 training events map to the vector even when min_input_count is 0.
    unknown_input_alpha: float = 0.0
    # lightweight attention (the compression recipes of `rec.compression`); defaults = the dense baseline
    qkv_groups: int = 1  # grouped Q/K/V and output projections: k block-diagonal groups, k times fewer weights (1 = dense)
    head_rank: int = 0  # low-rank per-head Q/K/V projections: each head's (dim -> head_dim) map is rank r (0 = full)
    attention_window: int = 0  # local attention: a query sees its last w events only (0 = every earlier event)
    n_global: int = 0  # with a window: the user's first n_global events stay visible to every later query
    # structured sizes, written by structured pruning so a shrunk model rebuilds from config.json
    head_dim: int | None = None  # width of one attention head; None = dim // n_heads
    block_heads: list[int] | None = None  # attention heads per block; None = n_heads in every block
    block_ffn: list[int] | None = None  # feed-forward width per block; None = ffn_multiplier * dim in every block

    def __post_init__(self) -> None:
        if self.n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {self.n_items}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.use_category and self.n_categories < 1:
            raise ValueError("use_category needs n_categories >= 1")
        for name in ("block_heads", "block_ffn"):
            sizes = getattr(self, name)
            if sizes is not None and (len(sizes) != self.n_blocks or min(sizes) < 1):
                raise ValueError(f"{name} needs {self.n_blocks} sizes >= 1, got {sizes}")
        if self.qkv_groups < 1 or self.dim % self.qkv_groups or any(
            self.heads(b) * self.head_width % self.qkv_groups for b in range(self.n_blocks)
        ):
            raise ValueError(f"qkv_groups {self.qkv_groups} must divide dim {self.dim} and every block's head width")
        if self.qkv_groups > 1 and self.head_rank:
            raise ValueError("choose grouped (qkv_groups) or low-rank (head_rank) projections, not both")
        if not 0 <= self.head_rank <= self.head_width:
            raise ValueError(f"head_rank must be in 0..{self.head_width}, got {self.head_rank}")
        if self.repeat_counts and not self.repeat_scores:
            raise ValueError("repeat_counts needs repeat_scores")
        if self.repeat_decay and not self.repeat_scores:
            raise ValueError("repeat_decay needs repeat_scores")
        if self.repeat_mode not in ("bonus", "mixture"):
            raise ValueError(f"repeat_mode must be 'bonus' or 'mixture', got {self.repeat_mode!r}")
        if self.repeat_mode == "mixture" and (not self.repeat_scores or self.exclude_history):
            raise ValueError("repeat_mode 'mixture' needs repeat_scores and exclude_history off (it scores history items)")
        if self.min_input_count < 0:
            raise ValueError(f"min_input_count must be >= 0, got {self.min_input_count}")
        if self.unknown_input_alpha < 0:
            raise ValueError(f"unknown_input_alpha must be >= 0, got {self.unknown_input_alpha}")
        if self.attention_window < 0 or self.n_global < 0 or (self.n_global and not self.attention_window):
            raise ValueError("attention_window and n_global must be >= 0; n_global needs a window")

    @property
    def head_width(self) -> int:
        """Width of one attention head (features)."""
        return self.dim // self.n_heads if self.head_dim is None else self.head_dim

    def heads(self, block: int) -> int:
        """Attention heads of block ``block`` (0-based)."""
        return self.n_heads if self.block_heads is None else self.block_heads[block]

    def ffn_width(self, block: int) -> int:
        """Feed-forward hidden width of block ``block`` (0-based)."""
        return self.ffn_multiplier * self.dim if self.block_ffn is None else self.block_ffn[block]

    @classmethod
    def small(cls, n_items: int, **overrides: object) -> SeqRecConfig:
        """A tiny preset for tests and the demo: trains in seconds on a laptop CPU."""
        values: dict[str, object] = dict(
            n_items=n_items, max_len=50, dim=32, n_blocks=1, n_heads=2, ffn_multiplier=2, dropout=0.2
        )
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return asdict(self)


class GroupedLinear(nn.Module):
    """A block-diagonal linear map: the input splits into ``groups`` slices and each slice feeds
    its own ``out_features / groups`` outputs, so weights and FLOPs are ``groups`` times fewer.
    Computed as one batched matmul over the groups (ONNX: Transpose + MatMul, dynamic batch)."""

    def __init__(self, in_features: int, out_features: int, groups: int, bias: bool = True):
        super().__init__()
        if in_features % groups or out_features % groups:
            raise ValueError(f"groups {groups} must divide {in_features} and {out_features}")
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight = nn.Parameter(torch.empty(groups, in_features // groups, out_features // groups))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.groups, self.in_features // self.groups).transpose(0, 1)  # (g, N, in/g)
        y = torch.bmm(x, self.weight).transpose(0, 1).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias


class LowRankLinear(nn.Module):
    """Per-head low-rank projection: each head's ``in -> out/heads`` map is ``U_h V_h`` of rank r.
    ``down`` (in -> heads*r, all heads' V stacked) then ``up`` (block-diagonal, each head's U):
    ``in*heads*r + out*r`` weights instead of ``in*out``."""

    def __init__(self, in_features: int, out_features: int, heads: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, heads * rank, bias=False)
        self.up = GroupedLinear(heads * rank, out_features, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _projection(config: SeqRecConfig, in_features: int, out_features: int, heads: int) -> nn.Module:
    """One Q, K or V projection of the kind the config asks for (dense, grouped or low-rank)."""
    if config.head_rank:
        return LowRankLinear(in_features, out_features, heads, config.head_rank)
    if config.qkv_groups > 1:
        return GroupedLinear(in_features, out_features, config.qkv_groups)
    return nn.Linear(in_features, out_features)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t that are not padding
    (and, with a window, only the last ``attention_window`` of them plus the global ones).

    The mask is built from tensors only (no Python branching on data), so the module traces
    and exports to ONNX. Every query also sees itself, so a fully padded row never has an
    all-masked softmax row and never produces NaN. Q, K and V are separate projections so the
    serving forward can project the last query alone; checkpoints with the older packed
    ``qkv`` weight load through :meth:`_split_packed_qkv`.
    """

    def __init__(self, config: SeqRecConfig, block: int = 0):
        super().__init__()
        self.n_heads = config.heads(block)
        self.head_dim = config.head_width
        inner = self.n_heads * self.head_dim
        self.q = _projection(config, config.dim, inner, self.n_heads)
        self.k = _projection(config, config.dim, inner, self.n_heads)
        self.v = _projection(config, config.dim, inner, self.n_heads)
        self.proj = GroupedLinear(inner, config.dim, config.qkv_groups) if config.qkv_groups > 1 else nn.Linear(inner, config.dim)
        self.dropout = config.dropout
        self.register_load_state_dict_pre_hook(self._split_packed_qkv)

    @staticmethod
    def _split_packed_qkv(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
        """Checkpoints written before Q/K/V were split hold one (3*inner, dim) ``qkv`` matrix."""
        for kind in ("weight", "bias"):
            packed = state_dict.pop(f"{prefix}qkv.{kind}", None)
            if packed is not None:
                for name, part in zip("qkv", packed.chunk(3, dim=0)):
                    state_dict[f"{prefix}{name}.{kind}"] = part

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, H*hd) -> (B, H, L, hd)."""
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """queries: (B, Lq, D) (the last Lq positions of ``keys``); keys: (B, L, D); allowed:
        (B, 1, Lq, L) bool, True where a query may attend a key. Returns (B, Lq, D) and, with
        ``need_weights``, the attention probabilities (B, H, Lq, L) computed explicitly (SDPA otherwise)."""
        batch, length = queries.shape[0], queries.shape[1]
        q, k, v = self._heads(self.q(queries)), self._heads(self.k(keys)), self._heads(self.v(keys))
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            logits = (q @ k.transpose(-2, -1)) * (self.head_dim**-0.5)
            weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
            y = F.dropout(weights, dropout, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)), weights


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, config: SeqRecConfig, block: int = 0):
        super().__init__()
        width = config.ffn_width(block)
        self.ln_attn = nn.LayerNorm(config.dim)
        self.attn = CausalSelfAttention(config, block)
        self.ln_ffn = nn.LayerNorm(config.dim)
        self.ffn = nn.Sequential(
            nn.Linear(config.dim, width), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(width, config.dim)
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor, n_queries: int | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, L, D); allowed: (B, 1, L, L). With ``n_queries`` only the last n_queries
        positions are computed (keys and values still come from all L): returns (B, n_queries, D)."""
        h = self.ln_attn(x)
        if n_queries is None:
            y, weights = self.attn(h, h, allowed, need_weights)
        else:
            x = x[:, -n_queries:]
            y, weights = self.attn(h[:, -n_queries:], h, allowed[:, :, -n_queries:], need_weights)
        x = x + self.drop(y)
        return x + self.drop(self.ffn(self.ln_ffn(x))), weights


class SeqRec(nn.Module):
    """Causal self-attention sequential recommender with tied item embeddings."""

    def __init__(self, config: SeqRecConfig):
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.n_items + 1, config.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)
        self.behavior_emb = (
            nn.Embedding(config.n_behaviors, config.dim, padding_idx=0) if config.use_behavior else None
        )
        self.category_emb = (
            nn.Embedding(config.n_categories + 1, config.dim, padding_idx=0) if config.use_category else None
        )
        # item id -> category id, so serving needs item ids only; filled by set_item_category
        self.register_buffer("item_category", torch.zeros(config.n_items + 1, dtype=torch.int64))
        # the shared input vector of rare items and which items are not rare (set_item_counts)
        shared_input = bool(config.min_input_count or config.unknown_input_alpha)
        self.rare_emb = nn.Parameter(torch.zeros(config.dim)) if shared_input else None
        if shared_input:
            self.register_buffer("input_known", torch.ones(config.n_items + 1, dtype=torch.bool))
        # per item, the training-time probability of entering as the shared vector (derived from
        # the counts by set_item_counts, so not saved)
        self.register_buffer("unknown_rate", torch.zeros(config.n_items + 1), persistent=False)
        self.emb_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, b) for b in range(config.n_blocks))
        self.ln_final = nn.LayerNorm(config.dim)
        # repeat bonus by recency 1..max_len (0 = not in the history: no bonus) and the user's propensity
        self.repeat_recency = nn.Embedding(config.max_len + 1, 1, padding_idx=0) if config.repeat_scores else None
        self.repeat_gate = nn.Linear(config.dim, 1) if config.repeat_scores else None
        # and by occurrences in the window, 1..max_len (0 = not in the history)
        self.repeat_count = nn.Embedding(config.max_len + 1, 1, padding_idx=0) if config.repeat_counts else None
        # and w * log(decayed count): gamma = 0.5 + 0.5 * sigmoid(logit), 0.8 at the start, w = 1
        self.repeat_decay_logit = nn.Parameter(torch.tensor(0.405)) if config.repeat_decay else None
        self.repeat_decay_weight = nn.Parameter(torch.tensor(1.0)) if config.repeat_decay else None
        # repeat_mode "mixture": repeat_gate is the logit of P(repeat | state), plus a learnt weight on
        # the window's repeat share; the repeat channel's query against the history items' embeddings
        # starts as the identity (the tied similarity) and learns at the base rate (not repeat_lr)
        mixture = config.repeat_scores and config.repeat_mode == "mixture"
        self.repeat_share_weight = nn.Parameter(torch.tensor(0.0)) if mixture else None
        self.mixture_query = nn.Linear(config.dim, config.dim) if mixture else None
        self.apply(self._init_weights)
        if self.mixture_query is not None:
            nn.init.eye_(self.mixture_query.weight)
        if self.rare_emb is not None:
            nn.init.normal_(self.rare_emb, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def set_item_category(self, item_category: torch.Tensor) -> None:
        """item_category: (n_items + 1,) int, category id per item (0 = none)."""
        self.item_category.copy_(torch.as_tensor(item_category, dtype=torch.int64))

    def set_item_counts(self, counts: np.ndarray | torch.Tensor) -> None:
        """counts: (n_items + 1,) training events per item. With ``min_input_count``, items
        counted fewer times enter histories as the shared rare-item vector; without, a no-op."""
        if self.rare_emb is None:
            return
        counts = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
        alpha = self.config.unknown_input_alpha
        known = counts >= max(self.config.min_input_count, 1 if alpha else 0)
        known[0] = True  # padding keeps its (zero, masked) row
        self.input_known.copy_(known)
        if alpha:
            rate = alpha / (alpha + counts)
            rate[0] = 0.0
            self.unknown_rate.copy_(rate.float())

    def input_embedding(self, history: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) input vectors: the item's embedding, or the rare-item vector
        for an item below ``min_input_count`` training events (in training also, at random, an
        event dropped by ``unknown_input_alpha``)."""
        x = self.item_emb(history)
        if self.rare_emb is None:
            return x
        known = self.input_known[history]
        if self.training and self.config.unknown_input_alpha:
            known = known & (torch.rand(history.shape, device=history.device) >= self.unknown_rate[history])
        return torch.where(known.unsqueeze(-1), x, self.rare_emb.to(x.dtype))

    def embed(
        self,
        history: torch.Tensor,
        behaviors: torch.Tensor | None = None,
        categories: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' input (B, L, D) and attention mask (B, 1, L, L), True where a query may
        attend a key: causal, no padding keys, within the window or global, itself always.
        A model trained with behaviour embeddings refuses to run without ``behaviors``."""
        if self.behavior_emb is not None and behaviors is None:
            raise NimbleError(
                "this model was trained with behaviour embeddings (use_behavior) and needs `behaviors`",
                fix="pass behaviors (batch, seq_len) int64 codes beside history (ONNX input `behaviors`)",
            )
        max_len = self.config.max_len
        history = history[:, -max_len:]  # longer histories: only the last max_len events count
        behaviors = None if behaviors is None else behaviors[:, -max_len:]
        categories = None if categories is None else categories[:, -max_len:]
        length = history.shape[1]
        keep = history != 0  # (B, L)
        x = self.input_embedding(history) * (self.config.dim**0.5)
        x = x + self.pos_emb.weight[max_len - length :]
        if self.behavior_emb is not None:
            x = x + self.behavior_emb(behaviors)
        if self.category_emb is not None:
            x = x + self.category_emb(self.item_category[history] if categories is None else categories)
        x = self.emb_drop(x) * keep.unsqueeze(-1).to(x.dtype)
        position = torch.arange(length, device=history.device)
        visible = position.unsqueeze(1) >= position.unsqueeze(0)  # (L, L) causal: key <= query
        if self.config.attention_window:
            local = position.unsqueeze(1) - position.unsqueeze(0) < self.config.attention_window
            # the user's first n_global events (counted from the oldest real one) stay visible
            first = (keep.cumsum(dim=1) <= self.config.n_global) & keep  # (B, L)
            visible = visible & (local | first.unsqueeze(1))
        eye = torch.eye(length, dtype=torch.bool, device=history.device)
        allowed = (visible & keep.unsqueeze(1)) | eye  # (B, L, L)
        return x, allowed.unsqueeze(1)

    def encode_with_attention(
        self, history: torch.Tensor, behaviors: torch.Tensor | None = None, categories: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`encode` plus every block's attention probabilities, (B, H, L, L) each,
        computed explicitly (for distillation; slower than the SDPA path)."""
        x, allowed = self.embed(history, behaviors, categories)
        maps = []
        for block in self.blocks:
            x, weights = block(x, allowed, need_weights=True)
            maps.append(weights)
        return self.ln_final(x), maps

    def encode(
        self,
        history: torch.Tensor,
        behaviors: torch.Tensor | None = None,
        categories: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """history: (B, L) int64 item ids, left-padded with 0 (L > max_len: the last max_len are used).
        behaviors, categories: (B, L) int64 or None (categories default to item_category[history]).
        Returns (B, L, D); row t depends only on events 0..t of its own sequence."""
        x, allowed = self.embed(history, behaviors, categories)
        for block in self.blocks:
            x, _ = block(x, allowed)
        return self.ln_final(x)

    def last_state(self, history: torch.Tensor, behaviors: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) history -> (B, D) representation of the most recent position."""
        return self.encode(history, behaviors)[:, -1, :]

    def score_candidates(self, state: torch.Tensor, history: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """state: (B, D) user state; candidates: (B, C) item ids -> (B, C) scores (-inf for a
        candidate in the history when ``exclude_history``). The mixture's log-probabilities need
        the explore softmax's normaliser, so it scores the whole catalogue and gathers."""
        if self.mixture_query is not None:
            return torch.gather(self.mixture_scores(state, history), 1, candidates)
        scores = torch.einsum("bd,bcd->bc", state, self.item_emb(candidates))
        if self.config.repeat_scores:
            history = history[:, -self.config.max_len :]
            positions = torch.arange(1, history.shape[1] + 1, device=history.device)  # 1 = oldest column
            match = (candidates.unsqueeze(-1) == history.unsqueeze(1)) & (history != 0).unsqueeze(1)
            latest = (match * positions).amax(-1)  # (B, C): column of the last occurrence, 0 = unseen
            recency = torch.where(latest > 0, history.shape[1] + 1 - latest, 0)
            count = match.sum(-1) if self.repeat_count is not None else None
            decayed = None
            if self.repeat_decay_logit is not None:  # Σ gamma^age over the item's occurrences
                decayed = (match.float() * self.decay_weights(history.shape[1])).sum(-1)
            scores = scores + self.repeat_bonus(state, recency, count, decayed)
        if self.config.exclude_history:
            seen = ((candidates.unsqueeze(-1) == history.unsqueeze(1)) & (history != 0).unsqueeze(1)).any(-1)
            scores = scores.masked_fill(seen, float("-inf"))
        return scores

    def decay_gamma(self) -> torch.Tensor:
        """The learnt per-event decay of ``repeat_decay``, in (0.5, 1): the floor keeps
        gamma^(max_len - 1) above float32's smallest normal number (0.5^99 ~ 1.6e-30)."""
        return 0.5 + 0.5 * torch.sigmoid(self.repeat_decay_logit)

    def decay_weights(self, length: int) -> torch.Tensor:
        """(length,) float32 gamma^age of each window column, the last column age 0."""
        ages = torch.arange(length - 1, -1, -1, device=self.repeat_decay_logit.device, dtype=torch.float32)
        return self.decay_gamma().float() ** ages

    def repeat_features(
        self, recency: torch.Tensor, count: torch.Tensor | None, decayed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """recency: (N, C) int64 events since each item was last seen (1 = the latest event, 0 =
        not in the history); count: (N, C) int64 occurrences in the history (read only with
        ``repeat_counts``); decayed: (N, C) float Σ gamma^age over the item's occurrences (read
        only with ``repeat_decay``) -> (N, C) the learnt recency + count + decayed-count terms
        (meaningless where recency is 0: callers mask those)."""
        features = self.repeat_recency(recency).squeeze(-1)
        if self.repeat_count is not None:
            features = features + self.repeat_count(count.clamp(max=self.config.max_len)).squeeze(-1)
        if self.repeat_decay_weight is not None:  # log(1) = 0 for unseen items: no inf, no NaN gradient
            features = features + self.repeat_decay_weight * torch.log(torch.where(recency == 0, 1.0, decayed.float()))
        return features

    def repeat_bonus(
        self, state: torch.Tensor, recency: torch.Tensor, count: torch.Tensor | None,
        decayed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """state: (N, D); recency, count, decayed as :meth:`repeat_features` -> (N, C) the
        ``"bonus"`` mode's score bonus (those features plus the user's propensity), 0 where recency is 0."""
        bonus = self.repeat_features(recency, count, decayed) + self.repeat_gate(state)
        return bonus.masked_fill(recency == 0, 0.0)

    def history_columns(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """window: (B, L) left-padded ids (at most max_len) -> per column, for the mixture:
        recency (B, L) int64 = L - p on the column p that holds its item's last occurrence, else 0;
        count (B, L) int64 occurrences of that item in the window (0 elsewhere); decayed (B, L)
        float32 Σ gamma^age over them (None without ``repeat_decay``); share (B,) float32 the
        window's repeat share, events whose item occurred earlier in it over events."""
        length = window.shape[1]
        column = torch.arange(length, device=window.device)
        real = window != 0
        same = (window.unsqueeze(2) == window.unsqueeze(1)) & real.unsqueeze(1) & real.unsqueeze(2)  # (B, p, q)
        later = (same & (column.view(1, 1, -1) > column.view(1, -1, 1))).any(-1)
        earlier = (same & (column.view(1, 1, -1) < column.view(1, -1, 1))).any(-1)
        latest = real & ~later
        recency = torch.where(latest, length - column, 0)
        count = torch.where(latest, same.sum(-1), 0)
        decayed = None
        if self.repeat_decay_logit is not None:
            decayed = torch.where(latest, same.float() @ self.decay_weights(length), 0.0)
        share = earlier.sum(-1).float() / real.sum(-1).clamp(min=1).float()
        return recency, count, decayed, share

    def mixture_log_probs(
        self, state: torch.Tensor, explore: torch.Tensor, items: torch.Tensor, recency: torch.Tensor,
        count: torch.Tensor | None, decayed: torch.Tensor | None, dots: torch.Tensor, share: torch.Tensor,
    ) -> torch.Tensor:
        """The mixture's log P(item) over the catalogue (``repeat_mode="mixture"``).

        state: (N, D); explore: (N, n_items + 1) tied dot products; items: (N, T) history column
        ids; recency, count, decayed: (N, T) as :meth:`repeat_features`, recency > 0 exactly on the
        column holding each distinct history item's latest occurrence; dots: (N, T)
        ``mixture_query(state)`` · the column's item embedding; share: (N,) repeat share.
        Returns (N, n_items + 1) float32: log P(repeat) + log softmax over the distinct history
        items for those, log P(explore) + log softmax over the other items for the rest, -inf
        for padding. A row without history is all explore."""
        latest = recency > 0
        # onto item ids by scatter_add (each history item has one latest column; the other columns
        # add 0 to padding's slot), so no index is written twice: defined in every ONNX runtime
        index = torch.where(latest, items, 0)
        explore = explore.float()
        in_history = torch.zeros_like(explore).scatter_add(1, index, latest.float()) > 0
        padding = torch.arange(explore.shape[1], device=explore.device) == 0
        explore = explore.masked_fill(in_history | padding, float("-inf"))
        gate = self.repeat_gate(state).squeeze(-1).float() + self.repeat_share_weight * share.float()
        has_history = latest.any(-1)
        log_explore = torch.log_softmax(explore, -1) - torch.where(has_history, F.softplus(gate), 0.0).unsqueeze(-1)
        # a finite floor, not -inf: a row without history must not give NaN
        repeat = (dots.float() + self.repeat_features(recency, count, decayed).float()).masked_fill(~latest, -1e4)
        log_repeat = torch.log_softmax(repeat, -1) - F.softplus(-gate).unsqueeze(-1)
        on_items = torch.zeros_like(explore).scatter_add(1, index, torch.where(latest, log_repeat, 0.0))
        return torch.where(in_history, on_items, log_explore).masked_fill(padding, float("-inf"))

    def mixture_scores(self, state: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """state: (B, D); history: (B, L) -> (B, n_items + 1) the mixture's log-probabilities."""
        window = history[:, -self.config.max_len :]
        recency, count, decayed, share = self.history_columns(window)
        dots = torch.einsum("bd,bld->bl", self.mixture_query(state), self.item_emb(window))
        return self.mixture_log_probs(state, state @ self.item_emb.weight.T, window, recency, count, decayed, dots, share)

    def forward(
        self, history: torch.Tensor, candidates: torch.Tensor, behaviors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Serving forward. history: (B, L) int64, e.g. (B, 100); candidates: (B, C) int64.
        Returns (B, C) scores (higher = more likely next; -inf for a candidate in the history
        when ``exclude_history``); no data-dependent control flow. Every position is computed
        (the baseline); :class:`ServingRanker` computes only what the scores need."""
        return self.score_candidates(self.last_state(history, behaviors), history, candidates)

    def score_all(self, history: torch.Tensor, behaviors: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) history -> (B, n_items + 1) scores over the whole catalogue (column 0 = padding)."""
        state = self.last_state(history, behaviors)
        if self.mixture_query is not None:
            return self.mixture_scores(state, history)
        scores = state @ self.item_emb.weight.T
        if self.config.repeat_scores:
            window = history[:, -self.config.max_len :]
            positions = torch.arange(1, window.shape[1] + 1, device=history.device).expand_as(window)
            latest = torch.zeros_like(scores, dtype=torch.int64).scatter_reduce(1, window, positions, "amax")
            latest[:, 0] = 0  # padding
            count = None  # occurrences per item: a (B, n_items + 1) scatter, only when the model uses it
            if self.repeat_count is not None:
                count = torch.zeros_like(latest).scatter_add(1, window, torch.ones_like(window))
            decayed = None
            if self.repeat_decay_logit is not None:
                weights = self.decay_weights(window.shape[1]).expand(window.shape)
                decayed = torch.zeros_like(scores, dtype=torch.float32).scatter_add(1, window, weights)
            recency = torch.where(latest > 0, window.shape[1] + 1 - latest, 0)
            scores = scores + self.repeat_bonus(state, recency, count, decayed)
        if self.config.exclude_history:
            seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, history, True)
            seen[:, 0] = False
            scores = scores.masked_fill(seen, float("-inf"))
        return scores


class ServingRanker(nn.Module):
    """The serving-shaped forward of a :class:`SeqRec`: same inputs and scores as
    ``SeqRec.forward``, but the last block runs for the last query only (its keys and values
    still come from every position): the last block's Q projection, attention, output
    projection, FFN and LayerNorms, and the final LayerNorm, run for 1 of L positions.
    Exports to ONNX with a dynamic batch."""

    def __init__(self, model: SeqRec):
        super().__init__()
        self.model = model

    def forward(
        self, history: torch.Tensor, candidates: torch.Tensor, behaviors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """history: (B, L) int64; candidates: (B, C) int64; behaviors: (B, L) int64 when the
        model uses them. Returns (B, C) float32 scores."""
        model = self.model
        x, allowed = model.embed(history, behaviors)
        for block in model.blocks[:-1]:
            x, _ = block(x, allowed)
        x, _ = model.blocks[-1](x, allowed, n_queries=1)
        return model.score_candidates(model.ln_final(x[:, 0]), history, candidates)
