"""The same Recommend as a Ray Serve deployment, for more machines than one.

Past one machine we use an existing distributed engine rather than a home-made cluster:
Ray Serve gives replicas, autoscaling on queue length, ``@serve.batch`` dynamic batching and an
HTTP proxy. Each replica loads the same serving bundle on the same runtime backend as our
workers (``LoadedBundle``) and validates requests with the same code (``ranker_inputs``).

Run it with ``serve run deploy/ray/serve_config.yaml`` (a cluster) or ``build_app({...})``.

Its HTTP face checks callers as our server does (``KeyRing``): keys from the ``keys`` file
argument or ``NIMBLEML_API_KEYS``; with none, only loopback requests addressed to
127.0.0.1/localhost; and ``Content-Type: application/json`` always. The shipped config binds
Ray's proxy to 127.0.0.1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from nimbleml.serve.app import is_json, read_head
from nimbleml.serve.keys import AuthError, KeyRing, load_keyring
from nimbleml.serve.limiter import default_tiers
from nimbleml.serve.schemas import ErrorResponse, RankedItem, RecommendRequest, RecommendResponse
from nimbleml.serve.service import Rejected, ranker_inputs
from nimbleml.serve.worker import LoadedBundle

# Ray Serve's autoscaler: replicas follow the requests queued per replica (here, one full batch)
AUTOSCALING = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16,
               "upscale_delay_s": 5, "downscale_delay_s": 30}


@serve.deployment(name="ranker", autoscaling_config=AUTOSCALING, max_ongoing_requests=128,
                  ray_actor_options={"num_cpus": 1})
class RankerDeployment:
    """One replica: a warmed runtime session of the bundle's ranker, fed by ``@serve.batch``."""

    def __init__(self, bundle: str, backend: str = "onnxruntime", threads: int = 1, keys: str | None = None):
        import msgspec

        self.keys: KeyRing = load_keyring(Path(keys) if keys else None, set(default_tiers()))
        self.model = LoadedBundle(bundle, backend, threads)
        self.model.warm((1, 16))
        self.decoder = msgspec.json.Decoder(RecommendRequest)
        self.encoder = msgspec.json.Encoder()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)  # the same batching as our server
    async def _rank(self, rows: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        inputs = {name: np.stack([row[name] for row in rows]) for name in rows[0]}
        return list(self.model.run("ranker", inputs))

    async def recommend(self, request: RecommendRequest) -> RecommendResponse:
        """Rank a request that carries its history (Ray has no history store here)."""
        if request.history is None:
            raise Rejected(422, "the Ray deployment needs history (it keeps no user store)")
        if request.candidates is None:
            raise Rejected(422, "the Ray deployment ranks the candidates it is given: send them (it does no retrieval)")
        candidates = np.asarray(request.candidates, dtype=np.int64)
        behaviors = None if request.behaviors is None else np.asarray(request.behaviors, dtype=np.int64)
        row = ranker_inputs(self.model.bundle, np.asarray(request.history, dtype=np.int64), behaviors, candidates)
        scores = await self._rank(row)
        order = np.argsort(-scores, kind="stable")
        items = [RankedItem(c, s) for c, s in zip(candidates[order].tolist(), scores[order].tolist())]
        return RecommendResponse(items=items, model_version=self.model.bundle.version, path="full")

    def check(self, headers: list[tuple[bytes, bytes]]) -> None:
        """The key (or, without keys, a loopback Host) and a JSON body, as our HTTP server asks."""
        head = read_head(headers)
        try:
            self.keys.caller(head.key, host=head.host)
        except AuthError as err:
            raise Rejected(err.status, str(err)) from err
        if not is_json(head.content_type):
            raise Rejected(415, "send the body as JSON with 'Content-Type: application/json'")

    async def __call__(self, http: Request) -> Response:
        import msgspec

        try:
            self.check(http.headers.raw)
            answer = await self.recommend(self.decoder.decode(await http.body()))
            return Response(self.encoder.encode(answer), 200, media_type="application/json")
        except Rejected as err:
            return Response(self.encoder.encode(ErrorResponse(err.message, err.status)), err.status,
                            media_type="application/json")
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return Response(self.encoder.encode(ErrorResponse(f"invalid request: {exc}", 422)), 422,
                            media_type="application/json")


def build_app(args: dict) -> serve.Application:
    """Ray Serve application builder: ``{"bundle": FOLDER, "backend": NAME, "threads": N, "keys": FILE}``
    (``keys`` optional: else ``NIMBLEML_API_KEYS`` on the replica, else loopback callers only)."""
    return RankerDeployment.bind(str(args["bundle"]), args.get("backend", "onnxruntime"), int(args.get("threads", 1)),
                                 args.get("keys"))
