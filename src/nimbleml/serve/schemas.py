"""Request and answer schemas: msgspec Structs, decoded and validated in one C pass.

The same Structs give the OpenAPI schema (``msgspec.json.schema_components``) that FastAPI
shows at /docs and schemathesis fuzzes, so there is one definition of each message. Shapes
and id ranges that depend on the loaded model (50 candidates, ids 1..n_items) are checked
against the bundle's input specs in ``service.py``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

# letters, digits and ._@+=- : no ':' '{' '}' or spaces, so an id can never reach into another
# user's Redis keys or break the cluster hash tag around it (see history.RedisHistory)
USER_ID_PATTERN = r"^[A-Za-z0-9._@+=-]+\Z"  # \Z: "$" would let a trailing newline through
UserId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=USER_ID_PATTERN)]
ItemId = Annotated[int, msgspec.Meta(ge=0, le=2**62)]


class RecommendRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Rank 50 candidates for a user: give ``user_id`` (history from the store) or ``history``.
    Without ``candidates`` the server retrieves the user's top 50 from the whole catalogue first."""

    candidates: Annotated[list[ItemId], msgspec.Meta(min_length=1, max_length=1024)] | None = None
    user_id: UserId | None = None
    history: Annotated[list[ItemId], msgspec.Meta(max_length=4096)] | None = None  # oldest first
    behaviors: Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=255)]], msgspec.Meta(max_length=4096)] | None = None


class RankedItem(msgspec.Struct):
    item: int
    score: float | None  # null: excluded (already in the user's history; -inf internally)


class RecommendResponse(msgspec.Struct):
    items: list[RankedItem]  # best first
    model_version: str
    path: str  # "cached" (user state from the last Ingest), "full" (the whole forward) or "retrieved" (no candidates)


class IngestRequest(msgspec.Struct, forbid_unknown_fields=True):
    """One behaviour event: a click updates the user's history and, in the background, its state."""

    user_id: UserId
    item_id: ItemId
    ts: Annotated[int, msgspec.Meta(ge=0, le=2**62)]  # event time, Unix seconds
    behavior: Annotated[int, msgspec.Meta(ge=0, le=255)] = 1  # behaviour code (1 = view/click)


class IngestResponse(msgspec.Struct):
    user_id: str
    history_length: int
    version: int  # events ever ingested for this user


class RiskRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A volatility forecast for one asset from its recent feature window."""

    asset: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    window: Annotated[list[list[float]], msgspec.Meta(min_length=1, max_length=64)]  # (n_features, days), scaled
    asset_class: Annotated[int, msgspec.Meta(ge=0, le=255)] = 0


class RiskResponse(msgspec.Struct):
    asset: str
    volatility: float  # forecast volatility, in the units the model was trained on
    breach: bool  # True when the forecast is above the asset's configured limit
    limit: float | None
    model_version: str


class LoadModelRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Admin: load a model folder as the candidate and send it ``share`` of the traffic."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    share: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.1


class ShareRequest(msgspec.Struct, forbid_unknown_fields=True):
    share: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class DrainRequest(msgspec.Struct, forbid_unknown_fields=True):
    worker: Annotated[int, msgspec.Meta(ge=0)]


class ErrorResponse(msgspec.Struct):
    error: str
    status: int


REQUESTS = (RecommendRequest, IngestRequest, RiskRequest, LoadModelRequest, ShareRequest, DrainRequest)
RESPONSES = (RecommendResponse, IngestResponse, RiskResponse, ErrorResponse)
