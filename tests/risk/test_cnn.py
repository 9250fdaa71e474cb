"""RiskCNN shapes and the CNNForecaster estimator on synthetic volatility data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nimbleml.errors import NimbleError
from nimbleml.risk.cnn import CNNForecaster, mean_qlike
from nimbleml.risk.imaging import get_encoder
from nimbleml.risk.model import RiskCNN, RiskCNNConfig
from nimbleml.risk.samples import RiskSamples

N_FEATURES, WINDOW = 4, 12


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core runner, 2 threads contend and run 5-25x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_samples(n: int, seed: int) -> RiskSamples:
    """Feature 0 carries the (scaled) log vol over the window; target = vol x noise.

    Each sample's true daily vol is exp(N(-4.5, 0.6)) and persists over the window, so the
    last columns of feature 0 predict the target; the other features are noise.
    """
    rng = np.random.default_rng(seed)
    log_vol = rng.normal(-4.5, 0.6, n)
    windows = rng.random((n, N_FEATURES, WINDOW)).astype(np.float32) * 0.2
    path = log_vol[:, None] + rng.normal(0, 0.1, (n, WINDOW))
    windows[:, 0, :] = ((path + 7.0) / 5.0).astype(np.float32)  # roughly in [0, 1]
    target = np.exp(log_vol) * np.sqrt(rng.chisquare(5, n) / 5)
    har = np.repeat((np.exp(log_vol) ** 2)[:, None], 3, axis=1)
    return RiskSamples(
        windows=windows,
        target=target,
        dates=np.full(n, np.datetime64("2020-01-01", "ns")),
        asset=np.zeros(n, np.int64),
        asset_class=rng.integers(0, 4, n).astype(np.int64),
        har=har,
        har_range=har,
        returns=[pd.Series(dtype=float)],
        feature_names=[f"f{i}" for i in range(N_FEATURES)],
        asset_names=["synthetic"],
        horizon=5,
    )


def small_config(**overrides) -> RiskCNNConfig:
    values = dict(image_size=16, n_conv=3, filters=8, fc=(32, 16), dropout=0.1, batch_size=128, max_epochs=6)
    return RiskCNNConfig(**{**values, **overrides})


@pytest.mark.parametrize("config", [RiskCNNConfig(), RiskCNNConfig.tuned(), RiskCNNConfig(batch_norm=True)])
def test_forward_shapes(config: RiskCNNConfig) -> None:
    torch.manual_seed(0)
    model = RiskCNN(config).eval()
    images = torch.rand(5, config.in_channels, 32, 32)
    out = model(images, torch.tensor([0, 1, 2, 3, 0]))
    assert out.shape == (5,) and out.dtype == torch.float32
    assert model.feature_dim == config.filters  # pooled down to 1x1


def test_tuned_config_is_the_papers() -> None:
    tuned = RiskCNNConfig.tuned()
    assert (tuned.kernel, tuned.pool, tuned.lr) == (5, 3, 5e-4)
    assert RiskCNNConfig.from_dict(tuned.to_dict()) == tuned


def test_forecaster_learns_and_is_deterministic(tmp_path: Path) -> None:
    train, val, test = synthetic_samples(3000, 0), synthetic_samples(800, 1), synthetic_samples(800, 2)
    encoder = get_encoder("heatmap", image_size=16)
    forecaster = CNNForecaster(small_config(), encoder, seed=3, max_train_samples=2000).fit(train, val)

    forecast = forecaster.predict(test)
    assert forecast.shape == (len(test),) and (forecast > 0).all()
    constant = np.full(len(test), np.mean(train.target**2))
    assert mean_qlike(test.target**2, forecast**2) < 0.8 * mean_qlike(test.target**2, constant)
    assert forecaster.config_.in_channels == 1 and forecaster.config_.image_size == 16
    assert 1 <= forecaster.best_epoch_ <= len(forecaster.history_) <= 6
    assert {"train_loss", "val_qlike", "samples_per_s"} <= set(forecaster.history_[0])

    again = CNNForecaster(small_config(), encoder, seed=3, max_train_samples=2000).fit(train, val)
    np.testing.assert_array_equal(again.predict(test), forecast)

    loaded = CNNForecaster.load(forecaster.save(tmp_path / "cnn"))
    np.testing.assert_allclose(loaded.predict(test), forecast, rtol=1e-6)


@pytest.mark.parametrize("target", ["vol", "var"])
def test_other_targets_give_positive_forecasts(target: str) -> None:
    train, val = synthetic_samples(600, 0), synthetic_samples(200, 1)
    forecaster = CNNForecaster(small_config(max_epochs=1), get_encoder("heatmap", image_size=16), target=target)
    forecast = forecaster.fit(train, val).predict(val)
    assert forecast.shape == (200,) and (forecast > 0).all()


def test_bad_inputs_raise() -> None:
    with pytest.raises(NimbleError, match="unknown CNN target"):
        CNNForecaster(small_config(), get_encoder("heatmap"), target="price")
    train, val = synthetic_samples(300, 0), synthetic_samples(100, 1)
    train.windows[7, 2, 3] = np.nan
    forecaster = CNNForecaster(small_config(max_epochs=1), get_encoder("heatmap", image_size=16))
    with pytest.raises(NimbleError, match="NaN"):
        forecaster.fit(train, val)
    with pytest.raises(NimbleError, match="not fitted"):
        forecaster.predict(val)


def test_warm_start_and_epoch_callback() -> None:
    """A warm-started fold begins from the previous fold's weights; on_epoch sees every epoch and can stop the fit."""
    train, val = synthetic_samples(600, 0), synthetic_samples(300, 1)
    encoder = get_encoder("heatmap", image_size=16)
    first = CNNForecaster(small_config(max_epochs=2), encoder, seed=3).fit(train, val)
    seen: list[tuple[int, float]] = []
    warm = CNNForecaster(small_config(max_epochs=1, lr=1e-12), encoder, seed=4)
    warm.fit(train, val, warm_start=first, on_epoch=lambda e, q: seen.append((e, q)))
    assert warm.warm_started_ and [e for e, _ in seen] == [1]
    for name, tensor in first.state_dict().items():  # lr ~ 0: the weights stay where the warm start put them
        np.testing.assert_allclose(warm.state_dict()[name].numpy(), tensor.numpy(), atol=1e-6)

    class Stop(Exception):
        pass

    def stop(epoch: int, _q: float) -> None:
        raise Stop(epoch)

    with pytest.raises(Stop):
        CNNForecaster(small_config(max_epochs=3), encoder, seed=3).fit(train, val, on_epoch=stop)
    with pytest.raises(NimbleError, match="architecture"):
        CNNForecaster(small_config(filters=4), encoder, seed=3).fit(train, val, warm_start=first)


