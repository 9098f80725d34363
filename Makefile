# The two commands a newcomer needs are `make demo` and `make test` (see README.md).
PY := .venv/bin/python

.PHONY: setup demo test test-host test-vm bench lint

setup:
	@tools/setup.sh

demo: setup
	$(PY) -m nvmet_p2p.demo

test: setup
	$(PY) -m pytest -q tests

test-host: setup
	$(PY) -m pytest -q -m "not vm" tests

bench: setup
	$(PY) -m nvmet_p2p.cli bench

lint: setup
	$(PY) -m ruff check nvmet_p2p tests
