"""The project's one error type.

Every message names what was wrong, where (a file, a field, a request) and the fix,
so a command can print it as one line and exit non-zero.
"""

from __future__ import annotations

from pathlib import Path


class NimbleError(Exception):
    """A user-facing error: bad input, bad configuration, missing data.

    Parameters
    ----------
    problem : what is wrong, e.g. "no usable rows".
    path : the file or folder concerned, if any.
    fix : what the user should do about it.
    """

    def __init__(self, problem: str, *, path: str | Path | None = None, fix: str | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        self.fix = fix
        parts = [f"{self.path}: {problem}" if self.path else problem]
        if fix:
            parts.append(f"fix: {fix}")
        super().__init__(" — ".join(parts))
