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

.PHONY: install model run test lint proto bench rpm system-deps clean gpu-wheels gpu-check

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

# Tools the packaging, monitoring and fleet tests use (command:Debian package): ip and tc build
# the fleet's hosts as network namespaces, nft drops a host's packets; cc builds the neuron's
# CPU decode kernel (neuron/model/decode.c: without it decode steps run slower, in torch). Installed only when a
# command is missing, so a rerun costs nothing; elsewhere (no apt-get, not root) they are named,
# and the tests that need them fail in `make test` (a plain pytest run skips them).
SYSTEM_TOOLS := rpm:rpm rpmbuild:rpm rpmspec:rpm rpm2cpio:rpm2cpio cpio:cpio rpmlint:rpmlint \
	systemd-analyze:systemd systemd-sysusers:systemd promtool:prometheus prometheus:prometheus \
	openssl:openssl ip:iproute2 tc:iproute2 nft:nftables cc:gcc

system-deps:
	@missing=""; for tool in $(SYSTEM_TOOLS); do \
		command -v $${tool%%:*} >/dev/null 2>&1 || missing="$$missing $${tool#*:}"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
		echo "missing system packages:$$missing (make test fails the tests that need them)"; \
	fi

# helexa-cortex and helexa-neuron into build/rpm/RPMS/noarch (see rpm/*.spec); the virtualenv's
# Python writes the manual pages from the programs' help.
rpm: $(VENV)/.installed system-deps
	PYTHON=$(BIN)/python scripts/build-rpms build/rpm

# Every test runs: a skip fails the run with its reason, unless it is a CUDA test on a host
# without a GPU (tests/conftest.py).
test: $(VENV)/.installed $(DEMO_GGUF) system-deps lint
	HELEXA_NO_SKIPS=1 $(BIN)/python -m pytest -q

run: SYSTEM_TOOLS = cc:gcc
run: $(VENV)/.installed $(DEMO_GGUF) system-deps
	$(BIN)/python scripts/run_demo.py

# Benchmarks: figures for BENCHMARKS.md. transformers' own server is the baseline to beat, and
# llama.cpp the peer on the GGUF itself: llama-cpp-python is built from its source here (g++;
# scikit-build-core fetches cmake and ninja where the system lacks them), for this CPU, without its
# multimodal library; once built, a rerun costs nothing.
LLAMA_CPP ?= llama-cpp-python[server]==0.3.36
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF
bench: SYSTEM_TOOLS += wrk:wrk g++:g++
bench: $(VENV)/.installed $(DEMO_GGUF) system-deps
	$(BIN)/pip install -q "transformers[serving]"
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/pip install -q "$(LLAMA_CPP)"
	# xgrammar without its deps: they would add triton (286 MB, GPU only) beside CPU torch.
	$(BIN)/pip install -q llguidance outlines-core apache-tvm-ffi
	$(BIN)/pip install -q --no-deps xgrammar
	$(BIN)/python -m bench.gateway
	$(BIN)/python -m bench.lifecycle
	$(BIN)/python -m bench.generation
	$(BIN)/python -m bench.grammar
	$(BIN)/python -m bench.affinity
	$(BIN)/python -m bench.speculative
	$(BIN)/python -m bench.kvcache

# The GPU check's bundle (.gpu, ignored; it travels with the tree): wheels of what a GPU host's
# own python may lack, for its python version (GPU_PYTHON_VERSION), and the demo tokenizer.
GPU_PYTHON_VERSION ?= 3.12
gpu-wheels: $(VENV)/.installed $(DEMO_GGUF)
	$(BIN)/python -m bench.gpu_bundle --python-version $(GPU_PYTHON_VERSION)

# The CUDA tests and bench/gpu.py on this host's python3 (GPU_PYTHON), with the .gpu bundle;
# without a CUDA device it says so and exits 0. GPU_CHECK_ARGS go to bench/gpu.py.
gpu-check:
	scripts/gpu-check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .cache .gpu build dist *.egg-info
