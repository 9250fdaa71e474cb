"""Logging set-up for the command line; the library itself only calls logging.getLogger(__name__)."""

from __future__ import annotations

import logging

from rich.logging import RichHandler


def configure_logging(verbose: bool = False) -> None:
    """Send nimbleml's logs to stderr through rich (INFO; DEBUG with --verbose). Other libraries
    log at WARNING and above only: the ONNX exporter and quantiser write hundreds of INFO lines."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )
    logging.getLogger("nimbleml").setLevel(logging.DEBUG if verbose else logging.INFO)
