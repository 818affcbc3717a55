# Build, test and demo entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
.DEFAULT_GOAL := test

VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

PROTOS := $(shell find protos -name '*.proto' 2>/dev/null)
PB2 := $(PROTOS:.proto=_pb2.py)

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_TOOLS := nginx h2load haproxy dot

.PHONY: install system-tools protos bytecode test test-all lint demo demo-up demo-down check clean

install: $(STAMP) system-tools protos

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	# compat mode = a .pth with the repo root, so packages added after install import too
	$(PIP) install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $@

system-tools:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system tools (missing:$$missing)"; \
	  $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y nginx-light nghttp2-client haproxy graphviz; \
	fi

protos: $(PB2)

# Generated in place: `from protos.meshtest import echo_pb2, echo_pb2_grpc`.
%_pb2.py: %.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. $<

lint: install
	$(VENV)/bin/ruff check .

# The suite starts hundreds of Python processes (control planes, sidecars, services): their
# modules are compiled once here, so no process recompiles them (PYTHONDONTWRITEBYTECODE=1,
# as on CI machines, stops the interpreter from caching what it compiles).
BYTECODE_DIRS := mesh_common sidecar control_plane demo_services protos bench chaos tests

bytecode:
	@$(PY) -m compileall -q -j 0 $(BYTECODE_DIRS) >/dev/null

# Two workers (pytest-xdist), each module's tests in one of them (--dist loadfile), so a
# module's shared demo or control plane starts once: most tests wait on processes they start.
# test-all (with the slow and fuzz marks) the same way.
test: install bytecode
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -m "not slow and not fuzz" -q --durations=15 -n 2 --dist loadfile

test-all: install bytecode
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q --durations=15 -n 2 --dist loadfile

# The benchmarks (see bench/README.md and ../shared/BENCH.md): about 10 minutes.
.PHONY: bench
bench: install
	$(PY) -m bench --json bench/out/latest.json

# The demo (demo_services/): `demo` runs it in the foreground with a live panel (Ctrl-C stops
# it all); `demo-up` starts it in the background, `demo-down` stops it; `check` audits it.
# Ports and directories move by environment (MESH_DEMO_DIR, MESH_CONTROL_PLANE, ...).
demo: install
	$(PY) -m demo_services.demo run

demo-up: install
	$(PY) -m demo_services.demo up

demo-down:
	$(PY) -m demo_services.demo down

check:
	$(PY) -m demo_services.check

# Chaos (chaos/): the standard scenarios against the demo (started and stopped here when none
# runs); one scenario: `python -m chaos SCENARIO [--short] [--seed N] [--report FILE]`.
.PHONY: chaos
chaos: install
	$(PY) -m chaos all --start-demo --report .mesh/chaos-report.json

clean:
	find . -path ./$(VENV) -prune -o \( -name '*_pb2.py' -o -name '*_pb2_grpc.py' -o -name '*_pb2.pyi' \) -type f -print -exec rm -f {} +
	rm -rf .pytest_cache
