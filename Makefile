# The two commands a newcomer needs are `make demo` and `make test` (see README.md).
PY := .venv/bin/python

.PHONY: setup demo test test-host test-vm bench lint

setup:
	@tools/setup.sh

demo: setup
	$(PY) -m nvmet_p2p.demo

# Host-side tests first (seconds), then every vm-marked test inside one VM boot.
test: setup
	$(PY) -m pytest -q -m "not vm" tests
	$(PY) -m nvmet_p2p.vm pytest -q

test-host: setup
	$(PY) -m pytest -q -m "not vm" tests

test-vm: setup
	$(PY) -m nvmet_p2p.vm pytest -q

bench: setup
	$(PY) -m nvmet_p2p.cli bench $(BENCH_ARGS)

lint: setup
	$(PY) -m ruff check nvmet_p2p tests
	$(PY) -m mypy nvmet_p2p/target nvmet_p2p/spec
