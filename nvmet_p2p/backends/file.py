"""The file backend: a namespace stored in a regular file, I/O on worker threads.

Owns opening (and, on request, sparse creation of) the file, the O_DIRECT decision
and its fallback to buffered I/O, the worker pool, bounce copies for unaligned
buffers, and mapping OS errors to NVMe status the way the kernel target's
``errno_to_nvme_status()`` does.  Blocking syscalls run on worker threads (on the reactor
for files on a memory filesystem, where they cannot block) and every
completion is posted to the reactor with ``loop.call_soon_threadsafe``, so a
completion never runs inside ``submit_*`` and never on a worker thread.

The block device backend (`bdev.py`) reuses all of this and changes only how the
device is opened and how ranges are zeroed or deallocated.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from nvmet_p2p import logfmt
from nvmet_p2p.backends.aio import AioRing, open_ring
from nvmet_p2p.backends.aligned import ALIGN, AlignedPool, buffer_address, is_aligned
from nvmet_p2p.backends.base import Backend, Completion
from nvmet_p2p.errors import BackendError
from nvmet_p2p.wire.status import DNR, Status

log = logging.getLogger("nvmet_p2p.backend")

WORKERS = 4  # overlaps a few blocking syscalls per namespace without swamping 2 cores
AIO_BOUNCE_KEEP = 32  # idle bounce buffers the reactor keeps: a queue's worth of writes
ZERO_CHUNK = 1024 * 1024  # largest single write when zeroes must be written out
BUFFERED_REQUESTED = "buffered_io requested"  # the fallback reason that is not a problem

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

LBA_RANGE = Status.LBA_RANGE | DNR  # the kernel adds DNR: the same LBAs stay out of range
DATA_LEN = Status.SGL_INVALID_DATA | DNR  # buffer length is not nlb * block_size

# Filesystems whose I/O is a page-cache copy that never waits for a device.
MEMORY_FS_MAGIC = {
    0x01021994: "tmpfs",
    0x858458F6: "ramfs",
    0x958458F6: "hugetlbfs",
}

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", _libc.fallocate)
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int


def memory_fs(fd: int) -> str | None:
    """The memory filesystem a regular file lives on (tmpfs...), else None.

    Only regular files count: a block device node on devtmpfs reports tmpfs too.
    """
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return None
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is the first word
    if _fstatfs(fd, buf) != 0:
        return None
    return MEMORY_FS_MAGIC.get(int.from_bytes(buf.raw[:ctypes.sizeof(ctypes.c_long)],
                                              "little"))


class CompletionLoop(Protocol):
    """What a backend needs of the reactor: asyncio's loop fits."""

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: object) -> object: ...


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode, which os.posix_fallocate cannot pass."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def errno_to_status(err: int | None) -> int:
    """NVMe status for a failed backend syscall, as the kernel target maps errno."""
    if err == errno.ENOSPC:
        return Status.CAP_EXCEEDED | DNR
    if err == errno.EREMOTEIO:
        return Status.LBA_RANGE | DNR
    if err == errno.EOPNOTSUPP:
        return Status.INVALID_OPCODE | DNR
    # EIO and everything else, including a short transfer: the kernel's default case
    return Status.INTERNAL | DNR


def open_error(path: str, e: OSError) -> BackendError:
    """A BackendError that tells the operator what to fix for a failed open()."""
    if e.errno in (errno.EACCES, errno.EPERM):
        text = f"permission denied opening {path} read-write"
    elif e.errno == errno.EROFS:
        text = f"{path} is on a read-only filesystem"
    elif e.errno == errno.EBUSY:
        text = f"{path} is in use (mounted, or held open exclusively by another user)"
    elif e.errno == errno.ENOENT:
        text = f"{path} does not exist"
    else:
        text = f"cannot open {path}: {e.strerror}"
    return BackendError(text)


