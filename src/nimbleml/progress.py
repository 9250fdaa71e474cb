"""The one progress-bar helper: rich progress bars on stderr that stay quiet when not on a terminal or under CI.

Bars nest: a ``track`` or ``make_progress`` opened while another is live adds its bars to the
same display (rich draws one live display at a time; a second one re-prints the first's lines
above it on every refresh). A finished bar disappears when the next bar of its block starts,
and all bars disappear when the outermost block ends: the log lines that follow ("epoch 3:
train loss ...", "har: fitted ...") are the record, so a result is never printed twice.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from nimbleml.logs import stderr_console

T = TypeVar("T")

_live: list[Progress] = []  # the display the outermost open block started (at most one)


def progress_enabled() -> bool:
    """Bars are shown on an interactive terminal unless NIMBLEML_PROGRESS=0."""
    flag = os.environ.get("NIMBLEML_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "no")
    return sys.stderr.isatty()


def _new_display() -> Progress:
    console = stderr_console()  # the logs' console, so log lines print above the bars
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not progress_enabled(),
        transient=console.is_terminal,
    )


class ProgressBars:
    """A block of bars on the shared display: ``add_task``, ``update`` and ``advance`` as on rich's
    ``Progress``. The outermost block starts and stops the display; inner blocks remove their
    bars on exit."""

    def __init__(self) -> None:
        self._display: Progress | None = None
        self._owner = False
        self._tasks: list[TaskID] = []

    def __enter__(self) -> ProgressBars:
        if _live:
            self._display = _live[-1]
        else:
            self._display, self._owner = _new_display(), True
            self._display.start()
            _live.append(self._display)
        return self

    def __exit__(self, *exc: object) -> None:
        display = self._display
        assert display is not None, "ProgressBars used outside its with-block"
        if self._owner:
            _live.remove(display)
            display.stop()
        else:
            for task in self._tasks:
                display.remove_task(task)
        self._display, self._tasks = None, []

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> TaskID:
        """A new bar; this block's bars that have finished are removed first (one line per stage)."""
        display = self._display
        assert display is not None, "ProgressBars used outside its with-block"
        finished = {t.id for t in display.tasks if t.finished}
        for task in [t for t in self._tasks if t in finished]:
            display.remove_task(task)
            self._tasks.remove(task)
        fields.setdefault("info", "")
        task = display.add_task(description, total=total, **fields)
        self._tasks.append(task)
        return task

    def update(self, task: TaskID, **kwargs: Any) -> None:
        assert self._display is not None, "ProgressBars used outside its with-block"
        self._display.update(task, **kwargs)

    def advance(self, task: TaskID, advance: float = 1) -> None:
        assert self._display is not None, "ProgressBars used outside its with-block"
        self._display.advance(task, advance)


def make_progress() -> ProgressBars:
    """A block of bars on stderr (use as a context manager); no output off a terminal."""
    return ProgressBars()


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar, like tqdm(items)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress() as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
