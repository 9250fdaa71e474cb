# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean image image-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned: any other torch (or an unpinned one pulled by a dependency)
# downloads gigabytes of CUDA packages.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/nimbleml demo --out reports/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The `nimbleml serve` image (deploy/container/README.md): a Debian bookworm base made by mmdebstrap
# (no registry needed), then `buildah bud`; docker or podman build the same Containerfile elsewhere.
IMAGE ?= localhost/nimbleml-serve:0.1.0

image:
	NIMBLEML_IMAGE=$(IMAGE) deploy/container/build-image.sh

# Start the image's server on loopback with a tiny model, check /healthz, /readyz and one Recommend, stop it.
image-test: $(STAMP)
	PYTHON=$(BIN)/python deploy/container/smoke-test.sh $(IMAGE)

clean:
	rm -rf $(VENV) reports .pytest_cache
