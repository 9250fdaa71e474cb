"""The operations behind every front end: Recommend, Ingest, Risk, and the admin ones.

HTTP and gRPC both call this class, so auth, limits, validation, batching and versions behave
the same on both. Errors are ``Rejected(status, message)`` with an HTTP status; the gRPC front
end maps it to a gRPC code.

Recommend for a known user whose state is fresh (computed in the background after its last
Ingest, for the current stable version) is the cached state against 50 rows of the item
table, in the front end, without a worker round trip; everything else is the full forward,
batched and run in a worker.

Recommend without candidates retrieves them: the user's state (cached when fresh, else the
bundle's state graph) searches the bundle's faiss index over the item table by inner product,
the history is left out when the bundle excludes it, and the ranker orders the top ones. A
bundle whose ranker adds a repeat term (``retrieval.recent_first``) puts the user's most recent
distinct items first and lets the index fill the rest. A bundle without an item table (an int8
ranker, a repeat-score ranker) retrieves with its float state but never scores with it: the
ranker graph always ranks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from nimbleml.errors import NimbleError
from nimbleml.serve.batcher import BatcherConfig, DeadlineExceeded, DynamicBatcher, QueueFull
from nimbleml.serve.bundle import Bundle, GraphSpec, InputSpec, recent_distinct
from nimbleml.serve.history import History, HistoryStore, InProcessHistory, StoreUnavailable
from nimbleml.serve.keys import AuthError, Caller, KeyRing
from nimbleml.serve.limiter import AdmissionController
from nimbleml.serve.metrics import ServerMetrics
from nimbleml.serve.router import InProcessPool, ModelVersions, PoolConfig, WorkerCrashed, WorkerError, WorkerPool
from nimbleml.serve.schemas import (
    IngestRequest,
    IngestResponse,
    RankedItem,
    RecommendRequest,
    RecommendResponse,
    RiskRequest,
    RiskResponse,
)

log = logging.getLogger(__name__)


class Rejected(Exception):
    """A request that gets an error answer: HTTP ``status``, a message, and Retry-After seconds for 429/503."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass
class ServeConfig:
    """Everything the service needs besides the model."""

    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    deadline_ms: float = 500.0  # a request not answered by then gets 504 instead of a late answer
    state_cache_users: int = 200_000  # cached user states (LRU), about 256 B each at dim 64
    risk_limits: dict[str, float] = field(default_factory=dict)  # asset -> volatility limit for the breach flag
    # a premium lane is a second server process, on its own port, at normal CPU priority while the
    # main one runs niced: it answers only callers whose tier rides priority 0 (and admin calls)
    lane: str | None = None  # None = the main server; "premium" = this process is the premium lane
    peers: list[str] = field(default_factory=list)  # lane URLs that admin model operations are repeated on
    # several front ends on one port (serve/frontends.py): the siblings' private URLs (a JSON list,
    # re-read at each admin call: a restarted sibling has a new one), the token that marks a call
    # repeated from a sibling (not repeated again), and where the served versions are written
    peers_file: Path | None = None
    peer_token: str | None = None
    versions_file: Path | None = None


@dataclass
class _CachedState:
    version: str
    history_version: int
    state: np.ndarray  # (D,) float32


def _check_ids(values: np.ndarray, spec: InputSpec, field_name: str) -> None:
    """Reject ids outside the spec's range (0 allowed where it is the padding value)."""
    if values.size == 0:
        return
    low = spec.pad if spec.pad is not None and spec.low is not None and spec.pad == spec.low - 1 else spec.low
    if (low is None or values.min() >= low) and (spec.high is None or values.max() <= spec.high):
        return  # the common case in two reductions; the element-wise check below only explains a failure
    bad = np.zeros(values.shape, dtype=bool)
    if spec.low is not None:
        bad |= values < spec.low
    if spec.high is not None:
        bad |= values > spec.high
    if spec.pad is not None:
        bad &= values != spec.pad
    if bad.any():
        first = int(values[bad][0])
        raise Rejected(422, f"{field_name}: {int(bad.sum())} unknown id(s), e.g. {first}; "
                            f"valid ids are {spec.low:g}..{spec.high:g}")


