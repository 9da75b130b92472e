# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build is found locally; the constraints keep pip from replacing it.
	$(PY) -m pip install -q torch==2.13.0
	$(PIP) -e ".[test,bench,trl]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

demo: venv
	$(VENV)/bin/fastpref check
	$(VENV)/bin/fastpref bench --quick --out bench/out
	$(PY) -m fastpref.demo

clean:
	rm -rf $(VENV) build *.egg-info
