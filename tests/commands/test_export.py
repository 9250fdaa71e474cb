"""`nimbleml export`: ONNX and edge (ORT format) artefacts with parity, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort

from nimbleml.cli import main
from nimbleml.commands.model_folder import open_model_folder, to_numpy


def test_export_onnx_and_edge_with_parity(tiny_rec: tuple[Path, Path], tmp_path: Path) -> None:
    _, model_dir = tiny_rec
    out = tmp_path / "ranker.onnx"
    assert main(["export", "--model", str(model_dir), "--out", str(out), "--target", "edge"]) == 0
    report = json.loads(out.with_suffix(".export.json").read_text())
    assert {r["backend"] for r in report["parity"]} >= {"onnxruntime", "openvino"}
    for row in report["parity"] + [report["edge"]["parity"]]:
        assert row["max_abs_diff"] < 1e-4 and row["top10_overlap"] == 1.0
    assert report["edge"]["n_operators"] > 0 and Path(report["edge"]["ort_path"]).is_file()
    # the graph has a dynamic batch: 1 and 33 rows both run and match the full eager forward
    folder = open_model_folder(model_dir)
    session = ort.InferenceSession(str(out.with_suffix(".ort")))
    for batch in (1, 33):
        inputs = folder.make_inputs(batch, 7)
        expected = folder.reference(*inputs.values()).detach().numpy()
        np.testing.assert_allclose(session.run(None, to_numpy(inputs))[0], expected, atol=1e-4)


def test_missing_or_corrupt_model_files_give_one_clear_error(tiny_rec, tmp_path: Path, capsys) -> None:
    _, model_dir = tiny_rec
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["export", "--model", str(broken), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0]
    (broken / "model.safetensors").unlink()
    assert main(["export", "--model", str(broken), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "model folder not found" in capsys.readouterr().err