def test_class_calibration_fits_one_factor_per_asset_class(tmp_path: Path) -> None:
    train, val, test = synthetic_samples(2000, 0), synthetic_samples(800, 1), synthetic_samples(400, 2)
    for s in (train, val, test):
        s.target[s.asset_class == 1] *= 3.0  # class 1 is 9x more variable than its windows say
    encoder = get_encoder("heatmap", image_size=16)
    config = small_config(max_epochs=1, class_embedding_dim=0)  # the network cannot see the class
    fitted = CNNForecaster(config, encoder, seed=0, max_train_samples=1000, calibrate_by="class").fit(train, val)
    ratio = np.maximum(val.target**2, fitted.floor_.rows(val.asset)) / fitted._predict_variance(val)
    for c in range(4):
        assert fitted.class_calibration_[c] == pytest.approx(ratio[val.asset_class == c].mean())
    assert fitted.class_calibration_[1] > 4 * fitted.class_calibration_[0]
    loaded = CNNForecaster.load(fitted.save(tmp_path / "cnn"))
    np.testing.assert_allclose(loaded.predict(test), fitted.predict(test), rtol=1e-6)
    pooled = CNNForecaster(config, encoder, seed=0, max_train_samples=1000).fit(train, val)
    assert (pooled.class_calibration_ == pooled.calibration_).all()
    with pytest.raises(NimbleError, match="unknown calibration"):
        CNNForecaster(config, encoder, calibrate_by="asset")


def two_level_samples(n: int, seed: int) -> RiskSamples:
    """Asset 0 equity-like (daily vol ~1%), asset 1 a quiet short yield (vol ~6e-6, 1/3 of rows).

    Feature 0 carries each row's log vol, so the network can tell the two levels apart.
    """
    rng = np.random.default_rng(seed)
    asset = (rng.random(n) < 1 / 3).astype(np.int64)
    log_vol = np.where(asset == 1, -12.0, -4.6) + rng.normal(0, 0.2, n)
    windows = rng.random((n, N_FEATURES, WINDOW)).astype(np.float32) * 0.1
    windows[:, 0, :] = ((log_vol[:, None] + 13.0) / 9.0).astype(np.float32)
    target = np.exp(log_vol) * np.sqrt(rng.chisquare(5, n) / 5)
    har = np.repeat((np.exp(log_vol) ** 2)[:, None], 3, axis=1)
    return RiskSamples(windows=windows, target=target, dates=np.full(n, np.datetime64("2020-01-01", "ns")),
                       asset=asset, asset_class=np.where(asset == 1, 1, 0).astype(np.int64), har=har, har_range=har,
                       returns=[pd.Series(dtype=float)] * 2, feature_names=[f"f{i}" for i in range(N_FEATURES)],
                       asset_names=["EQ", "DGS3MO"], horizon=5)


