# Two commands do everything on a fresh machine with only Python 3.10+:
#   make run    install into .venv, then run the embedded default sweep (python -m platform.tune task=mae)
#   make test   install into .venv (with the test tools), then run the test suite (what CI runs, ~20 min on 2 cores)
#   make test-all   the same with the long fault, recovery and scale scenarios too (about 45 min more)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TASK   ?= mae
ARGS   ?=

.PHONY: run test test-all install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import sys; sys.exit(sys.version_info < (3, 11))" || $(PY) -m pip install --quiet tomli  # 3.10: no tomllib
	$(PY) -c "import sys; tomllib = __import__('tomllib' if sys.version_info >= (3, 11) else 'tomli'); p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['test']))" > $(VENV)/requirements.txt
	$(PY) -m pip install --quiet -r $(VENV)/requirements.txt
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m platform.tune task=$(TASK) $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

test-all: install
	$(PY) -m pytest -m "" $(ARGS)

clean:
	rm -rf $(VENV) ray_results mlflow.db