def pread_full(fd: int, buf: memoryview, offset: int) -> None:
    done, n = 0, buf.nbytes
    while done < n:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got == 0:
            raise OSError(errno.EIO, f"short read: end of file at offset {offset + done}")
        done += got


def pwrite_full(fd: int, buf: memoryview, offset: int, flags: int = 0) -> None:
    done, n = 0, buf.nbytes
    while done < n:
        put = os.pwritev(fd, [buf[done:]], offset + done, flags)
        if put == 0:
            raise OSError(errno.EIO, f"short write at offset {offset + done}")
        done += put


def open_fd(path: str, flags: int, buffered_io: bool) -> tuple[int, bool, str | None]:
    """Open read-write, with O_DIRECT unless asked not to or the filesystem refuses.

    Returns (fd, o_direct, fallback_reason).
    """
    flags |= os.O_RDWR | os.O_CLOEXEC
    if buffered_io:
        reason = BUFFERED_REQUESTED
    else:
        try:
            return os.open(path, flags | os.O_DIRECT), True, None
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise open_error(path, e) from e
            reason = "the filesystem refused O_DIRECT on open (EINVAL)"
            # Linux creates the file before it checks O_DIRECT: it is ours, now it exists
            flags &= ~os.O_EXCL
    try:
        return os.open(path, flags), False, reason
    except OSError as e:
        raise open_error(path, e) from e


