"""The RDMA mode of the Python host library: a pyverbs NVMe-oF initiator for tests.

It sends what the Linux host never would (arbitrary CM private data, raw capsules with
any SGL and in-capsule data) and also does the ordinary things (fabrics Connect,
Property Set CC.EN, Read/Write) through `nvmet_p2p.host.base.Host`.  It is a test tool and
runs in its own process: pyverbs holds the GIL while it blocks, so it must never share
an interpreter with the target.  Even so nothing here blocks inside librdmacm or
pyverbs: CM events are read from a non-blocking fd with select(), completions are
polled, and every wait has a deadline.
"""

from __future__ import annotations

import select
import time
from typing import Any

import pyverbs.enums as e
from pyverbs.mr import MR

from nvmet_p2p.cmb import buffer_address
from nvmet_p2p.errors import TransportError
from nvmet_p2p.host.base import DEFAULT_TIMEOUT, Host, HostQueue
from nvmet_p2p.transports.rdma_cm import (
    CmEvent,
    CmEventType,
    CmId,
    CmRequest,
    EventChannel,
    decode_cm_accept,
    decode_cm_reject,
)
from nvmet_p2p.transports.rdma_verbs import (
    REMOTE_ACCESS,
    Device,
    QueuePair,
    RegisteredBuffer,
    recv_wr,
    send_wr,
)
from nvmet_p2p.wire.command import CQE_SIZE, SQE_SIZE, Sgl, SglType
from nvmet_p2p.wire.limits import NVME_RDMA_IP_PORT, NVMET_RDMA_MAX_INLINE_DATA_SIZE

HOST_RESPONDER_RESOURCES = 16  # RDMA READs the target may have outstanding against us
CAPSULE_SLOT = SQE_SIZE + NVMET_RDMA_MAX_INLINE_DATA_SIZE + 4096  # room for over-long raw capsules
_POLL_SLEEP_S = 50e-6


class Rejected(Exception):
    """The target rejected the CM connect; `status` is the NVMe-oF reject status."""

    def __init__(self, status: int | None) -> None:
        super().__init__(f"connect rejected (status {status!r})")
        self.status = status


def _wait_event(channel: EventChannel, deadline: float) -> CmEvent:
    while True:
        ev = channel.get_event()
        if ev is not None:
            return ev
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no RDMA CM event before the deadline")
        select.select([channel.fd], [], [], left)


