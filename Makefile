# rpicluster: the two commands of the README are `make demo` and `make test`.
# Both set up everything they need on a fresh Debian machine (run as root):
# a virtualenv with the development tools, a Docker engine, local images.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
comma := ,
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
RESOURCES := molecule/resources
export PATH := $(BIN):$(PATH)
export ANSIBLE_CONFIG := $(abspath ansible.cfg)

.PHONY: help venv lint pytest nox images molecule test test-arm64 test-armhf demo demo-down bench mutation wheel clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): requirements-dev.txt requirements-test.txt setup.cfg pyproject.toml
	@# A fresh Debian has python3 without ensurepip: venv needs python3-venv.
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
		apt-get -o DPkg::Lock::Timeout=600 update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

venv: $(STAMP)  ## create .venv with the development tools

lint: $(STAMP)  ## ruff, yamllint, ansible-lint (production profile)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/yamllint --strict .
	$(BIN)/ansible-lint --profile production

pytest: $(STAMP)  ## unit and integration tests (installs headless Chromium and promtool for the tests)
	bash $(RESOURCES)/browser.sh
	bash $(RESOURCES)/promtool.sh
	$(BIN)/pytest -q

# The Python versions the README claims (noxfile.py) other than .venv's, which `make pytest` runs.
OTHER_PYTHONS = $(BIN)/nox --list --json 2>/dev/null | $(BIN)/python -c 'import json, sys; \
	mine = "%d.%d" % sys.version_info[:2]; \
	print(" ".join(s["session"] for s in json.load(sys.stdin) if s["python"] != mine))'

nox: $(STAMP)  ## unit and integration tests on every claimed Python, 3.9 to 3.13 (pyenv's)
	bash $(RESOURCES)/browser.sh
	bash $(RESOURCES)/promtool.sh
	$(BIN)/nox

images:  ## the local "Pi" images for Molecule and the demo (Debian bookworm and trixie, amd64)
	bash $(RESOURCES)/docker-engine.sh
	bash $(RESOURCES)/build-image.sh bookworm amd64
	bash $(RESOURCES)/build-image.sh trixie amd64

# Every scenario on bookworm (Raspberry Pi OS's previous base, Python 3.11), then
# the fleet of `default` again on trixie (today's, Python 3.13).
molecule: $(STAMP) images  ## Molecule scenarios in systemd containers that stand in for Pis
	$(BIN)/molecule test --all
	RPICLUSTER_IMAGE_TAG=trixie $(BIN)/molecule test -s default

# The fleet of `default` on 64-bit and 32-bit ARM images under qemu-user-static
# (binfmt_misc): real ARM code paths, several times slower, so not part of
# `make test` (run times in bench/results.md).
test-arm64: $(STAMP)  ## the default scenario on emulated arm64 (bookworm), as on a 64-bit Pi OS
	bash $(RESOURCES)/docker-engine.sh
	bash $(RESOURCES)/build-image.sh bookworm arm64
	RPICLUSTER_IMAGE_TAG=bookworm-arm64 RPICLUSTER_MOLECULE_PATIENCE=6 $(BIN)/molecule test -s default

test-armhf: $(STAMP)  ## the default scenario on emulated armhf (bookworm), as on a 32-bit Pi OS
	bash $(RESOURCES)/docker-engine.sh
	bash $(RESOURCES)/build-image.sh bookworm armhf
	RPICLUSTER_IMAGE_TAG=bookworm-armhf RPICLUSTER_MOLECULE_PATIENCE=6 $(BIN)/molecule test -s default

test: $(STAMP)  ## everything CI runs: lint, pytest, molecule, the tests on the other Pythons
	@# On a fresh machine the Docker engine and the image take minutes: they are
	@# prepared in the background while lint and pytest run. Chromium and promtool first, so
	@# that two apt-get never race for the dpkg lock.
	bash $(RESOURCES)/browser.sh
	bash $(RESOURCES)/promtool.sh
	@mkdir -p .cache
	{ bash $(RESOURCES)/docker-engine.sh && bash $(RESOURCES)/build-image.sh bookworm amd64 \
		&& bash $(RESOURCES)/build-image.sh trixie amd64; } >.cache/image.log 2>&1 & \
	image=$$!; \
	if $(MAKE) --no-print-directory lint pytest; then status=0; else status=$$?; fi; \
	if ! wait $$image; then cat .cache/image.log; echo "make test: engine or image failed (above)" >&2; exit 1; fi; \
	cat .cache/image.log; \
	exit $$status
	@# The tests on the other claimed Pythons (nox) run while Molecule mostly waits on its
	@# containers; their output goes to .cache/nox.log and is shown when they fail.
	sessions=$$($(OTHER_PYTHONS)); \
	test -n "$$sessions" || { echo "make test: nox lists no sessions (noxfile.py)" >&2; exit 1; }; \
	$(BIN)/nox --no-color --sessions $$sessions >.cache/nox.log 2>&1 & \
	nox=$$!; \
	if $(MAKE) --no-print-directory molecule; then status=0; else status=$$?; fi; \
	if wait $$nox; then grep '^nox > [*] ' .cache/nox.log || true; else \
		cat .cache/nox.log; echo "make test: the tests failed on another Python (above)" >&2; \
		status=1; fi; \
	exit $$status

demo: $(STAMP)  ## a master and three slave containers deployed over SSH, then the status table
	bash $(RESOURCES)/docker-engine.sh
	bash $(RESOURCES)/build-image.sh bookworm amd64
	bash $(RESOURCES)/demo.sh up

demo-down:  ## remove the demo containers, network and inventory
	bash $(RESOURCES)/docker-engine.sh
	bash $(RESOURCES)/demo.sh down

# A benchmark exits 1 when it misses a target; `-` runs the others all the same
# (every figure, met or missed, is in bench/results.md).
bench: $(STAMP)  ## benchmarks; figures are appended to bench/results.md
	-$(BIN)/python -m bench.master_load
	-$(BIN)/python -m bench.failover
	-$(BIN)/python -m bench.failover --crash
	-$(BIN)/python -m bench.slave_footprint
	-$(BIN)/python -m bench.webserver
	-$(BIN)/python -m bench.deploy

# Not part of `make test` (it takes long): mutmut over the core modules, one module at a
# time with its own tests, in copies under .cache/mutation. MODULES=backoff,protocol limits
# the run; MUTATION_JOBS is how many mutants are tested at once. Scores: docs/testing.md.
MODULES ?=
MUTATION_JOBS ?= 2
mutation: $(STAMP)  ## mutation testing of the core modules (mutmut), score per module
	$(BIN)/pip install --quiet -r requirements-mutation.txt
	nice -n 10 $(BIN)/python tools/mutation.py --jobs $(MUTATION_JOBS) $(subst $(comma), ,$(MODULES))

wheel: $(STAMP)  ## build the pure-Python wheel into dist/
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir dist .

clean:  ## remove the virtualenv and build output
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
