"""A submission queue as the core sees it: which controller it belongs to, its head.

The transport owns the connection; the core owns what the queue means: before
Connect it accepts only Connect, afterwards admin or I/O commands by its qid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nvmet_p2p.core import admin, fabrics, io
from nvmet_p2p.core.request import Request
from nvmet_p2p.wire.command import AdminOpcode, FabricsType
from nvmet_p2p.wire.sqe_layout import IPO_FLAGS, IPO_OPCODE
from nvmet_p2p.wire.status import DNR, Status

if TYPE_CHECKING:
    from nvmet_p2p.configfs import Port
    from nvmet_p2p.core.ctrl import Ctrl
    from nvmet_p2p.core.target import Target
    from nvmet_p2p.core.transport import TransportOps

_FUSE_MASK = 0x03
_PSDT_SGL = 0x40  # flags bits 7:6 = 01b: SGLs, metadata pointer contiguous


class SQ:
    def __init__(self, target: Target, port: Port, ops: TransportOps, qid: int,
                 size: int) -> None:
        self.target = target
        self.port = port
        self.ops = ops
        self.qid = qid
        self.size = size  # entries, as the transport sized the queue (0 = not known yet)
        self.ctrl: Ctrl | None = None
        self.sqhd = 0
        self.disable_sqflow = False
        self.destroyed = False
        self.priv: Any = None  # the transport's own per-queue state
        # the address the host reached this queue at, which discovery names for a port
        # listening on a wildcard address (the kernel's disc_traddr); None: not known
        self.local_traddr: str | None = None

    def new_request(self, capsule: bytes | memoryview) -> Request:
        return Request(self, capsule)

    def parse(self, req: Request) -> int:
        cmd = req.cmd
        assert cmd is not None
        if cmd.flags & _FUSE_MASK:
            req.set_error_loc(IPO_FLAGS)
            return Status.INVALID_FIELD | DNR  # fused operations are not supported
        if cmd.flags & 0xC0 != _PSDT_SGL:
            req.set_error_loc(IPO_FLAGS)
            return Status.INVALID_FIELD | DNR  # fabrics commands must use SGLs
        if self.ctrl is None:
            if cmd.opcode == AdminOpcode.FABRICS and cmd.fctype == FabricsType.CONNECT:
                return fabrics.parse_connect(req)
            req.set_error_loc(IPO_OPCODE)
            return Status.CMD_SEQ_ERROR | DNR  # nothing but Connect before Connect
        self.ctrl.touch()
        if self.qid == 0:
            return admin.parse(req)
        return io.parse(req)

    def complete(self, req: Request) -> None:
        if self.size:
            self.sqhd = (self.sqhd + 1) % self.size
        req.cqe.sq_head = 0xFFFF if self.disable_sqflow else self.sqhd
        if req.cqe.status and self.ctrl is not None:
            self.ctrl.log_error(req)
        if req.ns is not None:
            req.ns.put()
        self.ops.queue_response(req)

    def destroy(self) -> None:
        """The transport's connection for this queue is gone."""
        if self.destroyed:
            return
        self.destroyed = True
        if self.ctrl is not None:
            self.ctrl.sq_destroyed(self)
            self.ctrl = None