class RdmaConnection:
    """One RC connection to the target: CM ID, QP, CQE receive ring, capsule send ring."""

    def __init__(self, traddr: str, trsvcid: int, adrfam: str, private_data: bytes, *,
                 depth: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.depth = depth
        self.crqsize = 0
        self.connected = False
        self.disconnected = False
        self.invalidated: list[int] = []  # rkeys the target invalidated (SEND_WITH_INV)
        self.dev: Device | None = None
        self.qp: QueuePair | None = None
        self.rings: list[RegisteredBuffer] = []
        self.mrs: dict[int, tuple[MR, Any]] = {}  # rkey -> (MR, buffer kept alive)
        self.channel = EventChannel()
        self.cm_id = CmId(self.channel)
        deadline = time.monotonic() + timeout
        try:
            self._connect(traddr, trsvcid, adrfam, private_data, deadline)
        except BaseException:
            self.close()
            raise

    def _expect(self, want: CmEventType, deadline: float) -> CmEvent:
        ev = _wait_event(self.channel, deadline)
        if ev.type == CmEventType.REJECTED:
            raise Rejected(decode_cm_reject(ev.private_data))
        if ev.type != want:
            raise TransportError(f"expected {want.name}, got {ev.type.name} "
                                 f"(status {ev.status})")
        return ev

    def _connect(self, traddr: str, trsvcid: int, adrfam: str, private_data: bytes,
                 deadline: float) -> None:
        self.cm_id.resolve_addr(adrfam, traddr, trsvcid)
        self._expect(CmEventType.ADDR_RESOLVED, deadline)
        self.cm_id.resolve_route()
        self._expect(CmEventType.ROUTE_RESOLVED, deadline)
        self.dev = Device(self.cm_id.device_name)
        self.qp = QueuePair(self.dev, send_depth=self.depth * 2, recv_depth=self.depth)
        self.recv = RegisteredBuffer(self.dev.pd, self.depth * CQE_SIZE)
        self.send_ring = RegisteredBuffer(self.dev.pd, self.depth * CAPSULE_SLOT)
        self.rings = [self.recv, self.send_ring]
        self.free_send = list(range(self.depth))
        self.qp.to_init(self.cm_id, remote_access=True)
        for slot in range(self.depth):
            self._post_recv(slot)
        resp = min(HOST_RESPONDER_RESOURCES, self.dev.max_qp_rd_atom)
        self.cm_id.connect(private_data, self.qp.qp_num, responder_resources=resp,
                           initiator_depth=0)
        ev = self._expect(CmEventType.CONNECT_RESPONSE, deadline)
        self.crqsize = decode_cm_accept(ev.private_data)
        self.qp.to_rts(self.cm_id, max_rd_atomic=0, max_dest_rd_atomic=resp)
        self.cm_id.establish()
        self.connected = True

    # -- data path ---------------------------------------------------------------------
    def _post_recv(self, slot: int) -> None:
        wr = recv_wr(slot, self.recv.addr + slot * CQE_SIZE, CQE_SIZE, self.recv.lkey)
        try:
            self.qp.qp.post_recv(wr)
        finally:
            wr.close()  # posting copied it; see rdma_verbs.recv_wr on pyverbs' leak

    def send(self, capsule: bytes) -> None:
        if len(capsule) > CAPSULE_SLOT:
            raise ValueError(f"capsule of {len(capsule)} bytes exceeds {CAPSULE_SLOT}")
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while not self.free_send:
            self.poll(lambda raw: None, deadline - time.monotonic())
        slot = self.free_send.pop()
        base = slot * CAPSULE_SLOT
        self.send_ring.view[base:base + len(capsule)] = capsule
        wr = send_wr(1 << 32 | slot, e.IBV_WR_SEND, self.send_ring.addr + base, len(capsule),
                     self.send_ring.lkey, signaled=True)
        try:
            self.qp.qp.post_send(wr)
        finally:
            wr.close()

    def poll(self, on_cqe: Any, timeout: float) -> bool:
        """Poll until a CQE arrived (True) or `timeout` passed (False)."""
        deadline = time.monotonic() + max(timeout, 0)
        while True:
            self._cm_poll()
            if self.disconnected:
                raise ConnectionError("the target disconnected this queue")
            n, wcs = self.qp.cq.poll(16)
            got = False
            for wc in wcs[:n]:
                if wc.status != e.IBV_WC_SUCCESS:
                    self.disconnected = True
                    raise ConnectionError(f"work request failed (wc status {wc.status})")
                if wc.wr_id >> 32:
                    self.free_send.append(wc.wr_id & 0xFFFFFFFF)
                    continue
                slot = wc.wr_id
                raw = bytes(self.recv.view[slot * CQE_SIZE:(slot + 1) * CQE_SIZE])
                if wc.wc_flags & e.IBV_WC_WITH_INV:
                    self.invalidated.append(wc.imm_data)  # holds invalidated_rkey
                self._post_recv(slot)
                on_cqe(raw)
                got = True
            if got:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_SLEEP_S)

    def _cm_poll(self) -> None:
        ev = self.channel.get_event()
        if ev is not None and ev.type in (CmEventType.DISCONNECTED,
                                          CmEventType.DEVICE_REMOVAL,
                                          CmEventType.TIMEWAIT_EXIT):
            self.disconnected = True

    def register(self, buf: bytearray) -> MR:
        """Register `buf` for the target's RDMA READ/WRITE; it stays pinned until unregister."""
        mr = MR(self.dev.pd, len(buf), REMOTE_ACCESS, address=buffer_address(buf))
        self.mrs[mr.rkey] = (mr, buf)
        return mr

    def unregister(self, rkey: int) -> None:
        entry = self.mrs.pop(rkey, None)
        if entry is not None:
            entry[0].close()

    def close(self, timeout: float = 2.0) -> None:
        if self.connected and not self.disconnected:
            self.connected = False
            self.cm_id.disconnect()
            deadline = time.monotonic() + timeout
            try:
                while True:
                    ev = _wait_event(self.channel, deadline)
                    if ev.type == CmEventType.DISCONNECTED:
                        break
            except TimeoutError:
                pass
        self.connected = False
        for rkey in list(self.mrs):
            self.unregister(rkey)
        if self.qp is not None:
            self.qp.close()
            self.qp = None
        for ring in self.rings:
            ring.close()
        self.rings = []
        self.cm_id.close()
        if self.dev is not None:
            self.dev.close()
            self.dev = None
        self.channel.close()


