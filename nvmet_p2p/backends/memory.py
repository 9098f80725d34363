"""The memory backend: a namespace held in anonymous memory, lost when the process exits.

Like SPDK's malloc bdev, it exists for benchmarks and tests that want the target's
own overhead without storage in the way.  Nothing here blocks, so every completion
runs synchronously inside the ``submit_*`` call; the read and write paths are a
range check and one memoryview slice copy, and should stay that lean.
"""

from __future__ import annotations

import mmap

from nvmet_p2p.backends.base import Backend, Completion
from nvmet_p2p.errors import BackendError
from nvmet_p2p.wire.status import DNR, Status

LBA_RANGE = Status.LBA_RANGE | DNR
DATA_LEN = Status.SGL_INVALID_DATA | DNR  # buffer length is not nlb * block_size


class MemoryBackend(Backend):
    kind = "memory"
    vwc = False  # data is in place when the write completes; Flush has nothing to do

    def __init__(self, label: str, size: int, block_size: int) -> None:
        if block_size <= 0 or size <= 0 or size % block_size:
            raise BackendError(f"memory namespace size {size} must be a positive multiple "
                               f"of block_size {block_size}")
        self.path = label
        self.block_size = block_size
        self.nblocks = size // block_size
        # private anonymous: page aligned, pages allocated on first touch, and
        # MADV_DONTNEED really gives them back (a shared mapping would keep the data)
        try:
            self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        except (OSError, OverflowError) as e:  # ENOMEM: larger than the machine allows
            raise BackendError(f"memory namespace {label}: cannot reserve {size} bytes: "
                               f"{getattr(e, 'strerror', None) or e}; lower device_size") from e
        self._mv: memoryview | None = memoryview(self._map)

    def submit_read(self, slba: int, nlb: int, buf: memoryview, cb: Completion) -> None:
        mv = self._live()
        if slba < 0 or nlb < 0 or slba + nlb > self.nblocks:
            cb(LBA_RANGE)
            return
        bs = self.block_size
        try:
            buf[:] = mv[slba * bs:(slba + nlb) * bs]
        except (ValueError, TypeError):  # wrong length, or a read-only buffer
            cb(DATA_LEN)
            return
        cb(0)

    def submit_write(self, slba: int, nlb: int, buf: memoryview, fua: bool,
                     cb: Completion) -> None:
        mv = self._live()
        if slba < 0 or nlb < 0 or slba + nlb > self.nblocks:
            cb(LBA_RANGE)
            return
        bs = self.block_size
        try:
            mv[slba * bs:(slba + nlb) * bs] = buf
        except (ValueError, TypeError):
            cb(DATA_LEN)
            return
        cb(0)

    def submit_flush(self, cb: Completion) -> None:
        self._live()
        cb(0)

    def submit_write_zeroes(self, slba: int, nlb: int, cb: Completion) -> None:
        cb(self._zero([(slba, nlb)]))

    def submit_discard(self, ranges: list[tuple[int, int]], cb: Completion) -> None:
        cb(self._zero(ranges))

    def close(self) -> None:
        if self._mv is None:
            return
        self._mv.release()
        self._mv = None
        self._map.close()

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "block_size": self.block_size,
                "nblocks": self.nblocks, "o_direct": False, "o_direct_fallback": None,
                "vwc": self.vwc, "p2p_client": None,
                "note": "memory-backed: data is lost when the target exits"}

    def _live(self) -> memoryview:
        mv = self._mv
        if mv is None:
            raise BackendError(f"memory namespace {self.path}: I/O submitted after close")
        return mv

    def _zero(self, ranges: list[tuple[int, int]]) -> int:
        mv = self._live()
        if any(s < 0 or n < 0 or s + n > self.nblocks for s, n in ranges):
            return LBA_RANGE
        bs, page = self.block_size, mmap.PAGESIZE
        for slba, nlb in ranges:
            start, end = slba * bs, (slba + nlb) * bs
            lo, hi = -(-start // page) * page, end // page * page
            if hi - lo >= page:
                # whole pages go back to the kernel and read as zeroes: no big memset
                mv[start:lo] = bytes(lo - start)
                self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                mv[hi:end] = bytes(end - hi)
            else:
                mv[start:end] = bytes(end - start)
        return 0
