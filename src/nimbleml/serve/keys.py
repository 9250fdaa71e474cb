"""API keys: who is calling, at which tier, and whether they may run admin operations.

A request's tier and priority come from its key, never from a field the client fills in.
Keys are read once at start from a JSON file (``--keys FILE``) or the ``NIMBLEML_API_KEYS``
environment variable (``key=tier,key=tier:admin,...``). A key file may hold a key's SHA-256
instead of the key itself (``"sha256:<64 hex digits>"``), so the file gives nothing away.

With no keys configured ("open" mode) every caller is anonymous ``standard``: the server binds
to loopback only (see ``commands/serve``), answers only requests whose ``Host`` names loopback
(a web page on another origin cannot reach it through DNS rebinding), and no caller is admin.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from nimbleml.errors import NimbleError

ENV_VAR = "NIMBLEML_API_KEYS"
HASHED = "sha256:"  # a key file entry "sha256:<hex>" is the key's SHA-256, not the key
LOOPBACK_HOSTS = frozenset({b"127.0.0.1", b"localhost", b"[::1]", b"::1"})


def digest(key: str) -> bytes:
    """SHA-256 of a key: what the ring stores and compares."""
    return hashlib.sha256(key.encode()).digest()


def is_loopback_host(host: bytes) -> bool:
    """A ``Host`` header value naming this machine's loopback (any port)."""
    host = host.strip().lower()
    if host.startswith(b"["):  # [::1]:8000
        return host.partition(b"]")[0] + b"]" in LOOPBACK_HOSTS
    name, _, port = host.rpartition(b":") if host.count(b":") == 1 else (host, b"", b"")
    return name in LOOPBACK_HOSTS and (not port or port.isdigit())


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
    """Look up a presented key by its SHA-256: the lookup's timing can only tell about the digest,
    which says nothing about the key, and the ring never holds a key in the clear."""

    def __init__(self, keys: dict[str, Caller], tiers: set[str]):
        self._keys: dict[bytes, Caller] = {}
        for key, caller in keys.items():
            if caller.tier not in tiers:
                raise NimbleError(f"key {caller.key_id} has unknown tier {caller.tier!r}", fix=f"use one of {sorted(tiers)}")
            if not key:
                raise NimbleError("an API key is empty", fix="give every key at least one character")
            if key.startswith(HASHED):
                try:
                    hashed = bytes.fromhex(key[len(HASHED):])
                except ValueError:
                    hashed = b""
                if len(hashed) != 32:
                    raise NimbleError(f"key {caller.key_id}: {HASHED} must be followed by 64 hex digits",
                                      fix="write sha256:$(printf %s KEY | sha256sum | cut -c1-64)")
                self._keys[hashed] = caller
            else:
                self._keys[digest(key)] = caller

    @property
    def open(self) -> bool:
        """No keys configured: everyone is an anonymous standard caller (loopback only), nobody admin."""
        return not self._keys

    def callers(self) -> list[Caller]:
        """Every caller a key can be (the anonymous one in open mode), each once."""
        return list(dict.fromkeys(self._keys.values())) if self._keys else [Caller(tier="standard")]

    def caller(self, presented: str | None, admin: bool = False, host: bytes | None = None) -> Caller:
        """The caller for a presented key; AuthError 401/403 otherwise.

        host: the request's ``Host`` header where the front end has one; in open mode it must
        name loopback."""
        if self.open:
            if admin:
                raise AuthError(403, "admin operations need an admin key, and this server has no keys configured: "
                                     "start it with --keys FILE or NIMBLEML_API_KEYS=KEY=premium:admin")
            if host is not None and not is_loopback_host(host):
                raise AuthError(403, "this server has no API keys, so it answers only requests addressed to "
                                     "127.0.0.1 or localhost; configure keys to serve other hosts")
            return Caller(tier="standard")
        if not presented:
            raise AuthError(401, "missing API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'")
        found = self._keys.get(digest(presented))
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
    """JSON ``{"KEY": {"tier": "premium", "admin": false, "id": "team-a"}, ...}`` -> keys;
    ``"sha256:<hex>"`` in place of ``"KEY"`` gives the key's SHA-256 instead of the key."""
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
