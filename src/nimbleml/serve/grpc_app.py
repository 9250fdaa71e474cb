"""gRPC front end: the same operations as HTTP, plus the standard gRPC health service.

It runs on the server's asyncio loop (``grpc.aio``) and calls the same ``Service``; a
``Rejected`` becomes the matching gRPC status (429 -> RESOURCE_EXHAUSTED with a
``retry-after`` trailer, 401 -> UNAUTHENTICATED, ...). The key travels in the ``x-api-key``
metadata entry. A Recommend with no candidates (proto3 cannot tell an empty list from none)
retrieves them, as an HTTP request without the field does.

Every request is validated as HTTP validates it: the protobuf fields go through
``msgspec.convert`` into the same msgspec Structs, with the same limits (id lengths and
characters, value ranges, list lengths), so a 100k-character user id is refused here too.

The health status follows the service's readiness (``ReadinessHealth``): NOT_SERVING while no
worker is ready (starting, all draining or restarting) and for good once shutdown begins.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time

import grpc
import msgspec
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nimbleml.serve.proto import serving_pb2, serving_pb2_grpc
from nimbleml.serve.schemas import IngestRequest, RecommendRequest, RiskRequest
from nimbleml.serve.service import Rejected, Service

log = logging.getLogger(__name__)

SERVICE_NAME = "nimbleml.serve.v1.Serving"
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.UNIMPLEMENTED,
    409: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _convert(request_type: type, fields: dict) -> object:
    """Protobuf fields -> the HTTP route's msgspec Struct, checked against the same limits (422 otherwise)."""
    try:
        return msgspec.convert(fields, request_type)
    except msgspec.ValidationError as exc:
        raise Rejected(422, f"invalid request: {exc}") from exc


def _key(context: grpc.aio.ServicerContext) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == "x-api-key":
            return value
    return None


class ServingServicer(serving_pb2_grpc.ServingServicer):
    """Maps protobuf messages to the service's msgspec requests and back."""

    def __init__(self, service: Service):
        self.service = service

    async def _call(self, route: str, context, operation):
        started = time.perf_counter()
        tier, status = "unknown", 200
        try:
            caller = self.service.caller(_key(context))
            tier = caller.tier
            self.service.admit(caller)
            return await operation(caller)
        except Rejected as err:
            status = err.status
            if err.retry_after_s:
                context.set_trailing_metadata((("retry-after", str(max(1, round(err.retry_after_s)))),))
            await context.abort(GRPC_CODES.get(err.status, grpc.StatusCode.UNKNOWN), err.message)
        finally:
            self.service.observe(f"grpc_{route}", tier, status, time.perf_counter() - started)

    async def Recommend(self, request, context):
        async def run(caller):
            answer = await self.service.recommend(caller, _convert(RecommendRequest, {
                "candidates": list(request.candidates) or None, "user_id": request.user_id or None,
                "history": list(request.history) if request.has_history or request.history else None,
                "behaviors": list(request.behaviors) or None}))
            return serving_pb2.RecommendResponse(
                items=[serving_pb2.RankedItem(item=i.item, score=i.score if math.isfinite(i.score) else 0.0,
                                              excluded=not math.isfinite(i.score)) for i in answer.items],
                model_version=answer.model_version, path=answer.path)

        return await self._call("recommend", context, run)

    async def Ingest(self, request, context):
        async def run(caller):
            answer = await self.service.ingest(caller, _convert(IngestRequest, {
                "user_id": request.user_id, "item_id": request.item_id, "ts": request.ts,
                "behavior": request.behavior or 1}))
            return serving_pb2.IngestResponse(user_id=answer.user_id, history_length=answer.history_length,
                                              version=answer.version)

        return await self._call("ingest", context, run)

    async def Risk(self, request, context):
        async def run(caller):
            answer = await self.service.risk(caller, _convert(RiskRequest, {
                "asset": request.asset, "window": [list(r.values) for r in request.window],
                "asset_class": request.asset_class}))
            return serving_pb2.RiskResponse(asset=answer.asset, volatility=answer.volatility, breach=answer.breach,
                                            limit=answer.limit or 0.0, has_limit=answer.limit is not None,
                                            model_version=answer.model_version)

        return await self._call("risk", context, run)

    async def Models(self, request, context):
        try:
            self.service.caller(_key(context))
        except Rejected as err:
            await context.abort(GRPC_CODES[err.status], err.message)
        return serving_pb2.ModelsResponse(json=json.dumps(self.service.models()))


class ReadinessHealth:
    """The standard health service's status for the server ("") and ``SERVICE_NAME``, following
    ``service.ready()``: polled every ``every_s`` seconds, set only when it changes."""

    def __init__(self, service: Service, every_s: float = 0.25):
        self.service = service
        self.every_s = every_s
        self.servicer = health.aio.HealthServicer()
        self._status: int | None = None
        self._task: asyncio.Task | None = None

    async def update(self) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if self.service.ready()
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        if status != self._status:
            self._status = status
            for name in ("", SERVICE_NAME):
                await self.servicer.set(name, status)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            await self.update()

    async def start(self) -> None:
        await self.update()
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def shutdown(self) -> None:
        """NOT_SERVING for good: the server is stopping."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.servicer.enter_graceful_shutdown()


async def start_grpc(service: Service, host: str, port: int) -> tuple[grpc.aio.Server, int, ReadinessHealth]:
    """Start the gRPC server on host:port (0 = pick one); returns it, the bound port and its health follower."""
    server = grpc.aio.server()
    serving_pb2_grpc.add_ServingServicer_to_server(ServingServicer(service), server)
    readiness = ReadinessHealth(service)
    health_pb2_grpc.add_HealthServicer_to_server(readiness.servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await readiness.start()  # before the port opens: no health check sees the servicer's default
    await server.start()
    return server, bound, readiness
