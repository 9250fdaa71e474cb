"""API keys: tiers from the key, 401 for missing/unknown keys, 403 for non-admin on admin routes."""

from __future__ import annotations

import json

import pytest

from nimbleml.errors import NimbleError
from nimbleml.serve.keys import AuthError, load_keyring, parse_env

TIERS = {"free", "standard", "premium"}


def test_env_keys_give_tier_and_admin(monkeypatch):
    monkeypatch.setenv("NIMBLEML_API_KEYS", "k1=free, k2=premium:admin")
    ring = load_keyring(None, TIERS)
    assert ring.caller("k1").tier == "free"
    assert ring.caller("k2", admin=True).admin
    with pytest.raises(AuthError) as err:
        ring.caller("k1", admin=True)
    assert err.value.status == 403
    for bad in (None, "", "nope"):
        with pytest.raises(AuthError) as err:
            ring.caller(bad)
        assert err.value.status == 401


def test_file_keys_and_bad_files(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"secret": {"tier": "standard", "id": "team-a"}}))
    assert load_keyring(path, TIERS).caller("secret").key_id == "team-a"
    path.write_text(json.dumps({"secret": {"tier": "gold"}}))
    with pytest.raises(NimbleError, match="unknown tier"):
        load_keyring(path, TIERS)
    path.write_text("{not json")
    with pytest.raises(NimbleError, match="bad API key file"):
        load_keyring(path, TIERS)
    with pytest.raises(NimbleError, match="not found"):
        load_keyring(tmp_path / "missing.json", TIERS)
    with pytest.raises(NimbleError):
        parse_env("justakey")


def test_no_keys_means_open(monkeypatch):
    monkeypatch.delenv("NIMBLEML_API_KEYS", raising=False)
    ring = load_keyring(None, TIERS)
    assert ring.open and ring.caller(None).tier == "standard"