def test_low_variance_asset_forecasts_go_below_the_pooled_floor() -> None:
    """Issue 25.1: a floor of 1e-4 x the pooled median variance (set by equities) sat above a
    quiet yield's whole forecast range; the floor is per asset now, so the CNN can forecast it."""
    train, val, test = two_level_samples(3000, 0), two_level_samples(600, 1), two_level_samples(600, 2)
    pooled_floor = 1e-4 * np.median(train.target**2)
    assert np.median(test.target[test.asset == 1] ** 2) < pooled_floor / 10  # the quiet asset lives below it
    fitted = CNNForecaster(small_config(max_epochs=4), get_encoder("heatmap", image_size=16), seed=0,
                           max_train_samples=None).fit(train, val)
    quiet = fitted.predict(test)[test.asset == 1] ** 2
    assert np.median(quiet) < pooled_floor / 10  # the pooled floor times any calibration factor did not allow this
    assert fitted.floor_.by_asset[1] < pooled_floor / 100
    assert (quiet >= fitted.floor_.by_asset[1]).all()


def test_class_calibration_survives_validation_subsampling_and_records_fallbacks() -> None:
    """Issue 25.5: a pooled draw of max_val_samples rows left a small class under the 100-row
    minimum, so it silently got the pooled factor; the draw is per class now, fallbacks named."""
    train = synthetic_samples(2000, 0)
    full = synthetic_samples(12000, 1)
    cls = full.asset_class
    keep = np.flatnonzero((cls <= 1) | ((cls == 3) & (np.cumsum(cls == 3) <= 300)) | ((cls == 2) & (np.cumsum(cls == 2) <= 60)))
    val = full.subset(keep)  # ~6000 equity + bond rows, 300 fx, 60 commodity
    val.target[val.asset_class == 3] *= 3.0  # fx is 9x more variable than its windows say
    config = small_config(max_epochs=1, class_embedding_dim=0)
    fitted = CNNForecaster(config, get_encoder("heatmap", image_size=16), seed=0, max_train_samples=1000,
                           max_val_samples=1000, calibrate_by="class").fit(train, val)
    assert fitted.class_calibration_[3] > 4 * fitted.class_calibration_[0]  # fx got its own factor
    assert fitted.calibration_fallback_ == ["commodity"]  # 60 rows < 100: pooled factor, and said so
    assert fitted.class_calibration_[2] == fitted.calibration_


def test_a_model_saved_with_a_pooled_floor_is_refused_with_a_message(tmp_path: Path) -> None:
    import json

    train, val = synthetic_samples(400, 0), synthetic_samples(200, 1)
    folder = CNNForecaster(small_config(max_epochs=1), get_encoder("heatmap", image_size=16), seed=0).fit(train, val).save(tmp_path / "m")
    meta = json.loads((folder / "forecaster.json").read_text())
    meta.pop("variance_floor")
    meta["transform"]["var_eps"] = 2e-8
    (folder / "forecaster.json").write_text(json.dumps(meta))
    with pytest.raises(NimbleError, match="per-asset variance floors"):
        CNNForecaster.load(folder)


def test_sqrt_class_sampling_gives_small_classes_their_share() -> None:
    """Issue 25.10: with 444 equities a uniform epoch leaves bonds ~3% of its rows; "sqrt" shares by sqrt(rows)."""
    from nimbleml.risk.cnn import _sqrt_class_draw

    asset_class = np.repeat([0, 1, 2], [9000, 900, 100])
    order = _sqrt_class_draw(asset_class, 2000, np.random.default_rng(0))
    share = np.bincount(asset_class[order], minlength=3) / len(order)
    expected = np.sqrt([9000, 900, 100]) / np.sqrt([9000, 900, 100]).sum()
    assert len(order) == 2000 and np.abs(share - expected).max() < 1e-3
    assert share[2] > 0.05 > 100 / 10000  # the small class is lifted well above its 1% of rows
    assert len(np.unique(order[asset_class[order] == 0])) == (asset_class[order] == 0).sum()  # large class: no repeats
