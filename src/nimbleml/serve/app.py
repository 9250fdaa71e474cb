"""HTTP front end: FastAPI for the API surface and /docs, a lean path for the hot routes.

Per-request HTTP, JSON and validation cost more than the model here (a naive FastAPI +
pydantic route spends ~2 ms of its ~3 ms outside the forward), so the hot POST routes
(``/v1/recommend``, ``/v1/ingest``, ``/v1/risk``) go to ``Handler``: no routing tree, no
dependency injection, no pydantic; msgspec decodes and validates the body in one C pass and
encodes the answer. FastAPI declares the same routes, with the msgspec schemas in the OpenAPI
document, and answers them through the same ``Handler`` when reached.

Two ways to serve it, both on uvicorn within ``http_limits.HttpLimits`` and measured side by
side by ``nimbleml bench serve``: ``asgi`` (default: ``HotRoutes``, an ASGI callable in front of
FastAPI) and ``fastapi`` (FastAPI for every route). A hand-written httptools server for the hot
routes was measured against ``asgi`` and deleted: it was 5.8 % slower (issue 24 item 8).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
from fastapi import FastAPI, Request, Response

from nimbleml.serve.schemas import (
    REQUESTS,
    RESPONSES,
    DrainRequest,
    ErrorResponse,
    IngestRequest,
    LoadModelRequest,
    RecommendRequest,
    RiskRequest,
    ShareRequest,
)
from nimbleml.serve.service import Rejected, Service

log = logging.getLogger(__name__)

PEER_HEADER = "x-nimbleml-peer"  # see serve/frontends.py
MAX_BODY_BYTES = 64 * 1024  # a Recommend with 100 history ids and 50 candidates is ~1.5 KiB
JSON = b"application/json"
_encoder = msgspec.json.Encoder()


@dataclass
class Route:
    """One JSON operation: its request type, whether it needs an admin key, and what answers it."""

    name: str  # metric label
    request_type: type | None  # msgspec Struct, or None for routes without a body
    call: Callable[..., Awaitable[object]]  # (caller, request) or (request) or () -> answer Struct/dict
    admin: bool = False
    limited: bool = True  # goes through the tier's token bucket and the shedder
    forward: bool = False  # repeated on the premium lane (model versions must match on every listener)


class Handler:
    """Auth -> admission -> decode -> operation -> encode, for any front end that has headers and a body."""

    def __init__(self, service: Service, max_body_bytes: int = MAX_BODY_BYTES):
        self.service = service
        self.max_body_bytes = max_body_bytes
        s = service
        self.routes: dict[str, Route] = {
            "/v1/recommend": Route("recommend", RecommendRequest, s.recommend),
            "/v1/ingest": Route("ingest", IngestRequest, s.ingest),
            "/v1/risk": Route("risk", RiskRequest, s.risk),
            "/v1/admin/models": Route("admin_load", LoadModelRequest,
                                      lambda c, r: s.load_model(r.model, r.share), admin=True, limited=False,
                                      forward=True),
            "/v1/admin/share": Route("admin_share", ShareRequest, lambda c, r: _now(s.set_share(r.share)),
                                     admin=True, limited=False, forward=True),
            "/v1/admin/promote": Route("admin_promote", None, lambda c, r: s.promote(), admin=True, limited=False,
                                       forward=True),
            "/v1/admin/rollback": Route("admin_rollback", None, lambda c, r: s.rollback(), admin=True,
                                        limited=False, forward=True),
            "/v1/admin/drain": Route("admin_drain", DrainRequest, lambda c, r: s.drain(r.worker), admin=True,
                                     limited=False),
        }
        self.decoders = {path: msgspec.json.Decoder(r.request_type) for path, r in self.routes.items() if r.request_type}

    async def handle(self, path: str, headers: list[tuple[bytes, bytes]], body: bytes
                     ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """Answer one POST: (status, JSON body, extra headers). headers: lower-case names."""
        route = self.routes[path]
        started = time.perf_counter()
        tier = "unknown"
        try:
            head = read_head(headers)
            caller = self.service.caller(head.key, admin=route.admin, host=head.host)
            tier = caller.tier
            if route.limited:
                self.service.admit(caller)
            if len(body) > self.max_body_bytes:
                raise Rejected(413, f"body of {len(body)} bytes is over the {self.max_body_bytes}-byte limit")
            request = None
            if route.request_type is not None:
                if not is_json(head.content_type):
                    raise Rejected(415, "send the body as JSON with 'Content-Type: application/json'")
                try:
                    request = self.decoders[path].decode(body)
                except msgspec.ValidationError as exc:
                    raise Rejected(422, f"invalid request: {exc}") from exc
                except msgspec.DecodeError as exc:
                    raise Rejected(400, f"malformed JSON: {exc}") from exc
            answer = await route.call(caller, request)
            if route.forward:
                self.service.save_versions()
                await self._forward(path, head.key, body, self.service.peer_urls(self._from_sibling(head)))
            status, payload, headers = 200, _encoder.encode(answer), []
        except Rejected as err:
            status, payload = err.status, _encoder.encode(ErrorResponse(err.message, err.status))
            headers = [(b"retry-after", str(max(1, round(err.retry_after_s))).encode())] if err.retry_after_s else []
        except Exception:  # a bug: answered 500 and counted in the 5xx metric the alert watches, never dropped
            log.exception("error answering %s", path)
            status, payload, headers = 500, _encoder.encode(ErrorResponse("internal error", 500)), []
        self.service.observe(route.name, tier, status, time.perf_counter() - started)
        return status, payload, headers

    def _from_sibling(self, head: RequestHead) -> bool:
        token = self.service.config.peer_token
        return token is not None and head.peer is not None and secrets.compare_digest(head.peer, token)

    async def _forward(self, path: str, key: str | None, body: bytes, peers: list[str]) -> None:
        """Repeat an admin model operation on each premium lane and sibling front end, after it succeeded here."""
        import httpx

        token = self.service.config.peer_token
        for url in peers:
            try:
                async with httpx.AsyncClient(timeout=300.0) as client:
                    answer = await client.post(f"{url}{path}", content=body, headers={
                        "x-api-key": key or "", "content-type": "application/json",
                        **({PEER_HEADER: token} if token else {})})
            except httpx.HTTPError as exc:
                raise Rejected(502, f"done here, but the premium lane or front end at {url} is unreachable ({exc}); "
                                    f"repeat the call there") from exc
            if answer.status_code >= 400:
                raise Rejected(502, f"done here, but the premium lane or front end at {url} answered "
                                    f"{answer.status_code}: {answer.text[:300]}")


async def _now(value: object) -> object:
    return value


@dataclass
class RequestHead:
    """The headers a request's admission looks at."""

    key: str | None = None  # 'x-api-key' or 'Authorization: Bearer'
    host: bytes = b""  # 'Host' (empty when absent: not loopback, refused in open mode)
    content_type: bytes = b""
    peer: str | None = None  # the run's token on an admin call repeated from a sibling front end


