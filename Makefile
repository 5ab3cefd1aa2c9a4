# Every target creates its venv on first use. TORCH_SPEC picks the torch build: the default one lives
# in .venv, any other in a venv of its own named after it (e.g. `make test TORCH_SPEC=torch==2.11.0`
# -> .venv-torch2.11.0), so trying another torch never replaces the default. A CUDA torch from PyPI
# brings the triton it pins; the package asks for no newer one.
PYTHON ?= python3
DEFAULT_TORCH := torch==2.13.0
TORCH_SPEC ?= $(DEFAULT_TORCH)
VENV ?= $(if $(filter $(DEFAULT_TORCH),$(TORCH_SPEC)),.venv,.venv-$(subst =,,$(subst <,,$(subst >,,$(firstword $(TORCH_SPEC))))))
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-core test-frameworks bench fuzz lint gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_SPEC)
	# --no-build-isolation: build against the torch installed above, never a second download.
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	# The interpreter of triton < 3.7 calls int() on one-element arrays, which NumPy >= 2.3 refuses.
	if $(PY) -c "import sys, triton; sys.exit(tuple(map(int, triton.__version__.split('.')[:2])) >= (3, 7))"; then \
		$(PY) -m pip install -q "numpy<2.3"; fi
	touch $(STAMP)

# pytest-xdist workers, one a core by default: the Triton interpreter and the sm_90 compiles are
# single-threaded Python.
TEST_WORKERS ?= auto
# The core subset that every torch of the CI matrix runs (the whole suite runs on the default torch,
# the install resolution against the package index with it: `network` tests run once).
CORE_TESTS := tests/test_golden.py tests/test_fused.py tests/test_nonfinite.py tests/test_compile.py \
	tests/test_export.py tests/test_isa.py tests/test_amp.py tests/test_cpp.py tests/test_install.py
TESTS ?= tests

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=25 $(TESTS)

test-core: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=10 -m "not network" $(CORE_TESTS)

# ultralytics, timm and OpenMMLab with the package (pyproject's `frameworks` extra). ultralytics and
# timm need torchvision, whose PyPI wheels run only on PyPI's torch of the same release, not on the
# default CPU build: these run in the venv of FRAMEWORKS_TORCH (the GPU machine's torch).
FRAMEWORKS_TORCH ?= torch==2.11.0
FRAMEWORK_TESTS := tests/test_ultralytics.py tests/test_timm.py tests/test_mmengine.py tests/test_readme.py
test-frameworks:
	$(MAKE) --no-print-directory $(FRAMEWORKS_VENV)/.frameworks TORCH_SPEC=$(FRAMEWORKS_TORCH)
	$(FRAMEWORKS_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --durations=10 $(FRAMEWORK_TESTS)
FRAMEWORKS_VENV = .venv-$(subst =,,$(FRAMEWORKS_TORCH))

$(VENV)/.frameworks: $(STAMP)
	# torch named again, so that pip keeps it rather than take another for a newer torchvision.
	$(PY) -m pip install -q --no-build-isolation "$(TORCH_SPEC)" -e ".[test,bench,frameworks]"
	touch $@

bench: $(STAMP)
	$(PY) -m bench.op --preset resnet50
	$(PY) -m bench.model --model resnet50 mobilenetv2

# The long hypothesis profile (thousands of cases against the reference); `make test` runs a fast one.
fuzz: $(STAMP)
	SCSA_FUZZ=long $(PY) -m pytest -q tests/test_fuzz.py

# ruff (pyproject.toml [tool.ruff]) over the Python, clang-format (.clang-format) over csrc/.
lint: $(STAMP)
	$(PY) -m pip install -q "ruff==0.17.6" "clang-format==23.1.5"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror csrc/*.cpp csrc/*.h

# For a GPU machine with torch preinstalled and no network: this checkout installed into that python
# (no dependencies, no build isolation), then the GPU tests, the fp16 op benchmark against eager and
# torch.compile, and the modelled time beside each measured one, as JSON under GPU_OUT.
GPU_PYTHON ?= python3
GPU_OUT ?= bench/out/gpu-check
gpu-check:
	$(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(GPU_PYTHON) -m bench.gpu_check --out $(GPU_OUT)

clean:
	rm -rf .venv .venv-* build *.egg-info bench/out