class FileBackend(Backend):
    """Blocking-syscall backend on an open fd; subclasses change zeroing and opening."""

    kind = "file"
    vwc = True  # the page cache or the device's cache can hold data until a flush

    def __init__(self, path: str, fd: int, *, block_size: int, nblocks: int,
                 loop: CompletionLoop, o_direct: bool, fallback_reason: str | None,
                 workers: int = WORKERS) -> None:
        self.path = path
        self.block_size = block_size
        self.nblocks = nblocks
        self.o_direct = o_direct
        self.fallback_reason = fallback_reason
        self._fd = fd
        self._loop = loop
        self._closed = False
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"nvmet-{self.kind}")
        self._bounce = AlignedPool(keep=workers)
        # Unaligned transfers bounced on the reactor for AIO: in-capsule data sits behind
        # its 64-byte SQE, and a copy of a few KiB costs less than a worker hop.
        self._aio_bounce = AlignedPool(keep=AIO_BOUNCE_KEEP)
        self._zeroes: mmap.mmap | None = None
        self._rwf_dsync = True  # pwritev(RWF_DSYNC) works until the kernel says otherwise
        self._zero_range_ok = True  # fallocate(ZERO_RANGE) works until EOPNOTSUPP
        self._punch_hole_ok = True  # fallocate(PUNCH_HOLE) works until EOPNOTSUPP
        if fallback_reason:
            self._log_fallback(fallback_reason)
        # On a memory filesystem a syscall is a page-cache copy that cannot block, so it
        # runs on the reactor: a worker hop costs far more (wake-up, self-pipe write, GIL
        # handover) than the copy.  The completion is still posted, never run in submit_*.
        self.memory_fs = memory_fs(fd)
        self._inline = self.memory_fs is not None and hasattr(loop, "call_soon")
        # Aligned O_DIRECT reads and writes go to the kernel from the reactor (aio.py).
        self._aio: AioRing | None = open_ring(fd, loop, path) if o_direct else None

    # ---- submission (reactor thread) ---------------------------------------------

    def submit_read(self, slba: int, nlb: int, buf: memoryview, cb: Completion) -> None:
        status = self._check(slba, nlb, buf)
        if status:
            self._post(cb, status)
        elif not self._submit_aio(False, buf, slba * self.block_size, False, cb):
            self._submit(self._read, cb, slba * self.block_size, buf)

    def submit_write(self, slba: int, nlb: int, buf: memoryview, fua: bool,
                     cb: Completion) -> None:
        status = self._check(slba, nlb, buf)
        if status:
            self._post(cb, status)
        elif not self._submit_aio(True, buf, slba * self.block_size, fua, cb):
            self._submit(self._write, cb, slba * self.block_size, buf, fua)

    def submit_flush(self, cb: Completion) -> None:
        self._submit(os.fdatasync, cb, self._fd)

    def submit_write_zeroes(self, slba: int, nlb: int, cb: Completion) -> None:
        if slba < 0 or nlb < 0 or slba + nlb > self.nblocks:
            self._post(cb, LBA_RANGE)
        else:
            self._submit(self._zero_range, cb, slba * self.block_size, nlb * self.block_size)

    def submit_discard(self, ranges: list[tuple[int, int]], cb: Completion) -> None:
        if any(s < 0 or n < 0 or s + n > self.nblocks for s, n in ranges):
            self._post(cb, LBA_RANGE)
        else:
            bs = self.block_size
            self._submit(self._deallocate, cb, [(s * bs, n * bs) for s, n in ranges if n])

    def close(self) -> None:
        """Wait for I/O in flight, drop queued I/O, close the fd; idempotent.

        Call it on the reactor thread: completions already posted check the closed
        flag there, which is how none arrives afterwards.
        """
        if self._closed:
            return
        self._closed = True
        if self._aio is not None:
            self._aio.close()  # waits for the kernel to give the buffers back
        # wait: the fd must not be closed (and its number reused) under a running syscall
        self._pool.shutdown(wait=True, cancel_futures=True)
        os.close(self._fd)
        self._bounce.close()
        self._aio_bounce.close()
        if self._zeroes is not None:
            self._zeroes.close()

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "block_size": self.block_size,
                "nblocks": self.nblocks, "o_direct": self.o_direct,
                "o_direct_fallback": self.fallback_reason, "vwc": self.vwc,
                "memory_fs": self.memory_fs,
                "io_engine": "aio" if self._aio is not None else "threads",
                "p2p_client": self.p2p_client}

    def _check(self, slba: int, nlb: int, buf: memoryview) -> int:
        if slba < 0 or nlb < 0 or slba + nlb > self.nblocks:
            return LBA_RANGE
        if buf.nbytes != nlb * self.block_size:
            return DATA_LEN
        return 0

    def _submit(self, op: Callable[..., object], cb: Completion, *args: object) -> None:
        if self._closed:
            raise BackendError(f"{self.path}: I/O submitted after the backend was closed")
        if self._inline:
            status = self._execute(op, args)
            try:
                self._loop.call_soon(self._complete, cb, status)  # type: ignore[attr-defined]
            except RuntimeError:
                pass  # the loop is closed: nobody is left to receive the completion
            return
        self._pool.submit(self._run, op, args, cb)

    def _submit_aio(self, write: bool, buf: memoryview, offset: int, fua: bool,
                    cb: Completion) -> bool:
        """Hand an O_DIRECT transfer to the kernel from the reactor, through an aligned
        bounce buffer if `buf` is not aligned; False: use the worker pool (no ring,
        buffered fd, FUA without RWF_DSYNC)."""
        ring = self._aio
        if ring is None or not self.o_direct or (fua and not self._rwf_dsync):
            return False
        if self._closed:
            raise BackendError(f"{self.path}: I/O submitted after the backend was closed")
        addr = buffer_address(buf)
        xfer = buf
        bounced: tuple[mmap.mmap, memoryview] | None = None
        if addr is None or addr % ALIGN:
            bounce = self._aio_bounce.get(buf.nbytes)
            xfer = memoryview(bounce)[:buf.nbytes]
            if write:
                xfer[:] = buf
            addr = ctypes.addressof(ctypes.c_char.from_buffer(bounce))
            bounced = bounce, xfer

        def done(err: int | None) -> None:
            if bounced is not None:
                bounce, view = bounced
                if err == 0 and not write:
                    buf[:] = view
                view.release()
                self._aio_bounce.put(bounce)
            if self._closed:
                return
            if err is None:  # refused for AIO here: the worker path knows the fallbacks
                if write:
                    self._submit(self._write, cb, offset, buf, fua)
                else:
                    self._submit(self._read, cb, offset, buf)
                return
            if err:
                logfmt.warning(log, "io_failed", path=self.path,
                               op="write" if write else "read", bytes=buf.nbytes,
                               offset=offset, reason=os.strerror(err))
                cb(errno_to_status(err))
                return
            cb(0)

        ring.submit(write, xfer, addr, offset, done, os.RWF_DSYNC if fua else 0)
        return True

    def _post(self, cb: Completion, status: int) -> None:
        try:
            self._loop.call_soon_threadsafe(self._complete, cb, status)
        except RuntimeError:
            pass  # the loop is closed: nobody is left to receive the completion

    def _complete(self, cb: Completion, status: int) -> None:
        if not self._closed:
            cb(status)

    # ---- execution (worker threads) ----------------------------------------------

    def _run(self, op: Callable[..., object], args: tuple, cb: Completion) -> None:
        self._post(cb, self._execute(op, args))

    def _execute(self, op: Callable[..., object], args: tuple) -> int:
        """Run one blocking operation; its NVMe status (0: success)."""
        try:
            op(*args)
            status = 0
        except OSError as e:
            status = errno_to_status(e.errno)
            # str(e), not e: a kept log record must not pin the traceback's buffers
            logfmt.warning(log, "io_failed", path=self.path, op=getattr(op, "__name__", op),
                           reason=str(e))
        except Exception:  # a bug must become a status, not kill a worker silently
            status = Status.INTERNAL | DNR
            log.exception("%s", logfmt.line("event", "io_internal_error", {
                "path": self.path, "op": getattr(op, "__name__", op)}))
        return status

    def _read(self, offset: int, buf: memoryview) -> None:
        direct = self.o_direct
        try:
            self._read_once(offset, buf, direct)
        except OSError as e:
            if not self._direct_refused(e, direct, "read", offset, buf.nbytes):
                raise
            self._read_once(offset, buf, False)

    def _write(self, offset: int, buf: memoryview, fua: bool) -> None:
        direct = self.o_direct
        try:
            self._write_once(offset, buf, fua, direct)
        except OSError as e:
            if not self._direct_refused(e, direct, "write", offset, buf.nbytes):
                raise
            self._write_once(offset, buf, fua, False)

    def _read_once(self, offset: int, buf: memoryview, direct: bool) -> None:
        if not direct or is_aligned(buf):
            pread_full(self._fd, buf, offset)
            return
        n = buf.nbytes
        bounce = self._bounce.get(n)
        view = memoryview(bounce)[:n]
        try:
            pread_full(self._fd, view, offset)
            buf[:] = view
        finally:
            view.release()
            self._bounce.put(bounce)

    def _write_once(self, offset: int, buf: memoryview, fua: bool, direct: bool) -> None:
        if not direct or is_aligned(buf):
            self._pwrite(buf, offset, fua)
            return
        n = buf.nbytes
        bounce = self._bounce.get(n)
        view = memoryview(bounce)[:n]
        try:
            view[:] = buf
            self._pwrite(view, offset, fua)
        finally:
            view.release()
            self._bounce.put(bounce)

    def _pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        if fua and self._rwf_dsync:
            try:
                pwrite_full(self._fd, buf, offset, os.RWF_DSYNC)
                return
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                self._rwf_dsync = False  # kernel without per-write flags: write, then sync
        pwrite_full(self._fd, buf, offset)
        if fua:
            os.fdatasync(self._fd)

    def _direct_refused(self, e: OSError, direct: bool, what: str, offset: int,
                        nbytes: int) -> bool:
        """True when an O_DIRECT I/O failed for alignment and the fd is now buffered.

        Our buffers and offsets are page/block aligned, so EINVAL on an O_DIRECT
        transfer means the filesystem wants more (e.g. a 4096-byte-sector disk under
        a 512-byte namespace); buffered I/O has no such rule.
        """
        if e.errno != errno.EINVAL or not direct:
            return False
        with self._lock:
            if self.o_direct:
                flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                self.o_direct = False
                self.fallback_reason = (
                    f"the filesystem refused an aligned O_DIRECT {what} of {nbytes} bytes "
                    f"at offset {offset} (EINVAL)")
                self._log_fallback(self.fallback_reason)
        return True

    def _log_fallback(self, reason: str) -> None:
        level = logging.INFO if reason == BUFFERED_REQUESTED else logging.WARNING
        logfmt.event(log, level, "o_direct_fallback", path=self.path,
                     reason=f"using buffered I/O instead of O_DIRECT: {reason}")

    def _zero_range(self, offset: int, length: int) -> None:
        """Write Zeroes: keep the blocks allocated if possible, as the kernel does."""
        if self._zero_range_ok:
            try:
                fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                self._zero_range_ok = False
        self._deallocate([(offset, length)])

    def _deallocate(self, ranges: list[tuple[int, int]]) -> None:
        """Discard: punch holes (reads return zeroes), else write zeroes."""
        for offset, length in ranges:
            if self._punch_hole_ok:
                try:
                    fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                              offset, length)
                    continue
                except OSError as e:
                    if e.errno != errno.EOPNOTSUPP:
                        raise
                    self._punch_hole_ok = False
            self._discard_fallback(offset, length)

    def _discard_fallback(self, offset: int, length: int) -> None:
        """Zeroes where a hole cannot be punched (the contract: discarded reads zero)."""
        self._write_zeroes(offset, length)

    def _write_zeroes(self, offset: int, length: int) -> None:
        with self._lock:
            if self._zeroes is None:
                # read-only anonymous memory is the shared zero page: costs no RAM
                self._zeroes = mmap.mmap(-1, ZERO_CHUNK, prot=mmap.PROT_READ)
        zeroes = memoryview(self._zeroes)
        try:
            end = offset + length
            while offset < end:
                n = min(ZERO_CHUNK, end - offset)
                pwrite_full(self._fd, zeroes[:n], offset)
                offset += n
        finally:
            zeroes.release()