class RdmaHostQueue(HostQueue):
    """A host queue over one RDMA connection; CM private data from qid and size."""

    def __init__(self, host: RdmaHost, qid: int, size: int,
                 private_data: bytes | None = None) -> None:
        super().__init__(qid, size)
        pdata = private_data if private_data is not None else \
            CmRequest(0, qid, hrqsize=size, hsqsize=size - 1).encode()
        self.conn = RdmaConnection(host.traddr, host.trsvcid, host.adrfam, pdata,
                                   depth=size, timeout=host.timeout)

    @property
    def crqsize(self) -> int:
        return self.conn.crqsize

    @property
    def invalidated(self) -> list[int]:
        return self.conn.invalidated

    def send(self, capsule: bytes) -> None:
        self.conn.send(capsule)

    def progress(self, timeout: float) -> None:
        self.conn.poll(self.on_cqe, timeout)

    def expose(self, buf: bytearray, invalidate: bool = False) -> Sgl:
        mr = self.conn.register(buf)
        t = SglType.KEYED_DATA_BLOCK_INV if invalidate else SglType.KEYED_DATA_BLOCK
        return Sgl(t, buffer_address(buf), len(buf), mr.rkey)

    def unexpose(self, sgl: Sgl) -> None:
        self.conn.unregister(sgl.key)

    def close(self) -> None:
        self.conn.close()


class RdmaHost(Host):
    """An NVMe-oF/RDMA host association (and a raw CM prober) for tests."""

    def __init__(self, traddr: str, trsvcid: int = NVME_RDMA_IP_PORT, *, adrfam: str = "ipv4",
                 hostnqn: str | None = None, hostid: bytes | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(hostnqn, hostid)
        self.traddr = traddr
        self.trsvcid = trsvcid
        self.adrfam = adrfam
        self.timeout = timeout

    def open_queue(self, qid: int, size: int) -> RdmaHostQueue:
        return RdmaHostQueue(self, qid, size)

    def open_raw_queue(self, qid: int, size: int, private_data: bytes) -> RdmaHostQueue:
        """A queue connected with exactly `private_data` (raises Rejected)."""
        return RdmaHostQueue(self, qid, size, private_data)

    def connect_raw(self, private_data: bytes, depth: int = 32) -> tuple[str, int | None]:
        """CM-connect with `private_data` only: ("accepted", crqsize) or ("rejected", sts)."""
        try:
            conn = RdmaConnection(self.traddr, self.trsvcid, self.adrfam, private_data,
                                  depth=depth, timeout=self.timeout)
        except Rejected as rej:
            return ("rejected", rej.status)
        crqsize = conn.crqsize
        conn.close()
        return ("accepted", crqsize)

    def connect(self, subnqn: str, hostnqn: str | None = None, *, nr_io_queues: int = 1,
                queue_size: int = 32, kato_ms: int = 0, enable: bool = True) -> RdmaHost:
        if hostnqn is not None:
            self.hostnqn = hostnqn
        super().connect(subnqn, nr_io_queues=nr_io_queues, queue_size=queue_size,
                        kato_ms=kato_ms, enable=enable)
        return self
