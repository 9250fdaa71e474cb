"""Logging levels per -v count, logs on stderr only, and progress bars that nest in one display
(a second live display re-prints the first one's lines: the duplicated progress lines)."""

from __future__ import annotations

import logging

import pytest

from nimbleml import progress
from nimbleml.cli import build_parser
from nimbleml.logs import configure_logging


@pytest.fixture(autouse=True)
def _reset_logging():
    yield
    configure_logging(0)


@pytest.mark.parametrize(("verbose", "shown"), [
    (0, ["nimbleml info", "library warning"]),
    (1, ["nimbleml debug", "nimbleml info", "library warning"]),
    (2, ["nimbleml debug", "nimbleml info", "library debug", "library warning"]),
])
def test_each_v_shows_more_and_everything_goes_to_stderr(verbose: int, shown: list[str], capsys) -> None:
    configure_logging(verbose)
    ours, library = logging.getLogger("nimbleml.some_module"), logging.getLogger("somelibrary.exporter")
    ours.debug("nimbleml debug")
    ours.info("nimbleml info")
    library.debug("library debug")
    library.warning("library warning")
    out, err = capsys.readouterr()
    assert out == ""
    everything = ["nimbleml debug", "nimbleml info", "library debug", "library warning"]
    assert [m for m in everything if m in err] == shown


def test_cli_counts_v() -> None:
    parser = build_parser()
    assert parser.parse_args(["demo"]).verbose == 0
    assert parser.parse_args(["-v", "demo"]).verbose == 1 and parser.parse_args(["-vv", "demo"]).verbose == 2


def test_nested_bars_share_one_display(monkeypatch) -> None:
    monkeypatch.setenv("NIMBLEML_PROGRESS", "1")
    with progress.make_progress() as outer:
        fold = outer.add_task("folds", total=2)
        display = progress._live[0]
        with progress.make_progress() as inner:  # e.g. the CNN's epochs inside the folds loop
            first = inner.add_task("epoch 1/2", total=3)
            inner.update(first, advance=3)
            inner.add_task("epoch 2/2", total=3)  # the finished epoch's bar goes: one line per stage
            assert progress._live == [display]
            assert [t.description for t in display.tasks] == ["folds", "epoch 2/2"]
        assert [t.description for t in display.tasks] == ["folds"]  # the inner block's bars leave with it
        outer.advance(fold)
    assert progress._live == []


def test_track_yields_every_item_and_closes_its_display(monkeypatch) -> None:
    monkeypatch.setenv("NIMBLEML_PROGRESS", "1")
    assert [x for x in progress.track(range(3), "items")] == [0, 1, 2]
    assert progress._live == []
