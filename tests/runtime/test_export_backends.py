"""Export parity on every available backend, dynamic batch, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nimbleml.errors import NimbleError
from nimbleml.runtime.backends import available_backends, best_backend, get_backend
from nimbleml.runtime.export import export_onnx, parity, topk_overlap

FILE_BACKENDS = [name for name in available_backends() if not get_backend(name).needs_module]


class TinyRanker(nn.Module):
    """Embeds a history, pools it causally-free, scores candidates: the shape of a recommender."""

    def __init__(self, n_items: int = 50, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.mix = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))

    def forward(self, history: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        keep = (history != 0).unsqueeze(-1).float()
        state = self.mix((self.emb(history) * keep).sum(1) / keep.sum(1).clamp(min=1.0))
        return torch.einsum("bd,bcd->bc", state, self.emb(candidates))


def _inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, 51, (batch, 20), generator=g)
    history[:, :5] = 0  # left padding
    return {"history": history, "candidates": torch.randint(1, 51, (batch, 10), generator=g)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = TinyRanker().eval()
    path = export_onnx(model, _inputs(4), tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    return model, path


@pytest.mark.parametrize("backend", FILE_BACKENDS)
@pytest.mark.parametrize("batch", [1, 7])
def test_parity_on_every_backend_and_batch(exported, backend: str, batch: int) -> None:
    model, path = exported
    report = parity(model, path, _inputs(batch, seed=batch), backend=backend)
    assert report.n_rows == batch
    assert report.max_abs_diff < 1e-4
    assert report.top10_overlap == 1.0


@pytest.mark.parametrize("backend", ["torch", "torch-compile"])
def test_module_backends_match_eager(exported, backend: str) -> None:
    if backend not in available_backends():
        pytest.skip(f"{backend} is not available on this machine")
    model, _ = exported
    inputs = _inputs(3)
    runner = get_backend(backend).from_module(model)
    with torch.no_grad():
        expected = model(*inputs.values()).numpy()
    np.testing.assert_allclose(runner.predict({k: v.numpy() for k, v in inputs.items()}), expected, atol=1e-5)


def test_best_backend_is_available_and_cpu_here() -> None:
    assert best_backend() in available_backends()
    if not torch.cuda.is_available():
        assert best_backend() == "onnxruntime"


def test_bad_files_and_names_give_one_clear_error(tmp_path: Path, exported) -> None:
    with pytest.raises(NimbleError, match="not found"):
        get_backend("onnxruntime").load(tmp_path / "missing.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    with pytest.raises(NimbleError, match="not a valid ONNX model"):
        get_backend("openvino").load(broken)
    with pytest.raises(NimbleError, match="unknown backend"):
        get_backend("tensorflow")
    with pytest.raises(NimbleError, match="torch module"):
        get_backend("torch").load(exported[1])


def test_topk_overlap_counts_shared_items() -> None:
    a = np.array([[5.0, 4, 3, 2, 1]])
    assert topk_overlap(a, a, k=2) == 1.0
    assert topk_overlap(a, -a, k=2) == 0.0
    assert topk_overlap(a, np.array([[5.0, 1, 3, 2, 4]]), k=2) == 0.5
    tied = np.array([[5.0, 3, 3, 1]])  # the 2nd and 3rd candidates score the same (a duplicate)
    assert topk_overlap(tied, np.array([[5.0, 2.9999999, 3, 1]]), k=2) == 1.0
    near = np.array([[5.0, 3.0000001, 3, 1]])  # within float rounding at the boundary: swapped, still agree
    assert topk_overlap(near, np.array([[5.0, 3, 3.0000001, 1]]), k=2) == 1.0
    assert topk_overlap(near, np.array([[5.0, 1, 2, 3]]), k=2) == 0.5  # a real disagreement
