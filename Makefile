# Every target installs what it needs: `make demo` and `make test` work from a fresh clone.
# Pins live in pyproject.toml; EXTRA picks the torch/vLLM build (cpu here, gpu where nvidia-smi runs).
PY      := .venv/bin/python
EXTRA   ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
CONFIG  ?= configs/demo.yaml
ARGS    ?=
PYTEST_ARGS ?=

RUN     ?= runs/demo/train

.PHONY: setup base-model demo cache-teacher train eval sweep approx-study verify bench encoding-study test clean help
.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

.venv/.installed-$(EXTRA): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -e '.[$(EXTRA),test,eval]'
	@# PyPI's torchvision/torchaudio/torchcodec do not load beside the CPU torch (ENVIRONMENT.md).
	@if [ "$(EXTRA)" = "cpu" ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true; fi
	touch $@

setup: .venv/.installed-$(EXTRA)  ## create .venv and install the pinned dependencies

base-model: setup  ## build the embedded tiny base model + corpora into build/default (cached)
	$(PY) -m pipeline build-default

demo: setup  ## build the default, cache the teacher, train a LoRA with the masked KL
	$(PY) -m pipeline demo --config $(CONFIG) $(ARGS)

cache-teacher: base-model  ## stage one on CONFIG (default configs/demo.yaml)
	$(PY) -m pipeline cache-teacher --config $(CONFIG) $(ARGS)

train: setup  ## stage two on CONFIG
	$(PY) -m pipeline train --config $(CONFIG) $(ARGS)

eval: setup  ## learning vs forgetting of RUN (default runs/demo/train) against its base model
	$(PY) -m pipeline eval --run $(RUN) $(ARGS)

sweep: base-model  ## method x lambda x seed over one cache (configs/sweep_demo.yaml): table + frontier.png
	$(PY) -m pipeline sweep --config configs/sweep_demo.yaml $(ARGS)

approx-study: base-model  ## D_k of tail/topk/full_kl vs the exact masked KL (k up to |V|-1); tail vs live (after make sweep)
	$(PY) -m pipeline approx-study --config configs/sweep_demo.yaml $(ARGS)

verify: setup  ## verify the cache named in CONFIG
	$(PY) -m pipeline verify $$($(PY) -c "from pipeline.config import load_config; print(load_config('$(CONFIG)').cache.dir)")

encoding-study: base-model  ## cache encodings: bytes/token vs D_k error -> runs/encoding-study/study.{json,md}
	$(PY) -m pipeline encoding-study --out runs/encoding-study $(ARGS)

bench: base-model  ## speed/memory side by side (~10 min on 2 cores) -> runs/bench/<UTC time>.json + .md
	$(PY) -m pipeline bench $(ARGS)

test: setup  ## lint (ruff: pyproject.toml) + the test suite (real vLLM, Parquet, peft; CPU)
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:  ## remove runs/ and build/ (keeps .venv)
	rm -rf runs build
