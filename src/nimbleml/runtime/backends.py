"""One model, many runtimes: a ``Backend`` per runtime, in one registry.

Every backend answers ``predict(inputs: dict[str, ndarray]) -> ndarray`` (the graph's first
output) for any batch size, so the benchmark and the server swap them freely:

- ``torch``: PyTorch eager, the reference (``Backend.from_module``).
- ``torch-compile``: ``torch.compile`` (inductor, C++ on the CPU) of the same module.
- ``onnxruntime``: ONNX Runtime's CPU execution provider (threads, graph optimisation level).
- ``openvino``: OpenVINO's CPU plugin reading the same ONNX file.
- ``onnxruntime-cuda`` / ``onnxruntime-tensorrt``: ONNX Runtime's GPU providers (TensorRT
  with FP16, and INT8 for QDQ graphs). Available only where a GPU and ``onnxruntime-gpu`` are.

``best_backend()`` picks the fastest available kind: TensorRT, then CUDA, then ONNX Runtime CPU
(on this project's 2-core CPU ORT beat OpenVINO and eager torch at batch 1 in ``nimbleml bench rec``).
"""

from __future__ import annotations

import logging
import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nimbleml.errors import NimbleError
from nimbleml.runtime.export import check_onnx_file

log = logging.getLogger(__name__)


class Backend(ABC):
    """A loaded model on one runtime. Build with ``load(onnx_path)`` or ``from_module(module)``."""

    name: str = ""
    needs_module: bool = False  # True: built from a torch module, not from an ONNX file

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def load(cls, path: str | Path, **options: Any) -> Backend:
        raise NimbleError(f"backend {cls.name!r} runs a torch module, not a file",
                          fix=f"build it with get_backend({cls.name!r}).from_module(module)")

    @classmethod
    def from_module(cls, module: nn.Module, **options: Any) -> Backend:
        raise NimbleError(f"backend {cls.name!r} runs an exported ONNX file, not a torch module",
                          fix="export with nimbleml.runtime.export.export_onnx and load the file")

    @abstractmethod
    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """inputs: name -> array with the batch on axis 0. Returns the first output, float32."""

    def describe(self) -> dict:
        """Settings that matter for a benchmark row (threads, provider, precision)."""
        return {"backend": self.name}


class TorchBackend(Backend):
    """PyTorch eager in inference mode; torch's default intra-op threads unless ``threads``."""

    name = "torch"
    needs_module = True

    def __init__(self, module: nn.Module, threads: int | None = None):
        self.module = module.eval()
        self.threads = threads

    @classmethod
    def from_module(cls, module: nn.Module, threads: int | None = None, **_: Any) -> Backend:
        return cls(module, threads)

    def _run(self, module: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs.values()))
        return out.float().numpy()

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._run(self.module, inputs)

    def describe(self) -> dict:
        return {"backend": self.name, "threads": self.threads or torch.get_num_threads()}


class TorchCompileBackend(TorchBackend):
    """``torch.compile`` with dynamic shapes: one compiled graph for every batch size."""

    name = "torch-compile"

    def __init__(self, module: nn.Module, threads: int | None = None):
        super().__init__(module, threads)
        self.compiled = torch.compile(self.module, dynamic=True)

    @classmethod
    def is_available(cls) -> bool:
        return shutil.which(os.environ.get("CXX", "g++")) is not None  # inductor writes C++ on the CPU

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._run(self.compiled, inputs)


def _has_gpu() -> bool:
    return torch.cuda.is_available()


