"""Who may call what: admin needs an admin key even with no keys configured, open mode answers
loopback only, hot routes take JSON only, /v1/models needs a key and shows no pids or paths.

The auth checks come before any model work, so most of these run on an unstarted ``Service``
behind the ASGI app (no worker process); the rest ask the session's real server."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import httpx
import pytest

from nimbleml.errors import NimbleError
from nimbleml.serve.app import build_app
from nimbleml.serve.bundle import Bundle
from nimbleml.serve.keys import AuthError, KeyRing, is_loopback_host, load_keyring, parse_env
from nimbleml.serve.service import Service
from tests.serve.conftest import KEYS, KEYS_ENV

TIERS = {"free", "standard", "premium"}
CANDIDATES = list(range(1, 51))
ADMIN_ROUTES = ["/v1/admin/models", "/v1/admin/share", "/v1/admin/promote", "/v1/admin/rollback", "/v1/admin/drain"]


def call(app, method: str, path: str, host: str = "127.0.0.1:8000", **kwargs) -> httpx.Response:
    """One request to the ASGI app in process, addressed to ``host``."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


@pytest.fixture(params=["lean", "fastapi"])
def open_app(request, rec_bundle):
    """An app with no keys configured (open mode), both ASGI faces."""
    return build_app(Service(Bundle.load(rec_bundle), KeyRing({}, TIERS)), lean=request.param == "lean")


@pytest.fixture
def keyed_app(rec_bundle):
    return build_app(Service(Bundle.load(rec_bundle), KeyRing(parse_env(KEYS_ENV), TIERS)))


def test_open_mode_grants_no_admin(open_app):
    for path in ADMIN_ROUTES:
        answer = call(open_app, "POST", path, json={"share": 0.5, "worker": 0, "model": "/tmp"})
        assert answer.status_code == 403, (path, answer.text)
        assert "admin key" in answer.json()["error"]
    with pytest.raises(AuthError) as err:
        KeyRing({}, TIERS).caller(None, admin=True)
    assert err.value.status == 403
    assert not KeyRing({}, TIERS).caller(None).admin


@pytest.mark.parametrize("host", ["evil.example:8000", "10.0.0.5", "127.0.0.1.evil.example", "localhost.evil"])
def test_open_mode_answers_only_requests_addressed_to_loopback(open_app, host):
    """DNS rebinding: a page of evil.example resolved to 127.0.0.1 still sends Host: evil.example."""
    body = {"history": [1], "candidates": CANDIDATES}
    for path in ("/v1/recommend", "/v1/ingest"):
        answer = call(open_app, "POST", path, host=host, json=body)
        assert answer.status_code == 403 and "127.0.0.1" in answer.json()["error"], answer.text
    assert call(open_app, "GET", "/v1/models", host=host).status_code == 403


def test_loopback_host_names():
    for host in (b"127.0.0.1", b"127.0.0.1:8000", b"localhost", b"LOCALHOST:1", b"[::1]:8000", b"[::1]"):
        assert is_loopback_host(host), host
    for host in (b"", b"evil.example", b"127.0.0.1.evil", b"127.0.0.1:80:80", b"localhost:x", b"[::2]:80"):
        assert not is_loopback_host(host), host


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_hot_routes_take_json_only(open_app, content_type):
    """A cross-site form or fetch can send these three without a preflight; never application/json."""
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/v1/recommend", "/v1/ingest", "/v1/risk"):
        answer = call(open_app, "POST", path, content=b'{"history":[1]}', headers=headers)
        assert answer.status_code == 415, (path, answer.text)
        assert "application/json" in answer.json()["error"]


def test_json_with_a_charset_is_json(keyed_app):
    answer = call(keyed_app, "POST", "/v1/ingest", content=b'{"user_id":"","item_id":1,"ts":0}',
                  headers={"content-type": "Application/JSON; charset=utf-8", "x-api-key": KEYS["standard"]})
    assert answer.status_code == 422  # decoded (and refused for the empty user id), not 415


