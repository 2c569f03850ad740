# Every target creates the virtual environment it needs, so each works on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINT_STAMP := $(VENV)/.installed-lint

# torch is optional (the tests and the harness compare against it when importable); override TORCH
# to pick another build, or set TORCH= to skip it.
TORCH ?= torch==2.13.0
# OpenBLAS reads these to force a CPU kernel; benchmarks let it pick the one for this CPU.
BENCH_ENV := env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE

.PHONY: torch test lint demo serve bench bench-train venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

$(LINT_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,lint]'
	touch $(LINT_STAMP)

# The tests that compare with PyTorch and the harness both want torch; without it they skip.
torch: $(STAMP)
	@$(PY) -c "import torch" 2>/dev/null || [ -z "$(TORCH)" ] || $(PY) -m pip install --quiet '$(TORCH)' \
		|| echo "torch could not be installed: the comparisons with PyTorch will be skipped"

test: torch
	$(PY) -m pytest -q
	@echo "engine tests again on the numpy fallback of the GEMM (CONVNET_BLAS_FALLBACK=1):"
	CONVNET_BLAS_FALLBACK=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_core.py tests/test_functional.py

lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

demo: $(STAMP)
	$(VENV)/bin/convnet train

# The drawing page on http://127.0.0.1:8000/ for the model `make demo` wrote (trained first if missing).
serve: $(STAMP)
	$(VENV)/bin/convnet serve $(ARGS)

bench: torch
	$(BENCH_ENV) $(PY) benchmarks/bench.py $(ARGS)

bench-train: $(STAMP)
	$(PY) benchmarks/train_mnist.py $(ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