def _left_pad(values: np.ndarray, length: int) -> np.ndarray:
    """The last ``length`` values, left-padded with 0: the models' input layout."""
    out = np.zeros(length, dtype=np.int64)
    tail = values[-length:]
    if len(tail):
        out[length - len(tail):] = tail
    return out


def ranker_inputs(bundle: Bundle, history: np.ndarray, behaviors: np.ndarray | None,
                  candidates: np.ndarray) -> dict[str, np.ndarray]:
    """One request's ranker inputs in the graph's order, validated against the bundle's specs."""
    specs = {s.name: s for s in bundle.graphs["ranker"].inputs}
    want = specs["candidates"].shape[0]
    if len(candidates) != want:
        raise Rejected(422, f"candidates: expected exactly {want} item ids, got {len(candidates)}")
    _check_ids(candidates, specs["candidates"], "candidates")
    _check_ids(history, specs["history"], "history")
    length = specs["history"].shape[0]
    row = {"history": _left_pad(history, length), "candidates": candidates}
    if "behaviors" in specs:
        if behaviors is None:
            behaviors = np.where(history != 0, int(specs["behaviors"].low or 1), 0)
        elif len(behaviors) != len(history):
            raise Rejected(422, f"behaviors: {len(behaviors)} codes for {len(history)} history items")
        _check_ids(behaviors, specs["behaviors"], "behaviors")
        row["behaviors"] = _left_pad(behaviors, length)
    return {name: row[name] for name in specs}


def open_index(bundle: Bundle) -> faiss.Index:
    """The bundle's faiss index with its query-time parameters set; one NimbleError naming the file."""
    spec = bundle.retrieval
    path = bundle.folder / spec.file
    faiss.omp_set_num_threads(1)  # one query at a time on the front end's loop: threads only cost
    try:
        index = faiss.read_index(str(path))
        space = faiss.ParameterSpace()
        for name, value in spec.search.items():
            space.set_index_parameter(index, name, value)
    except RuntimeError as exc:
        raise NimbleError(f"unusable item index ({exc})", path=path, fix="prepare the bundle again") from exc
    return index


def _used_length(spec: GraphSpec) -> Callable[[dict[str, np.ndarray]], int] | None:
    """A row's non-padding length in the graph's first trimmable input (None: nothing to group by)."""
    trim = next((i for i in spec.inputs if i.trim), None)
    if trim is None:
        return None
    pad = trim.pad if trim.pad is not None else 0
    return lambda row: int(np.count_nonzero(row[trim.name] != pad))