def read_head(headers: list[tuple[bytes, bytes]]) -> RequestHead:
    """One pass over the (lower-case name, value) header pairs."""
    head = RequestHead()
    for name, value in headers:
        if name == b"x-api-key":
            head.key = value.decode("latin-1")
        elif name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and head.key is None:
                head.key = token.strip()
        elif name == b"host":
            head.host = value
        elif name == b"content-type":
            head.content_type = value
        elif name == b"x-nimbleml-peer":
            head.peer = value.decode("latin-1")
    return head


def is_json(content_type: bytes) -> bool:
    """``application/json`` with any parameters (charset): a browser page on another origin cannot
    send it without a CORS preflight, which this server never grants."""
    return content_type.partition(b";")[0].strip().lower() == JSON


class HotRoutes:
    """ASGI: POSTs to the handler's routes are answered here; everything else goes to FastAPI."""

    def __init__(self, handler: Handler, app: Callable):
        self.handler = handler
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.handler.routes:
            await self.app(scope, receive, send)
            return
        limit = self.handler.max_body_bytes
        chunks, size, more = [], 0, True
        while more:  # stop reading past the limit: an oversized body is refused, not buffered
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client is gone, or the server refused the request (http_limits.py): nobody to answer
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
            if size > limit:
                break
        status, payload, headers = await self.handler.handle(scope["path"], scope["headers"], b"".join(chunks))
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", JSON), (b"content-length", str(len(payload)).encode()), *headers]})
        await send({"type": "http.response.body", "body": payload})


def _openapi_body(name: str) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{name}"}}}}}


def build_api(service: Service, max_body_bytes: int = MAX_BODY_BYTES) -> tuple[Handler, FastAPI]:
    """The hot-route handler and the FastAPI app (docs, health, metrics, admin, and the hot routes too)."""
    handler = Handler(service, max_body_bytes)
    app = FastAPI(title="nimbleml serve", version="1",
                  description="Real-time ranking and risk forecasts. Send your key as 'x-api-key' or 'Authorization: Bearer'.")

    def post_route(path: str, route: Route) -> None:
        async def endpoint(request: Request) -> Response:
            body = await request.body()
            status, payload, headers = await handler.handle(path, request.scope["headers"], body)
            return Response(payload, status, {k.decode(): v.decode() for k, v in headers}, media_type="application/json")

        extra = _openapi_body(route.request_type.__name__) if route.request_type else {}
        app.add_api_route(path, endpoint, methods=["POST"], name=route.name, openapi_extra=extra,
                          tags=["admin" if route.admin else "operations"],
                          responses={"200": {"description": "the answer"}, "4XX": {"description": "ErrorResponse"}})

    for path, route in handler.routes.items():
        post_route(path, route)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> Response:
        ready = service.ready()
        return Response(_encoder.encode({"ready": ready}), 200 if ready else 503, media_type="application/json")

    @app.get("/v1/models", tags=["operations"])
    async def models(request: Request) -> Response:
        """What is served (versions, input specs, workers); needs a key, like gRPC's Models."""
        head = read_head(request.scope["headers"])
        try:
            service.caller(head.key, host=head.host)
        except Rejected as err:
            return Response(_encoder.encode(ErrorResponse(err.message, err.status)), err.status,
                            media_type="application/json")
        return Response(_encoder.encode(service.models()), media_type="application/json")

    @app.get("/metrics", tags=["health"])
    async def metrics() -> Response:
        return Response(service.render_metrics(), media_type=service.metrics.content_type)

    _, components = msgspec.json.schema_components(REQUESTS + RESPONSES, ref_template="#/components/schemas/{name}")
    base_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = base_openapi()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return handler, app


def build_app(service: Service, lean: bool = True, max_body_bytes: int = MAX_BODY_BYTES) -> Callable:
    """The ASGI app for uvicorn: FastAPI behind the lean hot path when ``lean``."""
    handler, app = build_api(service, max_body_bytes)
    return HotRoutes(handler, app) if lean else app
