"""SeqRec: a SASRec/BST-style causal self-attention encoder for next-item recommendation.

A user's history (item ids, oldest first, left-padded with 0) goes through item + learned
position embeddings (plus optional behaviour-type and item-category embeddings), N
pre-LayerNorm transformer blocks with a causal mask and a key-padding mask, and a final
LayerNorm. The item embedding table is shared for scoring (tied): the score of item j after
position t is the dot product of the position-t representation with item j's embedding.

Positions count back from the most recent event: with left padding the last event always
sits at column ``max_len - 1``, so a shorter window of L columns uses positions
``max_len - L .. max_len - 1`` (SASRec's layout, which lets training trim padding columns).

This file holds the model and its config only; training is in ``train.py``, metrics in
``evaluate.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SeqRecConfig:
    """Sizes and switches of :class:`SeqRec`. Defaults are the ranker we train on Amazon Video
    Games (31k users, 24k items) in about 5 minutes on CPU (dim 128 roughly tripled the epoch time)."""

    n_items: int  # catalogue size; ids 1..n_items, 0 is padding
    n_categories: int = 0  # item categories; ids 1..n_categories, 0 = none / padding
    n_behaviors: int = 5  # behaviour codes 0..4: padding, pv, cart, fav, buy
    max_len: int = 100  # history window in events: the serving contract's last 100 behaviours (SASRec: 50 on Games); longer inputs keep the last max_len
    dim: int = 64  # embedding and hidden width (SASRec: 50)
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

    def __post_init__(self) -> None:
        if self.n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {self.n_items}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.use_category and self.n_categories < 1:
            raise ValueError("use_category needs n_categories >= 1")

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


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t that are not padding.

    The mask is built from tensors only (no Python branching on data), so the module traces
    and exports to ONNX. Every query also sees itself, so a fully padded row never has an
    all-masked softmax row and never produces NaN.
    """

    def __init__(self, config: SeqRecConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D); allowed: (B, 1, L, L) bool, True where a query may attend a key."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=2)
        q = q.view(batch, length, self.n_heads, dim // self.n_heads).transpose(1, 2)
        k = k.view(batch, length, self.n_heads, dim // self.n_heads).transpose(1, 2)
        v = v.view(batch, length, self.n_heads, dim // self.n_heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, config: SeqRecConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.dim)
        self.attn = CausalSelfAttention(config)
        self.ln_ffn = nn.LayerNorm(config.dim)
        self.ffn = nn.Sequential(
            nn.Linear(config.dim, config.ffn_multiplier * config.dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.ffn_multiplier * config.dim, config.dim),
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x), allowed))
        return x + self.drop(self.ffn(self.ln_ffn(x)))


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
        self.emb_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_blocks))
        self.ln_final = nn.LayerNorm(config.dim)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def set_item_category(self, item_category: torch.Tensor) -> None:
        """item_category: (n_items + 1,) int, category id per item (0 = none)."""
        self.item_category.copy_(torch.as_tensor(item_category, dtype=torch.int64))

    def encode(
        self,
        history: torch.Tensor,
        behaviors: torch.Tensor | None = None,
        categories: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """history: (B, L) int64 item ids, left-padded with 0 (L > max_len: the last max_len are used).
        behaviors, categories: (B, L) int64 or None (categories default to item_category[history]).
        Returns (B, L, D); row t depends only on events 0..t of its own sequence."""
        max_len = self.config.max_len
        history = history[:, -max_len:]  # longer histories: only the last max_len events count
        behaviors = None if behaviors is None else behaviors[:, -max_len:]
        categories = None if categories is None else categories[:, -max_len:]
        length = history.shape[1]
        keep = history != 0  # (B, L)
        x = self.item_emb(history) * (self.config.dim**0.5)
        x = x + self.pos_emb.weight[max_len - length :]
        if self.behavior_emb is not None and behaviors is not None:
            x = x + self.behavior_emb(behaviors)
        if self.category_emb is not None:
            x = x + self.category_emb(self.item_category[history] if categories is None else categories)
        x = self.emb_drop(x) * keep.unsqueeze(-1).to(x.dtype)
        causal = torch.ones(length, length, dtype=torch.bool, device=history.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=history.device)
        allowed = (causal & keep.unsqueeze(1)) | eye  # (B, L, L): causal, no padding keys, self always
        allowed = allowed.unsqueeze(1)
        for block in self.blocks:
            x = block(x, allowed)
        return self.ln_final(x)

    def last_state(self, history: torch.Tensor, behaviors: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) history -> (B, D) representation of the most recent position."""
        return self.encode(history, behaviors)[:, -1, :]

    def forward(
        self, history: torch.Tensor, candidates: torch.Tensor, behaviors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Serving forward. history: (B, L) int64, e.g. (B, 100); candidates: (B, C) int64.
        Returns (B, C) scores (higher = more likely next; -inf for a candidate in the history
        when ``exclude_history``); no data-dependent control flow."""
        state = self.last_state(history, behaviors)
        scores = torch.einsum("bd,bcd->bc", state, self.item_emb(candidates))
        if self.config.exclude_history:
            seen = ((candidates.unsqueeze(-1) == history.unsqueeze(1)) & (history != 0).unsqueeze(1)).any(-1)
            scores = scores.masked_fill(seen, float("-inf"))
        return scores

    def score_all(self, history: torch.Tensor, behaviors: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) history -> (B, n_items + 1) scores over the whole catalogue (column 0 = padding)."""
        scores = self.last_state(history, behaviors) @ self.item_emb.weight.T
        if self.config.exclude_history:
            seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, history, True)
            seen[:, 0] = False
            scores = scores.masked_fill(seen, float("-inf"))
        return scores
