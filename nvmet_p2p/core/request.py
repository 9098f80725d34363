"""One NVMe command from capsule to completion, as the core sees it.

The transport creates a Request per received capsule, calls `init()` (parse: the
core decides what the command is, how much data it moves and in which direction),
attaches the data buffer through the core (`alloc_data_buffer()` for data it moves
itself, `use_in_capsule_data()` for data that came in the capsule), moves the data,
calls `execute()`, sends what `queue_response` hands back and gives the buffer back
with `free_data_buffer()`.  Everything the core reports is in `cqe`; nothing raises out
of here to a transport.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING

from nvmet_p2p import logfmt
from nvmet_p2p.core.p2pmem import REASON_EXHAUSTED, REASON_IN_CAPSULE
from nvmet_p2p.wire.command import SQE_SIZE, Cqe, IoOpcode, Sqe
from nvmet_p2p.wire.limits import NVMET_NO_ERROR_LOC
from nvmet_p2p.wire.status import DNR, Status

if TYPE_CHECKING:
    from nvmet_p2p.cmb import Chunk, Provider
    from nvmet_p2p.core.ctrl import Ctrl
    from nvmet_p2p.core.queue import SQ
    from nvmet_p2p.core.subsys import Ns

log = logging.getLogger("nvmet_p2p.core")


class DataDir(IntEnum):
    NONE = 0
    TO_CTRL = 1  # host write: data flows host -> target before execution
    FROM_CTRL = 2  # host read: data flows target -> host after execution


Handler = Callable[["Request"], None]

# Payload that may live in P2P memory: Read and Write on I/O queues, as the kernel's
# nvmet_req_find_p2p_dev() (which also admits DSM ranges; ours are parsed by the CPU).
_P2P_OPCODES = frozenset((IoOpcode.READ, IoOpcode.WRITE))


class Request:
    __slots__ = (
        "buf",
        "capsule",
        "chunk",
        "cmd",
        "completed",
        "cqe",
        "data_dir",
        "error_loc",
        "handler",
        "ns",
        "p2p_dev",
        "priv",
        "sq",
        "sysmem_reason",
        "transfer_len",
    )

    def __init__(self, sq: SQ, capsule: bytes | memoryview) -> None:
        self.sq = sq
        self.capsule = capsule
        self.cmd: Sqe | None = None
        self.cqe = Cqe(sq_id=sq.qid)
        self.transfer_len = 0
        self.data_dir = DataDir.NONE
        self.buf: memoryview | None = None  # the data, len == transfer_len once attached
        self.ns: Ns | None = None  # the namespace of an I/O command (a reference held)
        self.priv: object = None  # the transport's own per-request state
        self.chunk: Chunk | None = None  # the pool chunk behind buf, if buf is one
        self.p2p_dev: Provider | None = None  # the P2P provider chunk is from; None: system
        self.sysmem_reason = ""  # why the data is in system memory, recorded where decided
        self.handler: Handler | None = None
        self.error_loc = NVMET_NO_ERROR_LOC  # byte offset of the bad field in the SQE, for the error log
        self.completed = False

    @property
    def sqe(self) -> Sqe:
        """`cmd` for the parse and execute handlers, which run only after init() decoded it."""
        assert self.cmd is not None, "command handler before init()"
        return self.cmd

    @property
    def ctrl(self) -> Ctrl:
        """The queue's controller, for admin and I/O handlers: SQ.parse hands a queue
        without one only to Connect, and transports execute nothing after sq.destroy()."""
        ctrl = self.sq.ctrl
        assert ctrl is not None, "admin or I/O command on a queue without a controller"
        return ctrl

    @property
    def in_capsule(self) -> memoryview:
        """The in-capsule data area that arrived behind the SQE."""
        return memoryview(self.capsule)[SQE_SIZE:]

    # -- the data buffer, as the kernel's nvmet_req_alloc_sgls() / nvmet_req_free_sgls() --
    def alloc_data_buffer(self, length: int, pool: Provider | None = None) -> bool:
        """Attach the buffer for `length` bytes of data the transport moves itself.

        First a chunk of the P2P provider this controller uses for the request's
        namespace (`Ctrl.p2p_choice`; Read and Write on I/O queues only: admin commands,
        Connect and DSM ranges never use P2P memory); when there is none, or it is
        exhausted, system memory: a chunk of `pool` (the transport's registered pool)
        or, without a pool, a heap buffer.  Sets `buf` (and `chunk`, `p2p_dev`) and
        records in `sysmem_reason` why the data is not P2P.

        Returns False, with nothing attached, only when `pool` is exhausted: call again
        when memory goes back to it (the P2P provider is tried again too).  Every buffer
        goes back with `free_data_buffer()`.
        """
        ctrl, ns = self.sq.ctrl, self.ns
        if self.sq.qid and ctrl is not None and ns is not None \
                and self.sqe.opcode in _P2P_OPCODES:
            choice = ctrl.p2p_choice(ns)
            p2p_dev = choice.p2p_dev
            chunk = p2p_dev.alloc(length) if p2p_dev is not None else None
            if chunk is not None:
                self.chunk, self.buf, self.p2p_dev = chunk, chunk.view, p2p_dev
                self.sysmem_reason = ""
                return True
            self.sysmem_reason = choice.reason if p2p_dev is None else REASON_EXHAUSTED
        if pool is None:
            self.buf = memoryview(bytearray(length))
            return True
        chunk = pool.alloc(length)
        if chunk is None:
            return False
        self.chunk, self.buf = chunk, chunk.view
        return True

    def use_in_capsule_data(self, data: memoryview) -> None:
        """The data came inside the capsule (`data` is that part of it): never P2P."""
        self.buf = data
        self.sysmem_reason = REASON_IN_CAPSULE

    def free_data_buffer(self) -> None:
        """Give the data buffer back to where it came from; idempotent."""
        chunk, self.chunk, self.buf = self.chunk, None, None
        if chunk is not None:
            chunk.free()

    # -- parse, execute, complete ----------------------------------------------------
    def init(self) -> bool:
        """Parse the command. False: it failed and is already completed."""
        if len(self.capsule) < SQE_SIZE:
            self.complete(Status.INVALID_FIELD | DNR)
            return False
        self.cmd = Sqe.decode(self.capsule)
        self.cqe.cid = self.cmd.cid
        try:
            status = self.sq.parse(self)
        except Exception:  # a bug of ours must not take the queue down
            log.exception("%s", logfmt.line("event", "parse_failed", {
                "opcode": f"{self.cmd.opcode:#04x}"}))
            status = Status.INTERNAL | DNR
        if status:
            self.complete(status)
            return False
        return True

    def execute(self) -> None:
        assert self.handler is not None
        try:
            self.handler(self)
        except Exception:
            log.exception("%s", logfmt.line("event", "execute_failed", {
                "opcode": f"{self.cmd.opcode:#04x}" if self.cmd else None}))
            if not self.completed:
                self.complete(Status.INTERNAL | DNR)

    def complete(self, status: int, result: int | None = None) -> None:
        """Finish the command: fill the CQE and hand it to the transport, exactly once."""
        if self.completed:
            return
        self.completed = True
        if result is not None:
            self.cqe.result = result
        self.cqe.status = status
        self.sq.complete(self)

    def fail_data_transfer(self) -> None:
        """The transport could not move a completed command's data to the host.

        The CQE says so, and the error log records it: the core logged nothing when the
        command completed, its status was 0 then.
        """
        self.cqe.status = Status.DATA_XFER_ERROR | DNR
        if self.sq.ctrl is not None:
            self.sq.ctrl.log_error(self)

    def uninit(self) -> None:
        """Drop a parsed command that will never execute because its queue went away
        (data still on the wire): what it holds of the core goes back and no completion
        is sent, as the kernel's nvmet_req_uninit()."""
        if self.completed:
            return
        self.completed = True
        if self.ns is not None:
            self.ns.put()
            self.ns = None

    def set_error_loc(self, offset: int) -> None:
        self.error_loc = offset
