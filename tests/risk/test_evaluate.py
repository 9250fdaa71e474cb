import numpy as np
import pytest

from nimbleml.risk.evaluate import qlike_loss, score_by_class, score_forecasts


def test_scores_against_hand_computed_values():
    y = np.array([0.01, 0.02, 0.03])
    f = np.array([0.02, 0.02, 0.02])
    s = score_forecasts(y, f)
    assert s.rmse == pytest.approx(np.sqrt((1e-4 + 0 + 1e-4) / 3))
    assert s.mae == pytest.approx(0.02 / 3)
    assert s.r2 == pytest.approx(1 - 2e-4 / 2e-4)  # SSE 2e-4, SST 2e-4 -> 0
    ratios = y**2 / f**2
    assert s.qlike == pytest.approx(np.mean(ratios - np.log(ratios) - 1))
    assert s.mse_var == pytest.approx(np.mean((f**2 - y**2) ** 2))


def test_qlike_is_zero_at_truth_and_penalises_underprediction_more():
    assert qlike_loss(np.array([4.0]), np.array([4.0]))[0] == pytest.approx(0.0)
    under = qlike_loss(np.array([4.0]), np.array([2.0]))[0]
    over = qlike_loss(np.array([4.0]), np.array([8.0]))[0]
    assert under > over > 0


def test_by_class_splits_rows():
    y = np.array([0.01, 0.02, 0.03, 0.04])
    cls = np.array([0, 0, 3, 3])
    out = score_by_class(y, y, cls)
    assert set(out) == {"equity", "fx"}
    assert out["fx"].rmse == 0.0 and out["fx"].n == 2
