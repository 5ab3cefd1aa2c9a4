# Every target creates .venv on first use. TORCH_SPEC picks the torch build (a CUDA wheel on a GPU box).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test bench fuzz lint clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# --no-build-isolation: build against the torch installed above, never a second download.
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $(STAMP)

# pytest-xdist workers, one a core by default: the Triton interpreter and the sm_90 compiles are
# single-threaded Python (two cores: 71% of the serial time on an AMD EPYC Zen 3).
TEST_WORKERS ?= auto

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=25 tests

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

clean:
	rm -rf $(VENV) build *.egg-info bench/out
