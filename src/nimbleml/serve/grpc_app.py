"""gRPC front end: the same operations as HTTP, plus the standard gRPC health service.

It runs on the server's asyncio loop (``grpc.aio``) and calls the same ``Service``; a
``Rejected`` becomes the matching gRPC status (429 -> RESOURCE_EXHAUSTED with a
``retry-after`` trailer, 401 -> UNAUTHENTICATED, ...). The key travels in the ``x-api-key``
metadata entry.
"""

from __future__ import annotations

import json
import logging
import math
import time

import grpc
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
            answer = await self.service.recommend(caller, RecommendRequest(
                candidates=list(request.candidates), user_id=request.user_id or None,
                history=list(request.history) if request.has_history or request.history else None,
                behaviors=list(request.behaviors) or None))
            return serving_pb2.RecommendResponse(
                items=[serving_pb2.RankedItem(item=i.item, score=i.score if math.isfinite(i.score) else 0.0,
                                              excluded=not math.isfinite(i.score)) for i in answer.items],
                model_version=answer.model_version, path=answer.path)

        return await self._call("recommend", context, run)

    async def Ingest(self, request, context):
        async def run(caller):
            if request.ts < 0:
                raise Rejected(422, "ts: must be >= 0 (Unix seconds)")
            if not request.user_id:
                raise Rejected(422, "user_id: must not be empty")
            answer = await self.service.ingest(caller, IngestRequest(
                user_id=request.user_id, item_id=request.item_id, ts=request.ts, behavior=request.behavior or 1))
            return serving_pb2.IngestResponse(user_id=answer.user_id, history_length=answer.history_length,
                                              version=answer.version)

        return await self._call("ingest", context, run)

    async def Risk(self, request, context):
        async def run(caller):
            answer = await self.service.risk(caller, RiskRequest(
                asset=request.asset, window=[list(r.values) for r in request.window], asset_class=request.asset_class))
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


async def start_grpc(service: Service, host: str, port: int) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Start the gRPC server on host:port (0 = pick one); returns it, the bound port and its health servicer."""
    server = grpc.aio.server()
    serving_pb2_grpc.add_ServingServicer_to_server(ServingServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    status = health_pb2.HealthCheckResponse.SERVING if service.ready() else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
    return server, bound, health_servicer
