"""Fuzz the HTTP API from its own OpenAPI document with schemathesis: whatever comes in, no 5xx."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.serve.conftest import KEYS


def test_no_server_errors_on_generated_requests(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    seen = []
    for result in schema.get_all_operations():
        operation = result.ok()
        seen.append(operation.path)

        # admin routes with the admin key, so their bodies reach the operation (not a 403); the rest with a standard key
        key = KEYS["admin"] if operation.path.startswith("/v1/admin/") else KEYS["standard"]

        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def no_5xx(case) -> None:
            response = case.call(base_url=server.url, headers={"x-api-key": key}, timeout=120)
            assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"

        no_5xx()
    assert {"/v1/recommend", "/v1/ingest", "/v1/admin/models", "/v1/admin/drain", "/v1/admin/share"} <= set(seen)
