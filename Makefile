# One-command entry points for newcomers and CI.
#   make demo   set up .venv, start two local daemons, live-migrate a domain
#   make test   set up .venv and run the whole test suite (fast tests first)
#   make wheel  dist/relocd-*.whl: what `pip install .` installs, built offline
#   make man    build/man/relocd.8, the man page, from the command's parser
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench wheel man clean

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

# With .venv's setuptools (the test extra's); build/ goes first, or files
# left there by an older build would end up in the wheel.
wheel: $(VENV)/.installed
	rm -rf build
	$(PY) -m pip wheel --no-deps --no-build-isolation --no-index --wheel-dir dist .

# argparse-manpage comes with the test extra (or: pip install '.[man]').
# Install with: install -Dm644 build/man/relocd.8 /usr/local/share/man/man8/relocd.8
man: $(VENV)/.installed
	mkdir -p build/man
	$(PY) -m relocd.cli.extras man > build/man/relocd.8.tmp
	mv build/man/relocd.8.tmp build/man/relocd.8

clean:
	rm -rf $(VENV) build dist *.egg-info