class Service:
    """Auth, admission, validation, batching, routing and versions for every operation."""

    def __init__(self, bundle: Bundle, keys: KeyRing, config: ServeConfig | None = None,
                 store: HistoryStore | None = None, admission: AdmissionController | None = None,
                 prepare: Callable[[Path], Path] | None = None):
        self.config = config or ServeConfig()
        self.keys = keys
        self.store = store or InProcessHistory()
        self.admission = admission or AdmissionController()
        self.metrics = ServerMetrics()
        if isinstance(self.store, InProcessHistory):
            self.store.on_evict = self.metrics.history_evictions.inc
        self.prepare = prepare  # model folder -> bundle folder, from the workload adapter (admin load)
        self.pool: WorkerPool | InProcessPool = (
            InProcessPool(self.config.pool) if self.config.pool.workers == 0
            else WorkerPool(self.config.pool, on_restart=self.metrics.worker_restarts.inc))
        self.bundles: dict[str, Bundle] = {bundle.version: bundle}
        self.versions = ModelVersions(stable=bundle.version, folders={bundle.version: str(bundle.folder)})
        self.operation = bundle.operation
        self.item_tables: dict[str, np.ndarray] = {}
        self.indexes: dict[str, faiss.Index] = {}  # version -> item index (bundles with retrieval)
        self.states: OrderedDict[str, _CachedState] = OrderedDict()
        self._batchers: dict[tuple[str, str], DynamicBatcher] = {}
        self._background: set[asyncio.Task] = set()
        self._admin_lock = asyncio.Lock()
        self._using: Counter = Counter()  # requests in progress per version (a retired version waits for 0)
        self._observers: dict[tuple[str, str, int], tuple] = {}  # metric series per (route, tier, status)
        self.own_url: str | None = None  # a front end's private URL (set by the server), left out of its siblings
        self.started = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._open_tables(self.bundles[self.versions.stable])
        await self.pool.start(self.versions.folders)
        self.metrics.set_versions(self.versions.stable, None)
        for job in (self.admission.loop_lag.run(), self._publish_gauges()):
            task = asyncio.get_running_loop().create_task(job)
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        self.started = True

    async def close(self) -> None:
        self.started = False
        for batcher in self._batchers.values():
            await batcher.close()
        for task in list(self._background):
            task.cancel()
        await self.pool.close()
        await self.store.close()

    def _open_tables(self, bundle: Bundle) -> None:
        if bundle.item_table:
            self.item_tables[bundle.version] = np.load(bundle.folder / bundle.item_table, mmap_mode="r")
        if bundle.retrieval:
            self.indexes[bundle.version] = open_index(bundle)

    def ready(self) -> bool:
        return self.started and self.pool.ready_count() > 0

    def begin_shutdown(self) -> None:
        """Readiness is false from now on; requests in flight still finish (``close`` ends the rest)."""
        self.started = False

    # ------------------------------------------------------------------ auth and limits
    def caller(self, key: str | None, admin: bool = False, host: bytes | None = None) -> Caller:
        """Who calls (AuthError as Rejected 401/403). host: the HTTP Host header (None on gRPC)."""
        try:
            caller = self.keys.caller(key, admin=admin, host=host)
        except AuthError as err:
            raise Rejected(err.status, str(err)) from err
        if self.config.lane == "premium" and not admin and self.admission.tiers[caller.tier].priority != 0:
            raise Rejected(403, f"this port is the premium lane; tier {caller.tier} is served on the main port")
        return caller

    def queue_depth(self) -> int:
        return sum(b.depth() for b in self._batchers.values())

    def admit(self, caller: Caller) -> None:
        decision = self.admission.admit(caller.tier, self.queue_depth(), key=caller.key_id)
        if not decision.admitted:
            self.metrics.shed.labels(tier=caller.tier, reason=decision.reason).inc()
            what = {"rate": "rate limit of your tier", "key_rate": "rate limit of your key"}.get(decision.reason,
                                                                                               "server overloaded")
            raise Rejected(429, f"{what}; retry after {decision.retry_after_s:.2f} s", decision.retry_after_s)

    def observe(self, route: str, tier: str, status: int, seconds: float) -> None:
        """Record one answered request (metrics + the shedder's latency window)."""
        children = self._observers.get((route, tier, status))
        if children is None:  # labels() costs a lock and a tuple per call: look each series up once
            children = (self.metrics.requests.labels(route=route, tier=tier, status=str(status)),
                        self.metrics.latency.labels(route=route, tier=tier))
            self._observers[(route, tier, status)] = children
        children[0].inc()
        children[1].observe(seconds)
        if status < 400:
            self.admission.latency.add(seconds * 1000.0, self.admission.tiers[tier].shed_rank)

    # ------------------------------------------------------------------ batching
    def _batcher(self, version: str, graph: str) -> DynamicBatcher:
        key = (version, graph)
        batcher = self._batchers.get(key)
        if batcher is None:
            histogram = self.metrics.batch_size.labels(graph=graph)

            async def run_batch(rows: list[dict[str, np.ndarray]], priority: int,
                                deadlines: list[float]) -> list[np.ndarray | DeadlineExceeded]:
                inputs = {name: np.stack([row[name] for row in rows]) for name in rows[0]}
                out, live = await self.pool.run(version, graph, inputs, priority, np.asarray(deadlines))
                if live is None:
                    return list(out)
                ran = iter(out)  # the worker ran only the rows still in time
                return [next(ran) if ok else DeadlineExceeded("deadline passed before the worker reached it")
                        for ok in live]

            batcher = DynamicBatcher(run_batch, self.config.batcher, on_batch=histogram.observe,
                                     size_of=_used_length(self.bundles[version].graphs[graph]))
            self._batchers[key] = batcher
        return batcher

    async def _infer(self, version: str, graph: str, row: dict[str, np.ndarray], priority: int) -> np.ndarray:
        try:
            return await self._batcher(version, graph).submit(row, priority, self.config.deadline_ms / 1000.0)
        except QueueFull as exc:
            raise Rejected(503, f"queue full: {exc}", 1.0) from exc
        except DeadlineExceeded as exc:
            raise Rejected(504, f"not answered within {self.config.deadline_ms:g} ms: {exc}") from exc
        except WorkerCrashed as exc:
            raise Rejected(503, str(exc), 1.0) from exc
        except WorkerError as exc:
            raise Rejected(500, f"model error: {exc}") from exc

    # ------------------------------------------------------------------ recommend
    def _need(self, operation: str) -> None:
        if self.operation != operation:
            raise Rejected(404, f"this server answers {self.operation}, not {operation}")

    async def _history(self, user: str):
        try:
            return await self.store.get(user)
        except StoreUnavailable as exc:
            self.metrics.store_errors.inc()
            raise Rejected(503, str(exc), 1.0) from exc

    def _fresh_state(self, version: str, user: str, history_version: int) -> np.ndarray | None:
        """The user's cached state if it was computed from this history on this version."""
        cached = self.states.get(user)
        if cached is None or cached.version != version or cached.history_version != history_version:
            return None
        return cached.state

    def _cached_scores(self, version: str, user: str, history_version: int, history: np.ndarray,
                       candidates: np.ndarray) -> np.ndarray | None:
        state = self._fresh_state(version, user, history_version)
        table = self.item_tables.get(version)
        if state is None or table is None:
            return None
        scores = table[candidates] @ state
        if self.bundles[version].exclude_history:
            scores = np.where(np.isin(candidates, history[history != 0]), -np.inf, scores)
        return scores.astype(np.float32)

    async def recommend(self, caller: Caller, request: RecommendRequest) -> RecommendResponse:
        self._need("recommend")
        version = self.versions.pick()
        self._using[version] += 1
        try:
            return await self._recommend(caller, request, version)
        finally:
            self._using[version] -= 1

    async def _recommend(self, caller: Caller, request: RecommendRequest, version: str) -> RecommendResponse:
        bundle = self.bundles[version]
        behaviors = None if request.behaviors is None else np.asarray(request.behaviors, dtype=np.int64)
        if request.history is not None:
            history = np.asarray(request.history, dtype=np.int64)
            stored = None
        elif request.user_id is not None:
            stored = await self._history(request.user_id)
            history, behaviors = stored.items, stored.behaviors
        else:
            raise Rejected(422, "give user_id (history from the store) or history (item ids, oldest first)")
        if request.candidates is None:
            return await self._retrieve_and_rank(caller, request.user_id, version, history, behaviors, stored)
        candidates = np.asarray(request.candidates, dtype=np.int64)
        row = ranker_inputs(bundle, history, behaviors, candidates)
        scores = None
        if stored is not None:
            scores = self._cached_scores(version, request.user_id, stored.version, history, candidates)
        path = "cached" if scores is not None else "full"
        if scores is None:
            scores = await self._infer(version, "ranker", row, self.admission.tiers[caller.tier].priority)
            if stored is not None and stored.version and version == self.versions.stable:
                self._refresh_state(request.user_id, version, stored.version, row)
        return self._answer(version, path, candidates, scores)

    def _answer(self, version: str, path: str, candidates: np.ndarray, scores: np.ndarray) -> RecommendResponse:
        self.metrics.recommend_path.labels(path=path).inc()
        order = np.argsort(-scores, kind="stable")
        # plain Python lists: per-element numpy scalars cost ~10x more; msgspec writes -inf as null
        items = [RankedItem(c, s) for c, s in zip(candidates[order].tolist(), scores[order].tolist())]
        return RecommendResponse(items=items, model_version=version, path=path)

    async def _retrieve_and_rank(self, caller: Caller, user: str | None, version: str, history: np.ndarray,
                                 behaviors: np.ndarray | None, stored: History | None) -> RecommendResponse:
        """No candidates: the user's state searches the item index, the ranker orders what it found."""
        bundle = self.bundles[version]
        spec = {s.name: s for s in bundle.graphs["ranker"].inputs}["candidates"]
        want = spec.shape[0]
        if version not in self.indexes or "state" not in bundle.graphs:
            raise Rejected(422, f"candidates: model {version} has no item index to retrieve from, so this model "
                                f"needs candidates (send {want} item ids)")
        row = ranker_inputs(bundle, history, behaviors, np.full(want, int(spec.low or 0), dtype=np.int64))
        priority = self.admission.tiers[caller.tier].priority
        state = None if stored is None else self._fresh_state(version, user, stored.version)
        if state is None:
            state = await self._infer(version, "state", {s.name: row[s.name] for s in bundle.graphs["state"].inputs},
                                      priority)
            if stored is not None and stored.version and version == self.versions.stable:
                self._remember_state(user, version, stored.version, state)
        window = row["history"]
        seen = np.unique(window[window != 0]) if bundle.exclude_history else np.zeros(0, dtype=np.int64)
        lead = recent_distinct(window, bundle.retrieval.recent_first) if not bundle.exclude_history else window[:0]
        found = np.concatenate([lead, self._search(version, state, want - len(lead), np.union1d(seen, lead))])
        if len(found) == 0:  # the whole catalogue is in the history
            return self._answer(version, "retrieved", found, np.zeros(0, dtype=np.float32))
        # a catalogue with fewer items left than the ranker takes: repeat the first, answer only the real ones
        row["candidates"] = np.concatenate([found, np.full(want - len(found), found[0], dtype=np.int64)])
        scores = await self._infer(version, "ranker", row, priority)
        return self._answer(version, "retrieved", found, np.asarray(scores)[: len(found)])

    def _search(self, version: str, state: np.ndarray, k: int, exclude: np.ndarray) -> np.ndarray:
        """The top ``k`` item ids by inner product with ``state``, none of ``exclude``
        (fewer when the catalogue runs out)."""
        index = self.indexes[version]
        query = np.ascontiguousarray(state, dtype=np.float32).reshape(1, -1)
        _, positions = index.search(query, min(k + len(exclude), index.ntotal))
        positions = positions[0]
        ids = positions[positions >= 0] + self.bundles[version].retrieval.first_id
        return ids[~np.isin(ids, exclude)][:k].astype(np.int64)

    # ------------------------------------------------------------------ ingest and user state
    async def ingest(self, caller: Caller, request: IngestRequest) -> IngestResponse:
        self._need("recommend")
        version = self.versions.stable
        bundle = self.bundles[version]
        specs = {s.name: s for s in bundle.graphs["ranker"].inputs}
        _check_ids(np.array([request.item_id]), specs["candidates"], "item_id")
        if "behaviors" in specs:
            _check_ids(np.array([request.behavior]), specs["behaviors"], "behavior")
        try:
            new_version = await self.store.append(request.user_id, request.item_id, request.behavior, request.ts)
            history = await self.store.get(request.user_id)
        except StoreUnavailable as exc:
            self.metrics.store_errors.inc()
            raise Rejected(503, str(exc), 1.0) from exc
        if "state" in bundle.graphs and history.version == new_version:
            row = ranker_inputs(bundle, history.items, history.behaviors, np.full(specs["candidates"].shape[0],
                                   int(specs["candidates"].low or 1), dtype=np.int64))
            self._refresh_state(request.user_id, version, new_version, row)
        return IngestResponse(user_id=request.user_id, history_length=len(history.items), version=new_version)

    def _refresh_state(self, user: str, version: str, history_version: int, ranker_row: dict[str, np.ndarray]) -> None:
        """Compute the user's state in the background, on the lowest priority lane."""
        bundle = self.bundles[version]
        if "state" not in bundle.graphs:
            return
        row = {spec.name: ranker_row[spec.name] for spec in bundle.graphs["state"].inputs}
        lowest = self.config.batcher.priority_levels - 1

        async def update() -> None:
            if version not in self.bundles:  # retired meanwhile
                return
            self._using[version] += 1
            try:
                state = await self._infer(version, "state", row, lowest)
            except Rejected as exc:  # the next Recommend takes the full forward instead
                self.metrics.state_updates.labels(status="failed").inc()
                log.debug("state update for %s failed: %s", user, exc.message)
                return
            finally:
                self._using[version] -= 1
            self._remember_state(user, version, history_version, state)
            self.metrics.state_updates.labels(status="ok").inc()

        task = asyncio.get_running_loop().create_task(update())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _remember_state(self, user: str, version: str, history_version: int, state: np.ndarray) -> None:
        """Cache a user's state unless a newer history's state is already there (LRU bounded)."""
        current = self.states.get(user)
        if current is None or current.history_version <= history_version:
            self.states[user] = _CachedState(version, history_version, np.asarray(state, dtype=np.float32))
            self.states.move_to_end(user)
            while len(self.states) > self.config.state_cache_users:
                self.states.popitem(last=False)

    # ------------------------------------------------------------------ risk
    async def risk(self, caller: Caller, request: RiskRequest) -> RiskResponse:
        self._need("risk")
        version = self.versions.pick()
        self._using[version] += 1
        try:
            return await self._risk(caller, request, version)
        finally:
            self._using[version] -= 1

    async def _risk(self, caller: Caller, request: RiskRequest, version: str) -> RiskResponse:
        bundle = self.bundles[version]
        specs = {s.name: s for s in bundle.graphs["forecast"].inputs}
        window_spec = specs["window"]
        try:
            window = np.asarray(request.window, dtype=np.float32)
        except ValueError as exc:
            raise Rejected(422, f"window: rows of different lengths ({exc})") from exc
        if list(window.shape) != window_spec.shape:
            raise Rejected(422, f"window: expected shape {window_spec.shape} (features, days), got {list(window.shape)}")
        if not np.isfinite(window).all():
            raise Rejected(422, "window: values must be finite numbers")
        asset_class = np.asarray(request.asset_class, dtype=np.int64)
        _check_ids(asset_class.reshape(1), specs["asset_class"], "asset_class")
        out = await self._infer(version, "forecast", {"window": window, "asset_class": asset_class},
                                self.admission.tiers[caller.tier].priority)
        volatility = float(np.asarray(out).reshape(-1)[0])
        limit = self.config.risk_limits.get(request.asset, bundle.extra.get("limits", {}).get(request.asset))
        breach = limit is not None and volatility > limit
        if breach:
            self.metrics.risk_breach.labels(asset=request.asset).inc()
        return RiskResponse(asset=request.asset, volatility=volatility, breach=breach, limit=limit,
                            model_version=version)

    # ------------------------------------------------------------------ admin: versions and workers
    def models(self) -> dict:
        stable = self.bundles[self.versions.stable]
        inputs = {name: [dataclasses.asdict(i) for i in g.inputs] for name, g in stable.graphs.items()}
        return {**self.versions.to_dict(), "operation": self.operation, "backend": self.config.pool.backend,
                "inputs": inputs,
                "workers": [{"index": w.index, "ready": w in self.pool.ready_workers(),
                             "inflight_batches": len(w.inflight)} for w in self.pool.workers],
                "worker_restarts": self.pool.restarts}

    async def load_model(self, folder: str, share: float) -> dict:
        """Prepare and load a model folder as the candidate with ``share`` of the traffic."""
        async with self._admin_lock:
            if self.versions.candidate is not None:
                raise Rejected(409, f"candidate {self.versions.candidate} is loaded: promote or roll it back first")
            path = Path(folder)
            try:
                bundle_dir = await asyncio.get_running_loop().run_in_executor(None, self._prepare, path)
                bundle = Bundle.load(bundle_dir)
            except NimbleError as exc:
                raise Rejected(422, str(exc)) from exc
            if bundle.operation != self.operation:
                raise Rejected(422, f"{folder} answers {bundle.operation}; this server answers {self.operation}")
            if bundle.version in self.bundles:
                raise Rejected(409, f"version {bundle.version} is already loaded")
            try:
                self._open_tables(bundle)
            except NimbleError as exc:
                raise Rejected(422, str(exc)) from exc
            self.bundles[bundle.version] = bundle
            try:
                await self.pool.load(bundle.version, str(bundle.folder))
            except (WorkerCrashed, WorkerError) as exc:
                self.bundles.pop(bundle.version)
                self.item_tables.pop(bundle.version, None)
                self.indexes.pop(bundle.version, None)
                raise Rejected(503, f"loading {bundle.version} failed: {exc}") from exc
            self.versions.folders[bundle.version] = str(bundle.folder)
            self.versions.candidate, self.versions.share = bundle.version, share
            self.metrics.set_versions(self.versions.stable, self.versions.candidate)
            return self.models()

    def _prepare(self, path: Path) -> Path:
        if (path / "serving.json").is_file() or self.prepare is None:
            return path
        return self.prepare(path)

    def set_share(self, share: float) -> dict:
        if self.versions.candidate is None:
            raise Rejected(409, "no candidate version is loaded")
        self.versions.share = share
        return self.models()

    async def _retire(self, version: str) -> None:
        """Unload a version no request picks any more, once its in-flight batches are done."""
        deadline = asyncio.get_running_loop().time() + self.config.deadline_ms / 1000.0 + 1.0
        while self._using[version] and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)  # requests that picked it before the switch finish on it (or time out)
        for key in [k for k in self._batchers if k[0] == version]:
            await self._batchers.pop(key).close()
        await self.pool.unload(version)
        self.bundles.pop(version, None)
        self.item_tables.pop(version, None)
        self.indexes.pop(version, None)
        self.versions.folders.pop(version, None)

    async def promote(self) -> dict:
        async with self._admin_lock:
            if self.versions.candidate is None:
                raise Rejected(409, "no candidate version to promote")
            old = self.versions.stable
            self.versions.stable, self.versions.candidate, self.versions.share = self.versions.candidate, None, 0.0
            self.metrics.set_versions(self.versions.stable, None)
            await self._retire(old)
            return self.models()

    async def rollback(self) -> dict:
        async with self._admin_lock:
            if self.versions.candidate is None:
                raise Rejected(409, "no candidate version to roll back")
            old = self.versions.candidate
            self.versions.candidate, self.versions.share = None, 0.0
            self.metrics.set_versions(self.versions.stable, None)
            await self._retire(old)
            return self.models()

    async def drain(self, worker: int) -> dict:
        async with self._admin_lock:  # bounded: the pool gives up after its admin timeout
            try:
                await self.pool.drain(worker)
            except NimbleError as exc:
                raise Rejected(404, str(exc)) from exc
            except WorkerCrashed as exc:
                raise Rejected(503, str(exc), 1.0) from exc
            return self.models()

    def peer_urls(self, forwarded: bool) -> list[str]:
        """Where an admin model operation answered here is repeated: nowhere for a call a sibling
        repeated (it does that itself), else the lanes and the sibling front ends."""
        if forwarded:
            return []
        siblings = []
        if self.config.peers_file is not None and self.config.peers_file.is_file():
            siblings = [url for url in json.loads(self.config.peers_file.read_text()) if url != self.own_url]
        return [*self.config.peers, *siblings]

    def save_versions(self) -> None:
        """Write the served versions for a front end that restarts later (atomic replace)."""
        if self.config.versions_file is None:
            return
        folders = self.versions.folders
        saved = {"stable": folders[self.versions.stable], "candidate": folders.get(self.versions.candidate or ""),
                 "share": self.versions.share}
        partial = self.config.versions_file.with_suffix(".partial")
        partial.write_text(json.dumps(saved))
        partial.replace(self.config.versions_file)

    def _set_gauges(self) -> None:
        self.metrics.queue_depth.set(self.queue_depth())
        self.metrics.loop_lag.set(self.admission.loop_lag.value())
        self.metrics.inflight_batches.set(self.pool.inflight())
        self.metrics.workers_ready.set(self.pool.ready_count())

    async def _publish_gauges(self, period_s: float = 1.0) -> None:
        """With several front ends, /metrics is rendered by whichever one a scrape reaches: each
        writes its gauges every ``period_s`` for the others to sum."""
        while self.metrics.multiprocess:
            self._set_gauges()
            await asyncio.sleep(period_s)

    def render_metrics(self) -> bytes:
        self._set_gauges()
        return self.metrics.render()
