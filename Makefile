# Needs only python3 (3.11+). The first target run bootstraps uv into .tools/ and builds
# .venv from uv.lock (pinned), so `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
UV := .tools/bin/uv
VENV := .venv/bin

.PHONY: demo test test-services lint audit format env bench clean

PROVIDER ?= meta

demo: env
	$(VENV)/whatsapp-call demo --provider $(PROVIDER)

# Most tests wait on sockets, not the CPU: three workers in parallel, then the few that measure
# real-time pacing on their own.
test: env lint audit test-services
	$(VENV)/pytest -n 3 --dist loadfile -m "not serial"
	$(VENV)/pytest -m serial

test-services:
	@scripts/install-test-services.sh

lint: env
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

# Known vulnerabilities in the locked dependencies (pip-audit against PyPI's advisories).
audit: env
	$(VENV)/python scripts/audit_deps.py

format: env
	$(VENV)/ruff format .
	$(VENV)/ruff check --fix .

env: $(UV)
	$(UV) sync --frozen --all-packages --all-extras --quiet

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==0.13.9

bench: env
	$(VENV)/python -m bench.run_all

clean:
	rm -rf .venv .tools .pytest_cache .ruff_cache
