"""Trim the leading padding columns of a batch before it reaches a graph.

Sequence inputs are left-padded to a fixed width (the serving contract's 100 events), but most
requests are short: on Video.txt the median test history has 5 events. A graph exported with a
dynamic sequence axis (``export_onnx(dynamic_dims=...)``) then runs on only the columns that
carry data in at least one row of the batch. This is exact for a model that masks padding keys
and counts positions back from the most recent column (e.g. SASRec's layout): the dropped
columns are padding in every row, so no answer changes. The win grows when a batcher groups
requests of similar length (:func:`length_order`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Inputs = dict[str, np.ndarray]


def padded_width(rows: np.ndarray, pad: float = 0) -> int:
    """Columns from the first one that is not ``pad`` in some row to the end (at least 1)."""
    if rows.ndim != 2:
        raise ValueError(f"expected a (batch, length) array, got shape {rows.shape}")
    used = np.flatnonzero((rows != pad).any(axis=0))
    return max(rows.shape[1] - int(used[0]), 1) if used.size else 1


def trim_left_padding(inputs: Inputs, names: Sequence[str], pad: float = 0, max_width: int | None = None) -> Inputs:
    """``inputs`` with the axis-1 columns that are padding in every row of ``inputs[names[0]]``
    dropped from each input in ``names`` (those present); other inputs are passed through.

    max_width: keep at most this many of the last columns (a graph exported for a shorter axis).
    """
    present = [n for n in names if n in inputs]
    if not present:
        return inputs
    width = padded_width(inputs[present[0]], pad)
    if max_width is not None:
        width = min(width, max_width)
    if width == inputs[present[0]].shape[1]:
        return inputs
    out = dict(inputs)
    for name in present:
        out[name] = np.ascontiguousarray(inputs[name][:, -width:])
    return out


def length_order(rows: np.ndarray, pad: float = 0) -> np.ndarray:
    """Row order by number of non-padding entries (stable): batches cut from this order have
    rows of similar length, so :func:`trim_left_padding` drops more."""
    return np.argsort((rows != pad).sum(axis=1), kind="stable")
