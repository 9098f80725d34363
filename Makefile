# The two commands a newcomer needs are `make demo` and `make test` (see README.md).
PY := .venv/bin/python

.PHONY: setup demo test test-host test-vm bench lint

setup:
	@tools/setup.sh

demo: setup
	$(PY) -m nvmet_p2p.testbed.demo

# Host-side tests first (seconds), then every vm-marked test inside one VM boot on the
# default kernel (the newest with PCI P2PDMA, 7.x), then the `without_p2pdma` group in a
# second boot on Debian 12's 6.1, which has none: it still works there, with the reasons.
test: setup
	$(PY) -m pytest -q -m "not vm" tests
	$(PY) -m nvmet_p2p.testbed.vm pytest -q
	$(PY) -m nvmet_p2p.testbed.vm pytest --kernel 6.1 -q -m "vm and without_p2pdma"

test-host: setup
	$(PY) -m pytest -q -m "not vm" tests

test-vm: setup
	$(PY) -m nvmet_p2p.testbed.vm pytest -q

bench: setup
	$(PY) -m nvmet_p2p.cli bench $(BENCH_ARGS)

# ruff everywhere, mypy on the typed layers, and the layer contracts (pyproject.toml).
lint: setup
	$(PY) -m ruff check nvmet_p2p tests bench tools
	$(PY) -m mypy nvmet_p2p/wire nvmet_p2p/core nvmet_p2p/transports nvmet_p2p/rdma.py nvmet_p2p/backends \
		nvmet_p2p/p2p nvmet_p2p/tcp.py nvmet_p2p/host/tcp.py
	.venv/bin/lint-imports --no-cache
