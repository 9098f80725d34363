"""The namespace backend interface: what the core asks of a backing store.

A backend is opened when its namespace is enabled and closed when it is disabled.
Every I/O is a submission with a completion callback ``cb(status)`` where status is
an NVMe status value (0 = success, see `spec.status`).  The callback always runs on
the reactor thread: backends that block (file, block device) do their work on worker
threads and post the completion back with ``loop.call_soon_threadsafe``; backends that
never block (memory, VFIO NVMe polling) may complete synchronously, inside the call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

Completion = Callable[[int], None]


class Backend(ABC):
    kind: str = ""  # "file", "bdev", "memory", "vfio-nvme"
    block_size: int = 512  # LBA data size in bytes: 512 or 4096
    nblocks: int = 0  # capacity in LBAs
    vwc: bool = False  # a volatile write cache exists, so Flush does something
    p2p_client: str | None = None  # PCI BDF the data path reaches, for P2P topology
    accepts_p2p: bool = False  # can issue P2P-flagged I/O into a BAR chunk

    @abstractmethod
    def submit_read(self, slba: int, nlb: int, buf: memoryview, cb: Completion) -> None: ...

    @abstractmethod
    def submit_write(self, slba: int, nlb: int, buf: memoryview, fua: bool,
                     cb: Completion) -> None: ...

    @abstractmethod
    def submit_flush(self, cb: Completion) -> None: ...

    @abstractmethod
    def submit_write_zeroes(self, slba: int, nlb: int, cb: Completion) -> None: ...

    @abstractmethod
    def submit_discard(self, ranges: list[tuple[int, int]], cb: Completion) -> None:
        """Deallocate (slba, nlb) ranges; reads of them return zeroes afterwards."""

    @abstractmethod
    def close(self) -> None:
        """Release every resource; idempotent.  No completions arrive afterwards."""

    def describe(self) -> dict:
        """Facts for status output and logs."""
        return {"kind": self.kind, "block_size": self.block_size, "nblocks": self.nblocks}
