"""The edge artefact: an ONNX Runtime ORT-format model plus the operator list for a reduced build.

The paper deploys to mobile NPUs/DSPs through TFLite/SNPE. Our one-export answer is ONNX
Runtime's mobile path: the ORT format (flatbuffers, loads without protobuf) and a
``required_operators.config`` that ORT's minimal build takes (``--include_ops_by_config``) to
ship only the kernels this model uses. ExecuTorch was not chosen: its wheels pin their own torch,
which would replace the project's pinned 2.13.0.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from nimbleml.errors import NimbleError
from nimbleml.runtime.export import check_onnx_file

log = logging.getLogger(__name__)


@dataclass
class EdgeArtefact:
    ort_path: Path
    operators_config: Path
    size_mb: float
    n_operators: int

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def convert_to_ort(onnx_path: str | Path, out_path: str | Path) -> EdgeArtefact:
    """Convert with ONNX Runtime's own tool (fixed optimisations, type reduction) to ``out_path``."""
    onnx_path = check_onnx_file(onnx_path)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "in" / (out_path.stem + ".onnx")
        staged.parent.mkdir()
        shutil.copy(onnx_path, staged)
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", "--optimization_style", "Fixed",
               "--enable_type_reduction", "--output_dir", str(Path(tmp) / "out"), str(staged)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        produced = sorted((Path(tmp) / "out").rglob("*.ort"))
        if done.returncode != 0 or not produced:
            raise NimbleError(f"ORT-format conversion failed: {done.stderr.strip()[-300:]}", path=onnx_path,
                              fix="check that ONNX Runtime supports every operator of the graph")
        shutil.copy(produced[0], out_path)
        configs = sorted((Path(tmp) / "out").rglob("*.config"))
        ops_config = out_path.with_suffix(".required_operators.config")
        shutil.copy(configs[0], ops_config)
    n_ops = sum(len(line.split(";")[-1].split(",")) for line in ops_config.read_text().splitlines()
                if line and not line.startswith("#"))
    log.info("edge model %s (%.2f MB, %d operators)", out_path, out_path.stat().st_size / 2**20, n_ops)
    return EdgeArtefact(out_path, ops_config, out_path.stat().st_size / 2**20, n_ops)
