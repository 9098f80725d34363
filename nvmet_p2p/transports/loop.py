"""The in-process loop transport: a host and the target in one Python process.

It implements the same transport ops as RDMA and moves data the way RDMA does, so
the core cannot tell them apart: host buffers are "registered" in a `MemoryRegistry`
and named by keyed SGLs (address = offset in the buffer, key = its handle); the
transport "reads" and "writes" them by copying.  In-capsule data works as on RDMA.
For fast unit tests, fuzzing and benchmarks of the core; not a substitute for the
RDMA path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nvmet_p2p import logfmt
from nvmet_p2p.cmb import Provider, copy_from, copy_into
from nvmet_p2p.core.request import DataDir
from nvmet_p2p.core.sgl import DataMap, SglKind, map_sgl
from nvmet_p2p.wire.command import SQE_SIZE
from nvmet_p2p.wire.status import DNR, Status

if TYPE_CHECKING:
    from nvmet_p2p.core.ctrl import Ctrl
    from nvmet_p2p.core.queue import SQ
    from nvmet_p2p.core.request import Request
    from nvmet_p2p.core.target import Target

log = logging.getLogger("nvmet_p2p.loop")


class MemoryRegistry:
    """Host memory a loop host exposes to the target, by key (the loop's rkeys)."""

    def __init__(self) -> None:
        self._bufs: dict[int, memoryview] = {}
        self._next = 1

    def register(self, buf: bytearray | memoryview) -> int:
        key = self._next
        self._next = (self._next % 0xFFFFFFFF) + 1
        self._bufs[key] = memoryview(buf).cast("B")
        return key

    def deregister(self, key: int) -> None:
        self._bufs.pop(key, None)

    def window(self, key: int, addr: int, length: int) -> memoryview | None:
        """The registered bytes [addr, addr+length) of `key`, or None (a bad rkey)."""
        buf = self._bufs.get(key)
        if buf is None or addr < 0 or addr + length > len(buf):
            return None
        return buf[addr:addr + length]


class LoopConnection:
    """One NVMe queue between a loop host and the target."""

    def __init__(self, transport: LoopTransport, port: Any, mem: MemoryRegistry,
                 on_cqe: Callable[[bytes], None], qid: int = 0, size: int = 0) -> None:
        self.transport = transport
        self.port = port
        self.mem = mem
        self.on_cqe = on_cqe
        # qid and size play the RDMA CM private data (qid, hsqsize + 1): known before
        # Connect, so the core checks Connect against them
        self.sq: SQ = transport.target.create_sq(port, transport, qid, size)
        self.sq.priv = self
        # as on RDMA, admin queues have no in-capsule data area
        self.inline_data_size = transport.target.inline_data_size(port) if qid else 0
        self.connected = True

    def submit(self, capsule: bytes | bytearray) -> None:
        """Deliver one capsule (SQE + in-capsule data); the CQE comes via on_cqe."""
        if not self.connected:
            raise ConnectionError("loop queue is disconnected")
        if len(capsule) < SQE_SIZE:
            # as RDMA: a receive shorter than an SQE is a fatal queue error, no CQE
            logfmt.error(log, "loop_short_capsule", qid=self.sq.qid, bytes=len(capsule),
                         reason="shorter than an SQE; tearing the queue down")
            if self.sq.ctrl is not None:
                self.sq.ctrl.fatal_error("capsule shorter than 64 bytes")
            self.disconnect()
            return
        # a private copy: the host may reuse its buffer, and in-capsule data is used in place
        data = memoryview(bytearray(capsule))
        req = self.sq.new_request(data)
        if not req.init():
            return
        target = self.transport.target
        m = map_sgl(req.sqe.sgl, transfer_len=req.transfer_len,
                    host_write=req.data_dir == DataDir.TO_CTRL,
                    inline_data_size=self.inline_data_size,
                    capsule_data_len=len(data) - SQE_SIZE, keyed_sgls=True,
                    max_transfer=target.max_transfer)
        if isinstance(m, int):
            req.complete(m)
            return
        req.priv = m
        if m.kind == SglKind.INLINE:
            base = SQE_SIZE + m.offset
            req.use_in_capsule_data(data[base:base + m.length])
        elif m.kind == SglKind.KEYED:
            req.alloc_data_buffer(m.length)  # without a pool: never exhausted
            buf = req.buf
            assert buf is not None
            if req.data_dir == DataDir.TO_CTRL:
                src = self.mem.window(m.key, m.addr, m.length)
                if src is None:
                    req.complete(Status.DATA_XFER_ERROR | DNR)
                    return
                if req.p2p_dev is not None:  # BAR memory: its access rules
                    copy_into(buf, src, req.p2p_dev.access)
                else:
                    buf[:] = src
        req.execute()

    def disconnect(self) -> None:
        if self.connected:
            self.connected = False
            self.transport.conns.discard(self)
            self.sq.destroy()


class LoopTransport:
    trtype = "loop"
    keyed_sgls = True
    msdbd = 1

    def __init__(self, target: Target) -> None:
        self.target = target
        self.ports: dict[int, Any] = {}
        self.conns: set[LoopConnection] = set()
        target.register_transport(self)

    # -- TransportOps ----------------------------------------------------------
    def add_port(self, port: Any) -> None:
        self.ports[port.portid] = port

    def remove_port(self, port: Any) -> None:
        self.ports.pop(port.portid, None)

    def p2p_client(self, port: Any) -> str | None:
        """No DMA client: the loop moves data with the CPU, so only the namespace's device
        must reach the provider."""
        return None

    def p2p_can_register(self, provider: Provider) -> str | None:
        """The CPU reaches any provider's mapping (with its access rules)."""
        return None

    def queue_response(self, req: Request) -> None:
        conn = req.sq.priv
        assert isinstance(conn, LoopConnection)
        m: DataMap | None = req.priv if isinstance(req.priv, DataMap) else None
        if (m is not None and m.kind == SglKind.KEYED and req.data_dir == DataDir.FROM_CTRL
                and req.cqe.status == 0):
            assert req.buf is not None  # attached before execute(), freed only below
            dst = conn.mem.window(m.key, m.addr, m.length)
            if dst is None:
                req.fail_data_transfer()
            elif req.p2p_dev is not None:
                dst[:] = copy_from(req.buf, req.p2p_dev.access)
            else:
                dst[:] = req.buf
        req.free_data_buffer()
        if conn.connected:
            conn.on_cqe(req.cqe.encode())

    def delete_ctrl(self, ctrl: Ctrl) -> None:
        for conn in [c for c in self.conns if c.sq.ctrl is ctrl]:
            conn.disconnect()

    # -- for hosts ------------------------------------------------------------
    def connect(self, portid: int, mem: MemoryRegistry, on_cqe: Callable[[bytes], None],
                qid: int = 0, size: int = 0) -> LoopConnection:
        """A queue to `portid` for queue `qid` of `size` entries (0: as Connect says)."""
        port = self.ports.get(portid)
        if port is None:
            raise ConnectionRefusedError(f"loop port {portid} is not listening")
        conn = LoopConnection(self, port, mem, on_cqe, qid, size)
        self.conns.add(conn)
        return conn

    def resources(self) -> dict[str, int]:
        return {"queues": len(self.conns), "ports": len(self.ports)}

    def close(self) -> None:
        for conn in list(self.conns):
            conn.disconnect()
        self.ports.clear()