def open_file(path: str, *, block_size: int, size: int | None, create: bool,
              buffered_io: bool, loop: CompletionLoop) -> FileBackend:
    """Open (or with create, make a sparse) regular file as a namespace."""
    flags = 0
    if create:
        if size is None:
            raise BackendError(f"{path} does not exist and create needs a size "
                               f"(set device.size)")
        if size <= 0 or size % block_size:
            raise BackendError(f"size {size} must be a positive multiple of "
                               f"block_size {block_size}")
        flags = os.O_CREAT | os.O_EXCL
    fd, o_direct, reason = open_fd(path, flags, buffered_io)
    try:
        if create and size is not None:  # size was required above
            os.ftruncate(fd, size)  # sparse: blocks are allocated on first write
            logfmt.info(log, "file_created", path=path, size=size, sparse=True)
        file_size = os.fstat(fd).st_size
        if size is not None and not create and size != file_size:
            logfmt.warning(log, "file_size_differs", path=path, size=file_size,
                           configured_size=size,
                           reason=f"exists with {file_size} bytes; using that, not the "
                                  f"configured size {size}")
        nblocks = file_size // block_size
        if nblocks == 0:
            raise BackendError(f"{path} is {file_size} bytes, smaller than one "
                               f"{block_size}-byte block")
        if file_size % block_size:
            logfmt.info(log, "file_tail_unused", path=path, size=file_size,
                        block_size=block_size,
                        reason=f"the last {file_size % block_size} bytes are unused")
    except BaseException as e:
        os.close(fd)
        if create:
            os.unlink(path)  # do not leave a half-made file behind a failed create
        if isinstance(e, OSError):
            raise BackendError(f"cannot size {path}: {e.strerror}") from e
        raise
    return FileBackend(path, fd, block_size=block_size, nblocks=nblocks, loop=loop,
                       o_direct=o_direct, fallback_reason=reason)
