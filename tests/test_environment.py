"""The environment block written beside every result."""

from __future__ import annotations

import json

from nimbleml.environment import PACKAGES, environment


def test_environment_names_the_hardware_and_versions() -> None:
    env = environment()
    json.dumps(env)  # goes into metrics.json as is
    assert env["cpu"] and env["cpu_count"] >= 1 and 1 <= env["cpus_usable"] <= env["cpu_count"]
    assert set(env["packages"]) == set(PACKAGES)
    assert env["packages"]["numpy"] and env["packages"]["nimbleml"]
