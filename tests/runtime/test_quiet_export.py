"""An ONNX export prints nothing a user cannot act on (torch's exporter notices that torchvision
is absent, its internal deprecations); under -v those notices and nimbleml's debug lines show."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from nimbleml.logs import configure_logging, library_noise_as_debug
from nimbleml.runtime.export import EXPORTER_NOISE_LOGS, EXPORTER_NOISE_WARNINGS, export_onnx

REGISTRATION = "torch.onnx._internal.exporter._registration"

# torch builds its op registry once per process, so the torchvision notices come on a process's
# first export only: each case exports in a fresh interpreter, as `nimbleml export` does.
EXPORT_SCRIPT = """
import sys, torch
from torch import nn
from nimbleml.logs import configure_logging
from nimbleml.runtime.export import export_onnx
configure_logging(int(sys.argv[1]))
export_onnx(nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval(), {"input": torch.ones(2, 4)}, sys.argv[2])
"""


def _export_in_fresh_process(verbose: int, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, str(verbose), str(tmp_path / "m.onnx")],
                          capture_output=True, text=True, timeout=300, check=True)


@pytest.fixture(scope="module")
def quiet_and_verbose(tmp_path_factory) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    return (_export_in_fresh_process(0, tmp_path_factory.mktemp("quiet")),
            _export_in_fresh_process(1, tmp_path_factory.mktemp("verbose")))


def test_export_prints_no_torchvision_notice(quiet_and_verbose) -> None:
    quiet, _ = quiet_and_verbose
    assert "torchvision" not in quiet.stderr + quiet.stdout
    assert "Warning" not in quiet.stderr
    assert quiet.stderr == "" and quiet.stdout == ""  # the caller reports the file it asked for


def test_verbose_export_shows_the_notices_and_debug_lines(quiet_and_verbose) -> None:
    _, verbose = quiet_and_verbose
    assert verbose.stderr.count("torchvision is not installed") == 4  # nms, roi_align, roi_pool, deform_conv2d
    assert "exporting Sequential to ONNX opset 18" in verbose.stderr and "exported Sequential ->" in verbose.stderr


def test_in_process_export_is_quiet(tmp_path, capfd) -> None:
    configure_logging(0)
    export_onnx(nn.Linear(4, 2).eval(), {"input": torch.ones(2, 4)}, tmp_path / "lin.onnx")
    out, err = capfd.readouterr()
    assert "torchvision" not in out + err and "Warning" not in err


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("verbose", [0, 1])
def test_only_the_listed_notices_are_hidden(verbose: int) -> None:
    """The filter is narrow: another warning from the same logger, or the same notice outside an
    export, still reaches the user; under -v the notice comes through as DEBUG."""
    configure_logging(verbose)
    registration, records = logging.getLogger(REGISTRATION), _Records()
    registration.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with library_noise_as_debug(EXPORTER_NOISE_LOGS, EXPORTER_NOISE_WARNINGS):
                registration.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
                registration.warning("a real problem")
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
                warnings.warn("some other deprecation", FutureWarning, stacklevel=1)
        registration.warning("torchvision is not installed. Skipping %s", "torchvision::roi_pool")
    finally:
        registration.removeHandler(records)
        configure_logging(0)
    shown = [(r.levelname, r.getMessage()) for r in records.records]
    nms = [("DEBUG", "torchvision is not installed. Skipping torchvision::nms")] if verbose else []
    assert shown == [*nms, ("WARNING", "a real problem"), ("WARNING", "torchvision is not installed. Skipping torchvision::roi_pool")]
    hidden = [] if not verbose else ["`isinstance(treespec, LeafSpec)` is deprecated, use ..."]
    assert [str(w.message) for w in seen] == [*hidden, "some other deprecation"]
    assert not registration.filters
