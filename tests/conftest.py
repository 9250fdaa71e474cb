"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

# ../shared/data beside the repository root (tests/ is one level below the root).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder ../shared/data; tests that use it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent: real-data tests need the shared data folder beside the repo")
    return SHARED_DATA
