"""API keys: who is calling, at which tier, and whether they may run admin operations.

A request's tier and priority come from its key, never from a field the client fills in.
Keys are read once at start from a JSON file (``--keys FILE``) or the ``NIMBLEML_API_KEYS``
environment variable (``key=tier,key=tier:admin,...``). With no keys configured every caller
is anonymous ``standard`` and the server binds to loopback only (see ``commands/serve``).
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

from nimbleml.errors import NimbleError

ENV_VAR = "NIMBLEML_API_KEYS"


@dataclass(frozen=True)
class Caller:
    """What a key grants."""

    tier: str  # a tier name of the limiter (free / standard / premium)
    admin: bool = False  # may load, promote, roll back models and drain workers
    key_id: str = "anonymous"  # a short, non-secret label for logs and metrics


class AuthError(Exception):
    """``status`` is 401 (no or unknown key) or 403 (key lacks the right)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class KeyRing:
    """Look up a presented key in constant time per stored key (no timing side channel on the key)."""

    def __init__(self, keys: dict[str, Caller], tiers: set[str]):
        for key, caller in keys.items():
            if caller.tier not in tiers:
                raise NimbleError(f"key {caller.key_id} has unknown tier {caller.tier!r}", fix=f"use one of {sorted(tiers)}")
            if not key:
                raise NimbleError("an API key is empty", fix="give every key at least one character")
        self._keys = {key.encode(): caller for key, caller in keys.items()}

    @property
    def open(self) -> bool:
        """No keys configured: everyone is an anonymous standard caller (loopback only)."""
        return not self._keys

    def caller(self, presented: str | None, admin: bool = False) -> Caller:
        """The caller for a presented key; AuthError 401/403 otherwise."""
        if self.open:
            return Caller(tier="standard", admin=True)
        if not presented:
            raise AuthError(401, "missing API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'")
        found = None
        raw = presented.encode()
        for key, caller in self._keys.items():
            if hmac.compare_digest(key, raw):
                found = caller
        if found is None:
            raise AuthError(401, "unknown API key")
        if admin and not found.admin:
            raise AuthError(403, f"key {found.key_id} ({found.tier}) may not call admin operations")
        return found


def parse_env(text: str) -> dict[str, Caller]:
    """``key=tier[:admin],...`` -> keys."""
    keys: dict[str, Caller] = {}
    for index, part in enumerate(p.strip() for p in text.split(",") if p.strip()):
        key, sep, grant = part.partition("=")
        if not sep:
            raise NimbleError(f"entry {index} of {ENV_VAR} has no '='", fix="write key=tier or key=tier:admin")
        tier, _, flag = grant.partition(":")
        keys[key.strip()] = Caller(tier=tier.strip(), admin=flag.strip() == "admin", key_id=f"env{index}")
    return keys


def read_keys_file(path: Path) -> dict[str, Caller]:
    """JSON ``{"KEY": {"tier": "premium", "admin": false, "id": "team-a"}, ...}`` -> keys."""
    try:
        raw = json.loads(Path(path).read_text())
        return {
            key: Caller(tier=str(v["tier"]), admin=bool(v.get("admin", False)), key_id=str(v.get("id", f"key{i}")))
            for i, (key, v) in enumerate(raw.items())
        }
    except FileNotFoundError as exc:
        raise NimbleError("API key file not found", path=path, fix="pass an existing --keys file") from exc
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NimbleError(f"bad API key file ({exc})", path=path, fix='write {"KEY": {"tier": "premium"}}') from exc


def load_keyring(path: Path | None, tiers: set[str]) -> KeyRing:
    """Keys from ``path`` if given, else from the environment variable, else none (open)."""
    if path is not None:
        return KeyRing(read_keys_file(path), tiers)
    return KeyRing(parse_env(os.environ.get(ENV_VAR, "")), tiers)
