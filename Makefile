# One-command entry points for newcomers and CI.
#   make demo   set up .venv, start two local daemons, live-migrate a domain
#   make test   set up .venv and run the whole test suite (fast tests first)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m mypy relocd
	$(PY) -m pytest

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

bench: $(VENV)/.installed
	$(PY) bench/bench_migrate.py

clean:
	rm -rf $(VENV) build *.egg-info
