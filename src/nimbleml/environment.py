"""Where a number was measured: hardware and library versions, written beside every result.

Timings and speed ratios only mean something next to the CPU, the thread count and the
library versions that produced them; every command's metrics.json carries this block.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

# Distributions whose versions change results or timings; missing ones are reported as None.
PACKAGES: tuple[str, ...] = (
    "nimbleml", "numpy", "pandas", "scipy", "scikit-learn", "torch", "arch", "pyts", "pyarrow",
    "onnx", "onnxruntime", "openvino",
)  # fmt: skip


def _cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux); platform.processor() otherwise."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Hardware and library versions, so numbers can be compared across machines."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "packages": {name: _version(name) for name in PACKAGES},
        "gpu": None,
    }
    if "torch" in sys.modules:  # only report a GPU if torch is already loaded (importing it costs ~1 s)
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info