@dataclass
class OrtOptions:
    """ONNX Runtime session settings."""

    threads: int = 0  # intra-op threads; 0 = ORT's default (one per physical core)
    optimization: str = "all"  # graph optimisation level: disable | basic | extended | all
    fp16: bool = False  # TensorRT only: build FP16 engines
    int8: bool = False  # TensorRT only: INT8 engines (needs a QDQ-quantised graph)


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU execution provider."""

    name = "onnxruntime"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def __init__(self, path: Path, options: OrtOptions):
        import onnxruntime as ort

        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if options.optimization not in levels:
            raise NimbleError(f"unknown graph optimisation level {options.optimization!r}",
                              fix=f"use one of {sorted(levels)}")
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[options.optimization]
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.path, self.options = path, options
        self.session = ort.InferenceSession(str(path), so, providers=self._provider_list(options))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def _provider_list(self, options: OrtOptions) -> list:
        return list(self.providers)

    @classmethod
    def is_available(cls) -> bool:
        import onnxruntime as ort

        return all(p in ort.get_available_providers() for p in cls.providers)

    @classmethod
    def load(cls, path: str | Path, **options: Any) -> Backend:
        if not cls.is_available():
            raise NimbleError(f"backend {cls.name!r} is not available here",
                              fix="install onnxruntime-gpu on a machine with a GPU, or use 'onnxruntime'")
        path = Path(path)
        if path.suffix == ".ort":  # ORT format (the edge artefact): flatbuffers, not an ONNX protobuf
            if not path.is_file():
                raise NimbleError("ORT-format model file not found", path=path, fix="run `nimbleml export --target edge`")
            return cls(path, OrtOptions(**options))
        return cls(check_onnx_file(path), OrtOptions(**options))

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: inputs[name] for name in self.input_names}
        return self.session.run(None, feed)[0].astype(np.float32, copy=False)

    def describe(self) -> dict:
        return {"backend": self.name, "threads": self.options.threads or "default",
                "optimization": self.options.optimization, "providers": self.session.get_providers()}


class OnnxRuntimeCudaBackend(OnnxRuntimeBackend):
    name = "onnxruntime-cuda"
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")

    @classmethod
    def is_available(cls) -> bool:
        return _has_gpu() and super().is_available()


class OnnxRuntimeTensorRTBackend(OnnxRuntimeBackend):
    """TensorRT through ONNX Runtime; FP16 (and INT8 on QDQ graphs) when asked."""

    name = "onnxruntime-tensorrt"
    providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

    def _provider_list(self, options: OrtOptions) -> list:
        trt = ("TensorrtExecutionProvider", {"trt_fp16_enable": options.fp16, "trt_int8_enable": options.int8,
                                             "trt_engine_cache_enable": True,
                                             "trt_engine_cache_path": str(self.path.parent / "trt_cache")})
        return [trt, "CUDAExecutionProvider", "CPUExecutionProvider"]

    @classmethod
    def is_available(cls) -> bool:
        return _has_gpu() and super().is_available()


class OpenVINOBackend(Backend):
    """OpenVINO's CPU plugin on the ONNX file (it converts the graph when it compiles it)."""

    name = "openvino"

    def __init__(self, path: Path, threads: int = 0, hint: str = "LATENCY"):
        import openvino as ov

        # f32: on CPUs with AMX / AVX-512 bf16 the CPU plugin silently runs an FP32 graph in bf16
        # (seen: 0.019 max difference in scores on a Xeon with AMX); int8 graphs stay int8
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.threads, self.hint = threads, hint
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]

    @classmethod
    def is_available(cls) -> bool:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return False
        return True

    @classmethod
    def load(cls, path: str | Path, threads: int = 0, hint: str = "LATENCY", **_: Any) -> Backend:
        return cls(check_onnx_file(path), threads, hint)

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        self.request.infer({name: inputs[name] for name in self.input_names})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)

    def describe(self) -> dict:
        return {"backend": self.name, "threads": self.threads or "default", "hint": self.hint}


BACKENDS: dict[str, type[Backend]] = {
    cls.name: cls
    for cls in (TorchBackend, TorchCompileBackend, OnnxRuntimeBackend, OpenVINOBackend,
                OnnxRuntimeCudaBackend, OnnxRuntimeTensorRTBackend)
}

# fastest first; the CPU order comes from `nimbleml bench rec` on this project's CPU
PREFERENCE = ("onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime", "openvino", "torch")


def get_backend(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise NimbleError(f"unknown backend {name!r}", fix=f"use one of {sorted(BACKENDS)}")
    return BACKENDS[name]


def available_backends() -> list[str]:
    return [name for name, cls in BACKENDS.items() if cls.is_available()]


def best_backend() -> str:
    """The fastest backend this machine can run (GPU providers first when a GPU is present)."""
    available = set(available_backends())
    return next(name for name in PREFERENCE if name in available)
