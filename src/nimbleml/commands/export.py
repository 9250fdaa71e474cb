"""`nimbleml export --model DIR --out FILE.onnx [--target onnx|edge]`.

Exports the serving-shaped module of any model folder (recommender or risk CNN) with a dynamic
batch axis, checks parity against PyTorch eager on every available CPU runtime and writes
``FILE.parity.json``. ``--target edge`` also writes the ORT-format model and its operator list
(see ``nimbleml.runtime.edge``). A folder that ships its own int8 graph exports that graph.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nimbleml.commands.model_folder import ModelFolder, open_model_folder
from nimbleml.environment import environment
from nimbleml.runtime.backends import available_backends, get_backend
from nimbleml.runtime.edge import convert_to_ort
from nimbleml.runtime.export import export_onnx, parity


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export a model folder to ONNX (or an edge ORT model) with a parity check")
    parser.add_argument("--model", type=Path, required=True, help="model folder (rec train / compress / risk evaluate)")
    parser.add_argument("--out", type=Path, required=True, help="output .onnx file")
    parser.add_argument("--target", choices=["onnx", "edge"], default="onnx",
                        help="edge: also write FILE.ort (ONNX Runtime mobile format) and its operator list")
    parser.set_defaults(func=run_export)


def export_folder(folder: ModelFolder, out: Path) -> Path:
    """The folder's own graph when it ships one (int8 variants), else a fresh export."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if folder.onnx is not None:
        shutil.copy(folder.onnx, out)
        return out
    return export_onnx(folder.module, folder.make_inputs(4, 0), out, output_names=folder.output_names,
                       dynamic_dims=folder.dynamic_dims)


def parity_reports(folder: ModelFolder, onnx_path: Path, batch: int = 64) -> list[dict]:
    """Parity of every CPU runtime that reads files against the full eager forward."""
    inputs = folder.make_inputs(batch, 1)
    reports = []
    for name in available_backends():
        if get_backend(name).needs_module:
            continue
        reports.append(parity(folder.reference, onnx_path, inputs, backend=name).to_dict())
    return reports


def run_export(args: argparse.Namespace) -> int:
    console = Console()
    folder = open_model_folder(args.model)
    out = export_folder(folder, args.out)
    result: dict = {"model": str(folder.path), "kind": folder.kind, "onnx": str(out),
                    "size_mb": out.stat().st_size / 2**20, "parity": parity_reports(folder, out)}
    if args.target == "edge":
        edge = convert_to_ort(out, out.with_suffix(".ort"))
        edge_parity = parity(folder.reference, edge.ort_path, folder.make_inputs(64, 2), backend="onnxruntime")
        result["edge"] = {**edge.to_dict(), "parity": edge_parity.to_dict()}
    result["environment"] = environment()
    out.with_suffix(".export.json").write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"export {folder.path} -> {out} ({result['size_mb']:.2f} MB)")
    for column in ("backend", "max |diff|", "top-10 overlap"):
        table.add_column(column)
    rows = result["parity"] + ([result["edge"]["parity"] | {"backend": "onnxruntime (ORT format)"}] if "edge" in result else [])
    for row in rows:
        table.add_row(row["backend"], f"{row['max_abs_diff']:.2e}", f"{row['top10_overlap']:.3f}")
    console.print(table)
    return 0
