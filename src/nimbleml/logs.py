"""Logging set-up for the command line; the library itself only calls logging.getLogger(__name__).

Levels: nimbleml logs INFO and other libraries WARNING by default; ``-v`` shows nimbleml's DEBUG
lines and the library messages nimbleml demotes (``library_noise_as_debug``); ``-vv`` also
shows every library's DEBUG lines (the ONNX exporter alone writes thousands).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.logging import RichHandler

LOG_WIDTH_OFF_TERMINAL = 160  # columns when stderr is a file or a pipe: one record per line, not wrapped at 80


_console: list[Console] = []  # the process's one stderr console, made on first use


def stderr_console() -> Console:
    """The rich Console on stderr that log lines and progress bars share: a live bar display
    keeps its lines in place only when log lines are printed through its own console."""
    if not _console:
        console = Console(stderr=True)
        _console.append(console if console.is_terminal else Console(stderr=True, width=LOG_WIDTH_OFF_TERMINAL))
    return _console[0]


def configure_logging(verbose: int = 0) -> None:
    """Send logs to stderr through rich (stdout stays for a command's results).

    verbose (how many -v; False/True read as 0/1): 0: nimbleml INFO, other libraries WARNING;
    1: nimbleml DEBUG and the demoted library noise; 2: every library at DEBUG."""
    logging.basicConfig(
        level=logging.DEBUG if verbose >= 2 else logging.WARNING,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=stderr_console(), show_path=False, rich_tracebacks=False)],
        force=True,
    )
    logging.getLogger("nimbleml").setLevel(logging.DEBUG if verbose >= 1 else logging.INFO)


def debug_enabled() -> bool:
    """Whether nimbleml logs at DEBUG (``-v``)."""
    return logging.getLogger("nimbleml").isEnabledFor(logging.DEBUG)


class _DemoteToDebug(logging.Filter):
    """Relabels records whose message starts with one of ``prefixes`` as DEBUG and lets them
    through only under ``-v``; every other record passes untouched."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefixes):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return debug_enabled()


@contextmanager
def library_noise_as_debug(logs: Mapping[str, Sequence[str]],
                           python_warnings: Sequence[tuple[type[Warning], str]] = ()) -> Iterator[None]:
    """Inside the block, hide library messages a user cannot act on, unless ``-v``.

    logs: logger name -> message prefixes; those records become DEBUG (shown under -v only).
    python_warnings: (category, message regex) pairs ignored inside the block (shown under -v).
    The filters sit on the named loggers and in a ``warnings.catch_warnings`` scope, so every
    other message, and these messages outside the block, still reach the user."""
    filters = {name: _DemoteToDebug(tuple(prefixes)) for name, prefixes in logs.items()}
    for name, f in filters.items():
        logging.getLogger(name).addFilter(f)
    try:
        with warnings.catch_warnings():
            if not debug_enabled():
                for category, message in python_warnings:
                    warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for name, f in filters.items():
            logging.getLogger(name).removeFilter(f)
