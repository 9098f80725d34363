"""Kernel AIO for O_DIRECT data transfers: submitted and completed on the reactor.

A read or write of an O_DIRECT file or block device with an aligned buffer is handed to
the kernel with io_submit(2) from the reactor thread, and its completion arrives through
an eventfd that the asyncio loop watches (`add_reader`): no worker thread, no GIL
handover and no self-pipe write per I/O, which is what the thread pool costs (the
blktests-style bdev verify spent most of its time in those hops).  The kernel target's
io-cmd-bdev submits bios the same way, without a thread per request.

The iocbs are built by python-libaio, the maintained binding of libaio.  Everything that
is not an aligned O_DIRECT read or write (flush, zeroing, discard, bounce copies,
buffered fds) stays on the backend's worker pool, and so does a transfer the kernel
refuses here (EINVAL, EOPNOTSUPP): the caller gets `False` back or a `retry` call and
takes its usual path, which knows how to fall back to buffered I/O.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("nvmet_p2p.backend")

try:
    import libaio  # type: ignore[import-untyped]
except (ImportError, OSError) as e:  # the package, or libaio.so.1 itself, is missing
    libaio = None
    UNAVAILABLE: str | None = f"python-libaio cannot be loaded ({e})"
else:
    UNAVAILABLE = None

DEPTH = 256  # iocbs in flight per backend: every queue's QD of one namespace, with room
# A transfer the kernel will not do asynchronously here; the worker pool handles it.
_RETRY_ERRNOS = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.EAGAIN})

Done = Callable[[int | None], None]  # errno of the transfer (0 = success), None = retry


class Reactor(Protocol):
    """What the ring needs of the event loop: asyncio's loop fits."""

    def add_reader(self, fd: int, callback: Callable[..., object], *args: Any) -> None: ...

    def remove_reader(self, fd: int) -> bool: ...


class AioRing:
    """One AIO context and eventfd for one open fd; every call is on the reactor thread.

    `submit` never runs `done` itself: completions come from the eventfd reader.  When
    DEPTH transfers are in flight, later ones wait in order in a backlog.
    """

    def __init__(self, fd: int, loop: Reactor, depth: int = DEPTH) -> None:
        if libaio is None:
            raise OSError(errno.ENOSYS, UNAVAILABLE)
        self._fd = fd
        self._loop = loop
        self._depth = depth
        self._ctx = libaio.AIOContext(depth)
        self._efd = libaio.EventFD(flags=libaio.EFD_NONBLOCK | libaio.EFD_CLOEXEC)
        self._free = [libaio.AIOBlock(libaio.AIOBLOCK_MODE_READ, fd,
                                      eventfd=self._efd, onCompletion=self._on_event)
                      for _ in range(depth)]
        self._backlog: deque[tuple[bool, memoryview, int, int, Done]] = deque()
        self._done: dict[int, tuple[memoryview, int, int, Done]] = {}  # id(block) -> job
        self._closed = False
        loop.add_reader(self._efd.fileno(), self._reap)

    @property
    def inflight(self) -> int:
        return self._depth - len(self._free)

    def submit(self, write: bool, buf: memoryview, offset: int, done: Done,
               rw_flags: int = 0) -> None:
        """Read into / write from `buf` at `offset`; `done(errno or None)` later."""
        if not self._free:
            self._backlog.append((write, buf, offset, rw_flags, done))
            return
        self._start(write, buf, offset, rw_flags, done)

    def _start(self, write: bool, buf: memoryview, offset: int, rw_flags: int,
               done: Done) -> None:
        block = self._free.pop()
        block.mode = libaio.AIOBLOCK_MODE_WRITE if write else libaio.AIOBLOCK_MODE_READ
        block.buffer_list = (buf,)
        block.offset = offset
        block.rw_flags = rw_flags
        self._done[id(block)] = (buf, offset, rw_flags, done)
        try:
            submitted = self._ctx.submit([block])
        except OSError as e:
            submitted, err = 0, e.errno
        else:
            err = errno.EAGAIN
        if submitted != 1:
            self._recycle(block)
            # io_submit refused it outright; the caller's worker path takes it (on the
            # next turn of the loop: `done` never runs inside submit)
            self._loop_call(done, None if err in _RETRY_ERRNOS else err)

    def _loop_call(self, done: Done, value: int | None) -> None:
        self._loop.call_soon(done, value)  # type: ignore[attr-defined]

    def _recycle(self, block: Any) -> None:
        self._done.pop(id(block), None)
        block.buffer_list = ()
        self._free.append(block)

    def _on_event(self, block: Any, res: int, _res2: int) -> None:
        buf, offset, rw_flags, done = self._done[id(block)]
        write = block.mode is libaio.AIOBLOCK_MODE_WRITE
        self._recycle(block)
        if res < 0:
            err = -res
            done(None if err in _RETRY_ERRNOS else err)
        elif res < buf.nbytes:
            if res == 0:
                done(errno.EIO)  # end of device: the kernel's pread would say the same
            else:  # a short transfer: the rest goes as its own iocb, in front of the backlog
                self._backlog.appendleft((write, buf[res:], offset + res, rw_flags, done))
        else:
            done(0)

    def _reap(self) -> None:
        if self._closed:
            return
        self._efd.read()  # the count only says "something completed"
        while self.inflight:
            if not self._ctx.getEvents(min_nr=0, nr=self._depth, timeout=0):
                break
        while self._backlog and self._free:
            self._start(*self._backlog.popleft())

    def close(self) -> None:
        """Wait for the transfers in flight (their buffers stay the kernel's until then),
        drop the backlog and the completions; idempotent.  No `done` runs afterwards."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._efd.fileno())
        self._backlog.clear()
        self._done = {k: (b, o, f, _ignore) for k, (b, o, f, _d) in self._done.items()}
        while self.inflight:
            self._ctx.getEvents(min_nr=1, nr=self._depth, timeout=None)
        self._ctx.close()
        self._efd.close()


def _ignore(*_args: object) -> None:
    pass


def open_ring(fd: int, loop: Any, what: str) -> AioRing | None:
    """An AioRing for `fd` on `loop`, or None (logged once) where AIO cannot be used."""
    if not hasattr(loop, "add_reader"):
        return None  # not an event loop (a test double): the worker pool it is
    if libaio is None:
        log.info("%s: I/O on worker threads: %s", what, UNAVAILABLE)
        return None
    try:
        return AioRing(fd, loop)
    except OSError as e:
        log.info("%s: I/O on worker threads: io_setup failed: %s", what, os.strerror(e.errno)
                 if e.errno else e)
        return None
