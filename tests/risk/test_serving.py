"""Risk adapter: a fitted CNN folder -> one ONNX graph (heat map + CNN + transform) -> the Risk operation."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from nimbleml.errors import NimbleError
from nimbleml.risk.cnn import CNNForecaster
from nimbleml.risk.imaging import get_encoder
from nimbleml.risk.serving import prepare_risk_bundle
from nimbleml.serve.bundle import Bundle
from tests.risk.test_cnn import small_config, synthetic_samples
from tests.serve.conftest import KEYS, start_server


@pytest.fixture(scope="module")
def risk_model(tmp_path_factory):
    train, val = synthetic_samples(600, 0), synthetic_samples(200, 1)
    forecaster = CNNForecaster(small_config(max_epochs=1), get_encoder("heatmap", image_size=16), seed=0,
                               precision="fp32").fit(train, val)
    folder = forecaster.save(tmp_path_factory.mktemp("risk") / "model")
    return folder, forecaster


def test_served_graph_matches_the_forecaster(risk_model):
    folder, forecaster = risk_model
    bundle = Bundle.load(prepare_risk_bundle(folder))
    assert bundle.operation == "risk"
    import onnxruntime as ort

    samples = synthetic_samples(16, 7)
    session = ort.InferenceSession(str(bundle.graph_path("forecast")))
    served = session.run(None, {"window": samples.windows, "asset_class": samples.asset_class})[0]
    np.testing.assert_allclose(served, forecaster.predict(samples), rtol=2e-3)


def test_served_graph_applies_each_asset_class_its_own_calibration(risk_model, tmp_path):
    _, forecaster = risk_model
    folder = forecaster.save(tmp_path / "model")
    pooled_version = Bundle.load(prepare_risk_bundle(folder)).version
    forecaster = CNNForecaster.load(folder)
    forecaster.class_calibration_ = np.array([0.5, 1.0, 2.0, 4.0])  # as fitted with calibrate_by="class"
    forecaster.save(folder)  # same weights, new factors: the cached bundle must not be reused
    bundle = Bundle.load(prepare_risk_bundle(folder))
    assert bundle.version != pooled_version
    import onnxruntime as ort

    samples = synthetic_samples(16, 7)
    session = ort.InferenceSession(str(bundle.graph_path("forecast")))
    served = session.run(None, {"window": samples.windows, "asset_class": samples.asset_class})[0]
    np.testing.assert_allclose(served, forecaster.predict(samples), rtol=2e-3)
    assert len(set(samples.asset_class)) > 1


def test_other_encoders_are_refused_with_a_message(risk_model, tmp_path):
    folder, _ = risk_model
    meta = json.loads((folder / "forecaster.json").read_text())
    meta["encoder"] = {"name": "gaf", **{k: v for k, v in meta["encoder"].items() if k != "name"}}
    other = tmp_path / "gaf"
    other.mkdir()
    (other / "forecaster.json").write_text(json.dumps(meta))
    (other / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(NimbleError, match="heatmap"):
        prepare_risk_bundle(other)


def test_risk_route_flags_a_breach(risk_model, tmp_path):
    folder, forecaster = risk_model
    samples = synthetic_samples(2, 9)
    expected = forecaster.predict(samples)
    limits = tmp_path / "limits.json"
    limits.write_text(json.dumps({"LOW": float(expected[0]) / 2, "HIGH": float(expected[0]) * 2}))
    server = start_server(folder, tmp_path, "--risk-limits", str(limits))
    try:
        key = {"x-api-key": KEYS["premium"]}
        window = samples.windows[0].tolist()
        for asset, breach in (("LOW", True), ("HIGH", False)):
            answer = httpx.post(f"{server.url}/v1/risk", headers=key,
                                json={"asset": asset, "window": window, "asset_class": int(samples.asset_class[0])})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["breach"] is breach
            assert abs(body["volatility"] - expected[0]) / expected[0] < 2e-3
        bad = httpx.post(f"{server.url}/v1/risk", headers=key, json={"asset": "X", "window": [[0.1, 0.2]]})
        assert bad.status_code == 422 and "shape" in bad.json()["error"]
        text = httpx.get(f"{server.url}/metrics").text
        assert 'nimbleml_risk_breach_total{asset="LOW"} 1.0' in text
    finally:
        assert server.stop() == 0
