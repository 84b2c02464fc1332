# helexa: `make run` starts the embedded default system, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR := models/demo
DEMO_GGUF := $(DEMO_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
# The CPU build of torch where there is no GPU (a bare `torch` pulls the multi-GB CUDA build).
TORCH_CPU ?= torch==2.13.0
TORCH_GPU ?= torch
PROTO := protos/helexa/neuron/v1/neuron.proto

.PHONY: install model run test lint proto clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/pip install -q "$(TORCH_GPU)"; \
	else \
		$(BIN)/pip install -q "$(TORCH_CPU)"; \
	fi
	$(BIN)/pip install -q -e '.[neuron,dev]'
	touch $@

model: $(DEMO_GGUF)

$(DEMO_GGUF): | $(VENV)/.installed
	$(BIN)/python scripts/fetch_demo_model.py $(DEMO_DIR)

proto: $(VENV)/.installed
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy neuron cortex

test: $(VENV)/.installed $(DEMO_GGUF) lint
	$(BIN)/python -m pytest -q

run: $(VENV)/.installed $(DEMO_GGUF)
	$(BIN)/python scripts/run_demo.py

clean:
	rm -rf $(VENV) .cache build dist *.egg-info
