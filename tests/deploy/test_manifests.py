"""Deployment files: Kubernetes manifests against the Kubernetes schemas, Prometheus rules, Ray config."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_k8s_manifests_validate_against_the_kubernetes_schemas():
    import kubernetes_validate

    documents = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "nimbleml-serve.yaml").read_text()) if d]
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == ["Deployment", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Service", "Service"]
    version = kubernetes_validate.latest_version()
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)
    serve = next(d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "nimbleml-serve")
    container = serve["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_a_broken_manifest_is_caught():
    import kubernetes_validate

    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {"replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def test_prometheus_rules_pass_promtool_and_name_our_metrics():
    rules = DEPLOY / "prometheus" / "nimbleml-alerts.yaml"
    parsed = yaml.safe_load(rules.read_text())
    exprs = " ".join(r["expr"] for g in parsed["groups"] for r in g["rules"])
    from nimbleml.serve.metrics import ServerMetrics

    exported = ServerMetrics().render().decode()
    for name in ("nimbleml_request_latency_seconds_bucket", "nimbleml_requests_total", "nimbleml_shed_total",
                 "nimbleml_worker_restarts_total", "nimbleml_risk_breach_total", "nimbleml_workers_ready"):
        assert name in exprs
        assert name.removesuffix("_bucket").removesuffix("_total") in exported
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus); rules were parsed only")
    check = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_ray_serve_config_points_at_our_builder():
    config = yaml.safe_load((DEPLOY / "ray" / "serve_config.yaml").read_text())
    app = config["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    assert module == "nimbleml.serve.ray_app" and attr == "build_app"
    assert app["deployments"][0]["autoscaling_config"]["max_replicas"] >= 2
