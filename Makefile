# Two commands: `make run` (set up, then launch) and `make test` (set up, then the whole suite).
# Setup is idempotent: .venv is created once and requirements are reinstalled only when a
# requirements file changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS ?=

.PHONY: run test setup system-deps lint bench

run: setup
	$(BIN)/python app.py $(ARGS)

test: setup system-deps
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False $(BIN)/python -m pytest $(ARGS)

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

# Debian's Chromium (driven by Playwright) for the browser walk; espeak-ng and sox for real speech.
system-deps:
	@if ! command -v chromium >/dev/null || ! command -v espeak-ng >/dev/null; then \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium espeak-ng sox; fi

lint: setup
	$(BIN)/ruff check .

bench: setup
	for script in bench/*.py; do HF_HUB_OFFLINE=1 $(BIN)/python $$script || exit 1; done
