"""The contract between the core and a namespace backend, and how the core gets one.

A namespace backend (file, block device, memory, the userspace NVMe driver) implements
`NsBackend`; the composer of a `Target` (the daemon, a test environment, a benchmark)
hands it a `BackendOpener` that turns a namespace's configured device into one.  The core
never imports a backend.  Every I/O is a submission with a completion callback
``cb(status)`` (an NVMe status value, 0 = success) that runs on the reactor thread.

P2P: a backend that can issue P2P-flagged I/O (the device itself reads or writes a PCI
BAR chunk, as the block layer does for an O_DIRECT request whose pages are p2pmem) names
the provider kinds it can do that with in `p2p_kinds` and implements `submit_read_p2p` /
`submit_write_p2p`; the core calls those only for requests whose data buffer is a chunk
of the P2P provider the policy chose, which it only chooses among those kinds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from nvmet_p2p.cmb import Chunk, Provider

Completion = Callable[[int], None]


class NsBackend(Protocol):
    kind: str  # "file", "bdev", "memory", "vfio-nvme": for reasons and status
    path: str  # what the namespace's device.path named (a label for memory)
    block_size: int  # LBA data size in bytes: 512 or 4096
    nblocks: int  # capacity in LBAs
    vwc: bool  # a volatile write cache exists, so Flush does something
    p2p_client: str | None  # PCI BDF the backend's DMA comes from (P2P topology), or None
    p2p_kinds: frozenset[str]  # cmb.Provider.kind values submit_*_p2p can take chunks of
    p2p_needs: str  # what that I/O needs of the memory, for the policy's refusals
    cmb: Provider | None  # P2P memory the backend's own device offers others (its CMB)

    def submit_read(self, slba: int, nlb: int, buf: memoryview, cb: Completion) -> None: ...

    def submit_write(self, slba: int, nlb: int, buf: memoryview, fua: bool,
                     cb: Completion) -> None: ...

    def submit_read_p2p(self, slba: int, nlb: int, chunk: Chunk, cb: Completion) -> None:
        """Read from the media into `chunk` with the device's own DMA (P2P-flagged)."""

    def submit_write_p2p(self, slba: int, nlb: int, chunk: Chunk, fua: bool,
                         cb: Completion) -> None:
        """Write `chunk` (already filled, e.g. by the RDMA NIC) with the device's DMA."""

    def submit_flush(self, cb: Completion) -> None: ...

    def submit_write_zeroes(self, slba: int, nlb: int, cb: Completion) -> None: ...

    def submit_discard(self, ranges: list[tuple[int, int]], cb: Completion) -> None:
        """Deallocate (slba, nlb) ranges; reads of them return zeroes afterwards."""

    def close(self) -> None:
        """Release every resource; idempotent.  No completions arrive afterwards."""

    def describe(self) -> dict:
        """Facts for status output and logs."""


class BackendOpener(Protocol):
    """Opens the backend of an enabled namespace; raises `BackendError` saying what to fix.

    `nvmet_p2p.backends.open_backend` is the one the daemon uses.
    """

    def __call__(self, path: str, *, kind: str, block_size: int, size: int | None,
                 create: bool, buffered_io: bool,
                 loop: asyncio.AbstractEventLoop) -> NsBackend: ...
