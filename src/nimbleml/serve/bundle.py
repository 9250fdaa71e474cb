"""A serving bundle: the folder a worker loads, described by ``serving.json``.

The workload adapters (``rec/serving.py``, ``risk/serving.py``) write it; the server only reads
it. It lists the ONNX graphs (run through a ``runtime`` backend), each input's shape, dtype and
valid id range (so requests are validated once at the boundary, without the server knowing
what an item is), an optional embedding table for the cached-state path, an optional faiss
index over that table for answering without candidates, and the operation the bundle answers
(``recommend`` or ``risk``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nimbleml.errors import NimbleError

MANIFEST = "serving.json"
OPERATIONS = ("recommend", "risk")


@dataclass
class InputSpec:
    """One graph input, per request (the batch axis is left out)."""

    name: str
    dtype: str  # numpy dtype name: "int64" or "float32"
    shape: list[int]  # per-request shape, e.g. [100] for a history
    low: float | None = None  # smallest valid value (ids: 1), None = unchecked
    high: float | None = None  # largest valid value (ids: n_items)
    pad: float | None = None  # a value allowed besides the range (ids: 0 = padding)
    trim: bool = False  # left-padded, and the graph's axis is dynamic: leading columns that are `pad`
    # in every row of a batch are dropped before the run (runtime.padding; exact for such graphs)

    def dummy(self, batch: int) -> np.ndarray:
        """A valid batch for warm-up: the range's lowest value (or zeros)."""
        value = self.low if self.low is not None else 0
        return np.full([batch, *self.shape], value, dtype=self.dtype)


@dataclass
class GraphSpec:
    """An ONNX file in the bundle and its inputs, in the graph's order."""

    file: str  # relative to the bundle folder
    inputs: list[InputSpec]
    output: str = "scores"


def recent_distinct(history: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` most recent distinct ids of an oldest-first, 0-padded history, newest first
    (``RetrievalSpec.recent_first``'s candidates)."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    events = history[history != 0][::-1]
    _, first = np.unique(events, return_index=True)
    return events[np.sort(first)][:n].astype(np.int64)


@dataclass
class RetrievalSpec:
    """A faiss index over the item table's rows: Recommend without candidates searches it with
    the user's state (inner product), then ranks what it found with the ranker graph."""

    file: str  # faiss index file, relative to the bundle folder
    search: dict[str, float] = field(default_factory=dict)  # faiss ParameterSpace values (efSearch, nprobe)
    first_id: int = 1  # the id of the index's vector 0 (item tables keep row 0 for padding)
    # the user's N most recent distinct history items lead the candidates, the index fills the rest:
    # for a ranker whose scores add a repeat term the inner product never sees (0: the index alone)
    recent_first: int = 0


@dataclass
class Bundle:
    """What ``serving.json`` holds; ``folder`` is where it was read from."""

    version: str  # shown in every answer and in /v1/models
    operation: str  # "recommend" or "risk"
    graphs: dict[str, GraphSpec]  # recommend: "ranker" (+ "state"); risk: "forecast"
    item_table: str | None = None  # .npy (n_items + 1, dim) float32 for scoring cached user states
    exclude_history: bool = False  # cached path: score items already in the history at -inf; retrieval: skip them
    retrieval: RetrievalSpec | None = None  # needs the "state" graph; None: every Recommend brings its candidates
    extra: dict = field(default_factory=dict)  # workload details the answer needs (e.g. risk limits)
    folder: Path = Path(".")

    def graph_path(self, name: str) -> Path:
        return self.folder / self.graphs[name].file

    def to_dict(self) -> dict:
        payload = asdict(self)
        payload.pop("folder")
        return payload

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Bundle:
        """Read and check a bundle; one NimbleError naming the file when anything is missing."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise NimbleError("serving manifest not found", path=path,
                              fix="point --model at a model folder (the server prepares it) or a prepared bundle")
        try:
            raw = json.loads(path.read_text())
            graphs = {
                name: GraphSpec(file=g["file"], inputs=[InputSpec(**i) for i in g["inputs"]], output=g.get("output", "scores"))
                for name, g in raw["graphs"].items()
            }
            bundle = cls(
                version=str(raw["version"]), operation=raw["operation"], graphs=graphs,
                item_table=raw.get("item_table"), exclude_history=bool(raw.get("exclude_history", False)),
                retrieval=RetrievalSpec(**raw["retrieval"]) if raw.get("retrieval") else None,
                extra=dict(raw.get("extra", {})), folder=folder,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise NimbleError(f"bad serving manifest ({exc})", path=path, fix="prepare the bundle again") from exc
        if bundle.operation not in OPERATIONS:
            raise NimbleError(f"unknown operation {bundle.operation!r}", path=path, fix=f"use one of {OPERATIONS}")
        for name in bundle.graphs:
            if not bundle.graph_path(name).is_file():
                raise NimbleError(f"graph {name!r} file is missing", path=bundle.graph_path(name),
                                  fix="prepare the bundle again")
        if bundle.item_table and not (folder / bundle.item_table).is_file():
            raise NimbleError("item table is missing", path=folder / bundle.item_table, fix="prepare the bundle again")
        if bundle.retrieval and not (folder / bundle.retrieval.file).is_file():
            raise NimbleError("item index is missing", path=folder / bundle.retrieval.file,
                              fix="prepare the bundle again")
        return bundle
