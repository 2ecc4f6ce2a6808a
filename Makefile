# Two commands: `make run` (set up, then launch) and `make test` (set up, then the whole suite).
# Setup is idempotent: .venv is created once and requirements are reinstalled only when a
# requirements file changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS ?=

.PHONY: run test setup system-deps prepare lint bench

# Offline models are prepared (built or converted into .cache, once, with progress) before the app
# starts, and the voice tab's offline models are loaded right after it starts, so that nobody waits
# at their first click (`make run ARGS="--preload none"` to skip the loading).
run: setup
	$(BIN)/python -m models.prepare $(ARGS)
	$(BIN)/python app.py --preload defaults $(ARGS)

test: setup system-deps
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m models.prepare --strict --offline
	HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False $(BIN)/python -m pytest $(ARGS)

prepare: setup
	$(BIN)/python -m models.prepare $(ARGS)

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install --no-deps --editable .
	touch $(STAMP)

# Debian's Chromium (driven by Playwright) for the browser walk; espeak-ng for Piper voices and test
# speech; sox; ffmpeg, which Gradio uses to stream the spoken reply to the browser.
system-deps:
	@if ! command -v chromium >/dev/null || ! command -v espeak-ng >/dev/null || ! command -v ffmpeg >/dev/null; then \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium espeak-ng sox ffmpeg; fi

lint: setup
	$(BIN)/ruff check .

bench: setup
	for script in bench/*.py; do HF_HUB_OFFLINE=1 $(BIN)/python $$script || exit 1; done
