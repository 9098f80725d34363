"""The base of every namespace backend: `nvmet_p2p.core.backend.NsBackend` with defaults.

A backend is opened when its namespace is enabled and closed when it is disabled.
Every I/O is a submission with a completion callback ``cb(status)`` where status is
an NVMe status value (0 = success, see `wire.status`).  The callback always runs on
the reactor thread: backends that block (file, block device) do their work on worker
threads and post the completion back with ``loop.call_soon_threadsafe``; backends that
never block (memory, VFIO NVMe polling) may complete synchronously, inside the call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from nvmet_p2p.cmb import Chunk, Provider
from nvmet_p2p.core.backend import Completion
from nvmet_p2p.errors import BackendError

__all__ = ["Backend", "Completion"]


class Backend(ABC):
    kind: str = ""  # "file", "bdev", "memory", "vfio-nvme"
    path: str = ""  # the configured device.path (the PCI address for vfio-nvme)
    block_size: int = 512  # LBA data size in bytes: 512 or 4096
    nblocks: int = 0  # capacity in LBAs
    vwc: bool = False  # a volatile write cache exists, so Flush does something
    p2p_client: str | None = None  # PCI BDF the data path reaches, for P2P topology
    # provider kinds (cmb.Provider.kind) whose chunks P2P-flagged I/O can use; none: no
    # P2P.  `p2p_needs` says what that I/O needs of the memory, for refusals.
    p2p_kinds: frozenset[str] = frozenset()
    p2p_needs: str = "it moves data with the CPU"
    cmb: Provider | None = None  # P2P memory this backend's device offers others

    @abstractmethod
    def submit_read(self, slba: int, nlb: int, buf: memoryview, cb: Completion) -> None: ...

    @abstractmethod
    def submit_write(self, slba: int, nlb: int, buf: memoryview, fua: bool,
                     cb: Completion) -> None: ...

    def submit_read_p2p(self, slba: int, nlb: int, chunk: Chunk, cb: Completion) -> None:
        """P2P-flagged read into `chunk`; only backends with `p2p_kinds` implement it."""
        raise BackendError(f"the {self.kind} backend cannot issue P2P-flagged I/O")

    def submit_write_p2p(self, slba: int, nlb: int, chunk: Chunk, fua: bool,
                         cb: Completion) -> None:
        """P2P-flagged write from `chunk`; only backends with `p2p_kinds` implement it."""
        raise BackendError(f"the {self.kind} backend cannot issue P2P-flagged I/O")

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