def test_models_needs_a_key_and_shows_no_pids_or_paths(keyed_app, rec_bundle):
    assert call(keyed_app, "GET", "/v1/models").status_code == 401
    assert call(keyed_app, "GET", "/v1/models", headers={"x-api-key": "wrong"}).status_code == 401
    answer = call(keyed_app, "GET", "/v1/models", headers={"x-api-key": KEYS["free"]})
    assert answer.status_code == 200
    text = answer.text
    assert "pid" not in text and str(rec_bundle) not in text and "/tmp" not in text
    assert answer.json()["stable"] and answer.json()["inputs"]


def test_models_on_the_real_server_shows_no_pids(server):
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    workers = httpx.get(f"{server.url}/v1/models", headers={"x-api-key": KEYS["standard"]}).json()["workers"]
    assert workers and all("pid" not in w for w in workers)


def test_the_fast_server_takes_json_only_and_answers_the_same(server):
    body = json.dumps({"history": [1], "candidates": CANDIDATES})
    plain = httpx.post(f"{server.url}/v1/recommend", content=body,
                       headers={"x-api-key": KEYS["standard"], "content-type": "text/plain"})
    assert plain.status_code == 415
    ok = httpx.post(f"{server.url}/v1/recommend", content=body,
                    headers={"x-api-key": KEYS["standard"], "content-type": "application/json"})
    assert ok.status_code == 200, ok.text


def test_key_file_may_hold_sha256_digests(tmp_path):
    path = tmp_path / "keys.json"
    hashed = hashlib.sha256(b"s3cret-premium").hexdigest()
    path.write_text(json.dumps({f"sha256:{hashed}": {"tier": "premium", "admin": True, "id": "ops"},
                                "plain-key": {"tier": "free"}}))
    ring = load_keyring(path, TIERS)
    assert ring.caller("s3cret-premium", admin=True).key_id == "ops"
    assert ring.caller("plain-key").tier == "free"
    for wrong in (f"sha256:{hashed}", hashed, "s3cret-premium "):  # the digest itself is not the key
        with pytest.raises(AuthError):
            ring.caller(wrong)
    path.write_text(json.dumps({"sha256:abc": {"tier": "free"}}))
    with pytest.raises(NimbleError, match="64 hex digits"):
        load_keyring(path, TIERS)


def test_ray_app_checks_keys_and_json(rec_bundle, monkeypatch):
    pytest.importorskip("ray")
    from nimbleml.serve.ray_app import RankerDeployment
    from nimbleml.serve.service import Rejected

    monkeypatch.delenv("NIMBLEML_API_KEYS", raising=False)
    keys = {"x": ("k-ray", "premium")}
    replica_class = RankerDeployment.func_or_class
    open_replica = replica_class(str(rec_bundle))  # no keys: loopback Host only
    json_type = (b"content-type", b"application/json")
    open_replica.check([(b"host", b"127.0.0.1:8000"), json_type])
    for headers, status in (([(b"host", b"evil.example"), json_type], 403),
                            ([(b"host", b"127.0.0.1:8000"), (b"content-type", b"text/plain")], 415)):
        with pytest.raises(Rejected) as err:
            open_replica.check(headers)
        assert err.value.status == status
    monkeypatch.setenv("NIMBLEML_API_KEYS", ",".join(f"{k}={t}" for k, t in keys.values()))
    keyed = replica_class(str(rec_bundle))
    keyed.check([(b"x-api-key", b"k-ray"), json_type, (b"host", b"anywhere")])
    with pytest.raises(Rejected) as err:
        keyed.check([json_type, (b"host", b"127.0.0.1")])
    assert err.value.status == 401


def test_ray_config_binds_loopback():
    import yaml

    config = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "ray" / "serve_config.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"


def test_a_free_key_is_limited_on_its_own(keyed_app):
    """Per-key bucket (free: burst 50): the greedy key is refused with 'your key' before the free tier runs dry."""
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=keyed_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return [await client.post("/v1/ingest", json={}, headers={"x-api-key": KEYS["free"]}) for _ in range(60)]

    statuses = [a.status_code for a in asyncio.run(go())]
    assert statuses[:50] == [422] * 50  # admitted, then refused for the empty body
    assert 429 in statuses[50:]
