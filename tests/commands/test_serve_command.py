"""`nimbleml serve` flags that shape admission: bad values are refused with one message."""

from __future__ import annotations

import argparse

import pytest

from nimbleml.commands.serve import _two_ints, add_arguments


def test_shed_queue_parses_and_refuses_bad_values() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--shed-queue", "8,24"])
    assert args.shed_queue == (8, 24)
    default = parser.parse_args(["--model", "m"]).shed_queue
    assert default[0] <= default[1]
    for bad in ("8", "24,8", "0,4", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError):
            _two_ints(bad)


def test_history_users_must_be_positive() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--model", "m", "--history-users", "10"]).history_users == 10
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--history-users", "0"])


def test_shed_loop_lag_parses() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--model", "m", "--shed-loop-lag-ms", "5,20"]).shed_loop_lag_ms == (5, 20)
    soft, hard = parser.parse_args(["--model", "m"]).shed_loop_lag_ms
    assert 0 < soft <= hard
