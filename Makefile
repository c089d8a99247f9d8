# flora-hf: every target installs what it needs itself (a virtual environment in .venv, pip packages).
# torch==2.13.0 is installed first in every environment so no other requirement pulls CUDA wheels.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.flora-hf-installed

# Debian tools the tests drive for real: speech synthesis, an MP3 encoder, interpreters for pass@k.
APT_PACKAGES ?= espeak-ng lame perl libtest-deep-perl ruby lua5.4

.PHONY: setup system-deps demo test lint format bench-layer bench-serve docker clean

setup: $(STAMP) system-deps

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else echo "missing Debian packages:$$missing (tests that need them will be skipped)"; fi; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c 'import torch' 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)  # keep a CUDA build already there
	$(PIP) install -q -e ".[dev]"
	# the text-generation client pins huggingface-hub<1.0, which transformers 5 outgrew; its code works with 1.x+
	$(PIP) install -q --no-deps "text-generation==0.7.0"
	touch $(STAMP)

demo: setup
	$(PY) -m trainers.demo
	$(PY) -m trainers.demo_serve

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench-layer: setup
	$(PY) bench/layer.py

bench-serve: setup
	$(PY) bench/serve.py

# Docker cannot build on the development machines; CI and tests run the same entrypoint (flora-serve) directly.
docker:
	docker build -f serving/Dockerfile -t flora-serve .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache bench/results
