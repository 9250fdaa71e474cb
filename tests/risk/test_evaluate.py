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


def test_variance_floor_is_per_asset_and_the_rows_it_touches_are_counted():
    """Issue 25.2: one floor rule, per asset, for targets and forecasts; QLIKE also without floored rows."""
    from nimbleml.risk.evaluate import FLOOR_OF_MEDIAN_VARIANCE, VarianceFloor

    rng = np.random.default_rng(0)
    asset = np.repeat([0, 1], 500)
    target = np.where(asset == 0, 0.01, 1e-4) * np.sqrt(rng.chisquare(5, 1000) / 5)
    floor = VarianceFloor.fit(target, asset, np.where(asset == 0, 0, 1), n_assets=3)
    for a in (0, 1):
        assert floor.by_asset[a] == pytest.approx(FLOOR_OF_MEDIAN_VARIANCE * np.median(target[asset == a] ** 2))
    assert floor.by_asset[1] < 1e-4 * np.median(target**2)  # far below a pooled floor set by asset 0
    assert floor.by_asset[2] == pytest.approx(FLOOR_OF_MEDIAN_VARIANCE * np.median(target**2))  # unseen: pooled
    assert floor.by_class[1] == floor.by_asset[1]

    y = np.array([0.0, 0.0, 1e-4, 0.01])  # two zero targets (a flat yield week) on asset 1, then normal rows
    rows = floor.rows(np.array([1, 1, 1, 0]))
    low, lower = np.array([3e-6, 3e-6, 1e-4, 0.01]), np.array([1e-6, 1e-6, 1e-4, 0.01])
    # the old 1e-14 floor paid the lowest forecast on a zero target (loss ~ 30 + ln f): not any more
    assert qlike_loss(y[:1] ** 2, lower[:1] ** 2)[0] < qlike_loss(y[:1] ** 2, low[:1] ** 2)[0]
    assert qlike_loss(y[:1] ** 2, lower[:1] ** 2, rows[:1])[0] == qlike_loss(y[:1] ** 2, low[:1] ** 2, rows[:1])[0] == 0.0
    s = score_forecasts(y, np.array([1e-9, 1e-3, 2e-4, 0.01]), rows)
    assert s.n_target_floored == 2 and s.n_forecast_floored == 1
    full = qlike_loss(y**2, np.array([1e-9, 1e-3, 2e-4, 0.01]) ** 2, rows)
    assert s.qlike == pytest.approx(full.mean())
    assert s.qlike_unfloored == pytest.approx(full[2:].mean())
