# The README's test command is `make check`: set-up, then every test (unit, integration, VM).
PY := .venv/bin/python

.PHONY: setup check lint test vmtest bench soak lab clean

setup:
	./scripts/setup.sh

check: setup
	$(PY) -m pytest tests vmtests bench

# ruff, mypy --strict and the import contracts (tests/test_lint.py; `check` runs them too).
lint: setup
	$(PY) -m pytest tests/test_lint.py

test: setup
	$(PY) -m pytest tests

vmtest: setup
	$(PY) -m pytest vmtests

bench: setup
	$(PY) -m bench.run --costs

# tests/test_cycles.py 10 times in a row beside two busy loops (about 20 min; not in check).
soak: setup
	./scripts/soak-cycles.sh 10

clean:
	rm -rf .venv build *.egg-info src/*.egg-info .mypy_cache .ruff_cache .import_linter_cache
