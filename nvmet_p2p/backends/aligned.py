"""Page-aligned memory for O_DIRECT: alignment checks and a pool of bounce buffers.

O_DIRECT transfers need the user buffer aligned to the device's logical block size.
Buffers handed to a backend come from a transport (receive buffers, registered
memory, a BAR mapping) and need not be aligned; the backend then copies through a
bounce buffer from this pool.  Pool buffers are anonymous mmaps, so they are always
page aligned, and they are reused because mmap + first touch costs more than a copy.
"""

from __future__ import annotations

import ctypes
import mmap
import threading

ALIGN = mmap.PAGESIZE  # covers every logical block size we accept (512, 4096)
BOUNCE_GRANULE = 128 * 1024  # sizes are rounded up to this so buffers are reusable


def buffer_address(buf: memoryview) -> int | None:
    """Address of the first byte of a writable buffer; None when it cannot be known.

    ctypes can only take the address of a writable buffer.  A read-only one is
    reported as unknown and callers treat it as unaligned (one extra copy).
    """
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except (TypeError, ValueError):
        return None


def is_aligned(buf: memoryview, align: int = ALIGN) -> bool:
    addr = buffer_address(buf)
    return addr is not None and addr % align == 0


class AlignedPool:
    """Thread-safe pool of page-aligned anonymous mmaps, used from worker threads."""

    def __init__(self, keep: int) -> None:
        self._keep = keep  # at most one idle buffer per worker is worth keeping
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self._closed = False

    def get(self, nbytes: int) -> mmap.mmap:
        """A buffer of at least nbytes; give it back with put()."""
        with self._lock:
            for i, m in enumerate(self._free):
                if len(m) >= nbytes:
                    return self._free.pop(i)
        size = -(-max(nbytes, 1) // BOUNCE_GRANULE) * BOUNCE_GRANULE
        return mmap.mmap(-1, size)

    def put(self, m: mmap.mmap) -> None:
        with self._lock:
            if not self._closed and len(self._free) < self._keep:
                self._free.append(m)
                return
        try:
            m.close()
        except BufferError:
            pass  # a view of it is still alive somewhere; unmapped when that goes

    def close(self) -> None:
        """Unmap every idle buffer; idempotent.  Buffers out on loan are unmapped on put()."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
        for m in free:
            try:
                m.close()
            except BufferError:
                pass  # a view of it is still alive somewhere; unmapped when that goes
