"""The test bed: what tests, benchmarks and the demo run on, not part of the target.

`vm` boots the soft-RoCE test VM, `guest` holds helpers for code running inside it
(rxe, nvme-cli, fio, PCI lookups), `kernel_target` drives the kernel's nvmet for
comparisons, `bench` is `nvmet-p2p bench`, `demo` is `make demo`.
"""
