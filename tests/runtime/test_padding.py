"""Trimming left padding: the columns dropped are padding in every row; nothing else changes."""

from __future__ import annotations

import numpy as np
import pytest

from nimbleml.runtime.padding import length_order, padded_width, trim_left_padding


def test_trim_drops_only_columns_padded_in_every_row() -> None:
    history = np.array([[0, 0, 0, 4, 5], [0, 0, 7, 8, 9]])
    behaviors = np.array([[0, 0, 0, 1, 1], [0, 0, 2, 2, 1]])
    candidates = np.array([[1, 2], [3, 4]])
    out = trim_left_padding({"history": history, "behaviors": behaviors, "candidates": candidates},
                            ["history", "behaviors"])
    np.testing.assert_array_equal(out["history"], history[:, 2:])
    np.testing.assert_array_equal(out["behaviors"], behaviors[:, 2:])
    assert out["candidates"] is candidates
    assert out["history"].flags.c_contiguous


def test_trim_keeps_one_column_of_an_all_padding_batch_and_respects_max_width() -> None:
    empty = np.zeros((3, 6), dtype=np.int64)
    assert trim_left_padding({"history": empty}, ["history"])["history"].shape == (3, 1)
    full = np.arange(1, 13).reshape(2, 6)
    assert trim_left_padding({"history": full}, ["history"])["history"].shape == (2, 6)
    np.testing.assert_array_equal(trim_left_padding({"history": full}, ["history"], max_width=4)["history"], full[:, -4:])
    assert trim_left_padding({"other": full}, ["history"]) == {"other": full}


def test_padded_width_and_length_order() -> None:
    rows = np.array([[0, 0, 3], [0, 2, 3], [1, 2, 3], [0, 0, 0]])
    assert padded_width(rows) == 3
    assert padded_width(rows[[0, 3]]) == 1
    np.testing.assert_array_equal(length_order(rows), [3, 0, 1, 2])
    with pytest.raises(ValueError):
        padded_width(rows[0])
