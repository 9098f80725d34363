"""The NVMe-oF RDMA transport: listeners, one RC QP per NVMe queue, data movement.

Reactor discipline: everything runs on the target's asyncio loop and nothing ever
blocks inside librdmacm or pyverbs.  The CM event channel's fd is non-blocking and
watched with `loop.add_reader` (see rdma_cm for why the CM is driven through ctypes).
Each queue's CQ has its own completion channel, watched the same way: when it is
readable the queue joins the transport's poll group, whose CQs are drained on every pass
of the loop while the queue has commands in flight, and re-armed when it has none or
after `poll_budget` seconds without completions (SPDK polls; we poll only while there is
work, so an idle target sleeps in epoll).  The send-queue WRs a pass produces (RDMA
READs, WRITEs, response SENDs of all its commands) go out in one post per queue.

Work requests are built once and reused: a RECV per ring slot, a response SEND per
command context, and the RDMA READ/WRITE for a data chunk (kept per chunk address,
since the pool hands the same chunks out again); a post only updates ids, keys and
links.  Every pyverbs object costs an allocation (and, uncached, a logger lookup; see
rdma_verbs), and pyverbs 44 leaks a WR's memory unless it is closed.

A command is a state machine (`CmdState`), as in SPDK's lib/nvmf/rdma.c: `_process`
drives one command until its state stops changing; waiting for a data buffer, for an
RDMA READ slot (the QP's initiator depth) and for send-queue credits are states with
FIFO wait lists, so a burst waits instead of overrunning the QP.  The core may call
`queue_response` from inside `init()` or `execute()`; `_process` is re-entrancy-safe.

Queue life: CONNECT_REQUEST -> checks on the private data (reject codes of the NVMe-oF
RDMA binding) -> QP, CQ and a receive ring registered once (hsqsize + 1 capsule slots;
SQE + in-capsule area on I/O queues only) -> QP to RTS, RECVs posted -> accept with
crqsize.  Capsules are processed as soon as they arrive, also before ESTABLISHED (the
host may send Connect right after our REP; our QP is already RTS, so its response can
be sent).  DISCONNECTED / TIMEWAIT_EXIT / errors / delete_ctrl tear the queue down:
QP to error and destroyed first (the device can no longer touch our buffers), then every
command still in flight is forced to COMPLETED so its buffer goes back to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from enum import IntEnum, auto
from typing import TYPE_CHECKING, Any

import pyverbs.enums as e
from pyverbs.wr import RecvWR, SendWR

from nvmet_p2p import logfmt
from nvmet_p2p.cmb import Provider, SystemMemoryProvider
from nvmet_p2p.core.request import DataDir
from nvmet_p2p.core.sgl import DataMap, SglKind, map_sgl
from nvmet_p2p.errors import NvmetError, TransportError
from nvmet_p2p.transports.rdma_cm import (
    CmEvent,
    CmEventType,
    CmId,
    CmRejectStatus,
    CmRequest,
    EventChannel,
    check_cm_request,
    encode_cm_accept,
    encode_cm_reject,
    parse_cm_request,
)
from nvmet_p2p.transports.rdma_mr import PoolRegistration, register_provider
from nvmet_p2p.transports.rdma_verbs import Device, QueuePair, RegisteredBuffer, recv_wr, send_wr
from nvmet_p2p.wire.command import CQE_SIZE, SQE_SIZE
from nvmet_p2p.wire.limits import (
    NVME_RDMA_IP_PORT,
    NVMET_NR_QUEUES,
    NVMET_RDMA_MAX_INLINE_DATA_SIZE,
)
from nvmet_p2p.wire.status import DNR, Status

if TYPE_CHECKING:
    from nvmet_p2p.core.ctrl import Ctrl
    from nvmet_p2p.core.queue import SQ
    from nvmet_p2p.core.request import Request
    from nvmet_p2p.core.target import Target

log = logging.getLogger("nvmet_p2p.rdma")

POLL_BATCH = 32
POLL_BUDGET = 0.002  # s a queue stays in the poll group without completions (see _poll_group)
DATA_WR_CACHE = 1024  # RDMA READ/WRITE work requests kept per queue, by chunk
DEFAULT_POOL_SIZE = 32 << 20

_RECV = 0  # wr_id kind (high bits): a RECV slot; flushed WCs carry no valid opcode
_CMD = 1


def _wr_id(kind: int, index: int) -> int:
    return kind << 32 | index


class CmdState(IntEnum):  # int hashing: _STEPS is looked up at every step
    NEW = auto()  # capsule received; the core parses it, the SGL is mapped
    NEED_BUFFER = auto()  # waits for a data buffer from the pool
    DATA_TRANSFER_TO_TARGET_PENDING = auto()  # waits for an RDMA READ slot / send credit
    TRANSFERRING_HOST_TO_TARGET = auto()  # RDMA READ posted, waits for its completion
    READY_TO_EXECUTE = auto()  # data in place; hand to the core
    EXECUTING = auto()  # the core / backend works; waits for queue_response
    EXECUTED = auto()  # response known; RECV re-posted
    READY_TO_COMPLETE = auto()  # waits for send-queue credits for WRITE(s) + SEND
    TRANSFERRING_TARGET_TO_HOST = auto()  # RDMA WRITE + SEND posted, waits for the SEND
    COMPLETING = auto()  # SEND posted, waits for its completion
    COMPLETED = auto()  # buffers returned; the context is free


class RdmaCmd:
    """The transport's per-command context (SPDK's spdk_nvmf_rdma_request)."""

    __slots__ = (
        "busy",
        "byte_len",
        "dmap",
        "index",
        "lkey",
        "read_done",
        "recv_reposted",
        "req",
        "responded",
        "send_done",
        "send_wr",
        "sge_addr",
        "slot",
        "state",
        "waiting",
        "wr_count",
    )

    def __init__(self, index: int, send_wr: SendWR) -> None:
        self.index = index
        self.send_wr: SendWR | None = send_wr  # the response SEND, from this context's CQE slot
        self.reset()

    def reset(self) -> None:
        self.state = CmdState.COMPLETED
        self.slot = -1  # receive ring slot the capsule arrived in
        self.byte_len = 0
        self.req: Request | None = None
        self.dmap: DataMap | None = None
        self.lkey = 0  # of the MR covering req.chunk
        self.sge_addr = 0  # the chunk's address in its MR (its CPU address for ibv_reg_mr)
        self.responded = False  # queue_response was called
        self.read_done = False
        self.send_done = False
        self.busy = False
        self.recv_reposted = False
        self.wr_count = 0  # send-queue slots this command holds
        self.waiting = False


class Listener:
    """One port's listening CM ID."""

    def __init__(self, transport: RdmaTransport, port: Any) -> None:
        self.port = port
        family = getattr(port, "addr_adrfam", "ipv4") or "ipv4"
        svc = int(getattr(port, "addr_trsvcid", "") or NVME_RDMA_IP_PORT)
        self.cm_id = CmId(transport.channel)
        try:
            self.cm_id.bind(family, port.addr_traddr, svc)
            self.cm_id.listen()
        except NvmetError:
            self.cm_id.close()
            raise

    def close(self) -> None:
        self.cm_id.close()


class RdmaQueue:
    """One NVMe queue: a CM ID, an RC QP + CQ, the receive ring and the response slots."""

    def __init__(self, transport: RdmaTransport, port: Any, cm_id: CmId, dev: Device,
                 creq: CmRequest, *, inline_size: int, max_rd_atomic: int,
                 max_dest_rd_atomic: int) -> None:
        self.transport = transport
        self.port = port
        self.cm_id = cm_id
        self.dev = dev
        self.qid = creq.qid
        self.depth = creq.hsqsize + 1
        self.inline_size = inline_size if creq.qid else 0  # admin queues: no in-capsule data
        self.slot_size = SQE_SIZE + self.inline_size
        self.established = False
        self.dead = False
        self.sq: SQ | None = None
        self.qp: QueuePair | None = None
        self.ring: RegisteredBuffer | None = None
        self.rsp: RegisteredBuffer | None = None
        # A command holds at most 2 send-queue slots (READ, or WRITE + SEND).
        send_depth = min(2 * self.depth + 1, dev.max_qp_wr, transport.max_send_depth)
        ncmds = self.depth + send_depth  # executing + still waiting for SEND completions
        self.event_fd: int | None = None
        self.recv_wrs: list[RecvWR] = []
        self.cmds: list[RdmaCmd] = []
        self.data_wrs: dict[tuple[int, int, int, int], SendWR] = {}
        try:
            self.qp = QueuePair(dev, send_depth=send_depth, recv_depth=self.depth,
                                events=True)
            self.ring = RegisteredBuffer(dev.pd, self.depth * self.slot_size)
            self.rsp = RegisteredBuffer(dev.pd, ncmds * CQE_SIZE)
            self.build_wrs(ncmds)
            self.qp.connect(cm_id, max_rd_atomic=max_rd_atomic,
                            max_dest_rd_atomic=max_dest_rd_atomic)
            for slot in range(self.depth):
                self.post_recv(slot)
            self.event_fd = fd = self.qp.event_fd
            assert fd is not None  # a QP made with events has a completion channel
            transport.loop.add_reader(fd, transport._cq_ready, self)
        except Exception:
            self.close_verbs()
            raise
        self.send_credits = send_depth
        self.reads_in_flight = 0

    # -- verbs helpers ------------------------------------------------------------
    def build_wrs(self, ncmds: int) -> None:
        """The RECV of every ring slot and the response SEND of every command context."""
        assert self.ring is not None and self.rsp is not None
        self.recv_wrs = [recv_wr(_wr_id(_RECV, slot), self.ring.addr + slot * self.slot_size,
                                 self.slot_size, self.ring.lkey)
                         for slot in range(self.depth)]
        self.cmds = [RdmaCmd(i, send_wr(_wr_id(_CMD, i), e.IBV_WR_SEND,
                                        self.rsp.addr + i * CQE_SIZE, CQE_SIZE, self.rsp.lkey,
                                        signaled=True))
                     for i in range(ncmds)]
        self.free_cmds = deque(self.cmds)
        self.inflight: set[RdmaCmd] = set()
        self.wait_read: deque[RdmaCmd] = deque()
        self.wait_send: deque[RdmaCmd] = deque()
        self.data_wrs = {}
        self.pending_wrs: list[SendWR] = []  # send-queue WRs of this pass (RdmaTransport._post)

    def data_wr(self, cmd: RdmaCmd, opcode: int) -> SendWR:
        """The RDMA READ or WRITE moving `cmd`'s chunk to or from the host's buffer."""
        m, addr = cmd.dmap, cmd.sge_addr
        assert m is not None  # only keyed commands move data
        key = (opcode, addr, m.length, cmd.lkey)
        wr = self.data_wrs.get(key)
        if wr is None:
            if len(self.data_wrs) >= DATA_WR_CACHE:
                self.post_pending()  # a queued WR must not be closed before its post
                self.close_data_wrs()
            # A READ reports its own completion; a WRITE is reported by the SEND behind it.
            wr = self.data_wrs[key] = send_wr(0, opcode, addr, m.length, cmd.lkey,
                                              signaled=opcode == e.IBV_WR_RDMA_READ)
        wr.wr_id = _wr_id(_CMD, cmd.index)
        wr.set_wr_rdma(m.key, m.addr)
        return wr

    def close_data_wrs(self) -> None:
        for wr in self.data_wrs.values():
            wr.close()
        self.data_wrs.clear()

    def post_pending(self) -> None:
        """Post the send-queue WRs queued so far (see RdmaTransport._post) as one chain."""
        wrs, self.pending_wrs = self.pending_wrs, []
        if wrs and self.qp is not None and not self.dead:
            self.qp.post_chain(wrs)

    def post_recv(self, slot: int) -> None:
        assert self.qp is not None and self.qp.qp is not None
        self.qp.qp.post_recv(self.recv_wrs[slot])

    def capsule(self, slot: int, length: int) -> memoryview:
        assert self.ring is not None and self.ring.view is not None
        base = slot * self.slot_size
        return self.ring.view[base:base + length]

    def close_verbs(self) -> None:
        """QP first: once it is destroyed the device touches none of our memory."""
        if self.event_fd is not None:
            self.transport.loop.remove_reader(self.event_fd)
            self.event_fd = None
        if self.qp is not None:
            self.qp.to_error()
            self.qp.close()
            self.qp = None
        for buf in (self.ring, self.rsp):
            if buf is not None:
                buf.close()
        self.ring = self.rsp = None
        self.pending_wrs = []
        # After the QP is gone nothing posts any more; each WR is closed exactly once.
        for wr in self.recv_wrs:
            wr.close()
        self.recv_wrs = []
        for cmd in self.cmds:
            if cmd.send_wr is not None:
                cmd.send_wr.close()
                cmd.send_wr = None
        self.close_data_wrs()

    def counts(self) -> dict[str, int]:
        return {"qps": 1 if self.qp is not None else 0,
                "mrs": sum(b is not None for b in (self.ring, self.rsp))}


class RdmaTransport:
    """TransportOps for trtype "rdma" (see nvmet_p2p.core.transport)."""

    trtype = "rdma"
    keyed_sgls = True
    msdbd = 1

    def __init__(self, target: Target, pool: Provider | None = None, *,
                 pool_size: int = DEFAULT_POOL_SIZE, max_send_depth: int = 1 << 16,
                 poll_budget: float = POLL_BUDGET) -> None:
        """`max_send_depth` caps each QP's send queue (tests of back-pressure); at least 2,
        the WRITE + SEND of one read.  `poll_budget`: seconds a queue is polled without
        completions before its CQ is re-armed (0: re-arm as soon as it is empty)."""
        if max_send_depth < 2:
            raise ValueError("max_send_depth must be at least 2 (a read's WRITE + SEND)")
        self.target = target
        self.max_send_depth = max_send_depth
        self.loop = target.loop
        self.pool = pool if pool is not None else SystemMemoryProvider(pool_size,
                                                                       hugepages=False)
        self._own_pool = pool is None
        self.channel: EventChannel | None = None  # opened with the first port
        self.listeners: dict[int, Listener] = {}  # portid -> listener
        self.queues: dict[int, RdmaQueue] = {}  # rdma_cm_id* -> queue
        self.devices: dict[str, Device] = {}
        # (device, id(provider)) -> its MRs, or None and why the device refused them
        self.registrations: dict[tuple[str, int], tuple[PoolRegistration | None, str]] = {}
        self.wait_buffer: deque[tuple[RdmaQueue, RdmaCmd]] = deque()
        self.poll_budget = poll_budget
        self._clock = time.monotonic
        self.polling: dict[RdmaQueue, float] = {}  # the poll group: queue -> last work seen
        self.posting: dict[RdmaQueue, None] = {}  # queues with WRs to post, in order
        self._pass_handle: asyncio.Handle | None = None
        self.stats = {"cq_events": 0, "completions": 0, "buffer_waits": 0,
                      "send_waits": 0, "read_waits": 0, "posts": 0, "posted_wrs": 0}
        target.register_transport(self)

    # -- TransportOps -------------------------------------------------------------
    def add_port(self, port: Any) -> None:
        if port.portid in self.listeners:
            return
        if self.channel is None:
            self.channel = EventChannel()
            self.loop.add_reader(self.channel.fd, self._cm_events)
        self.listeners[port.portid] = Listener(self, port)
        logfmt.info(log, "rdma_listening", portid=port.portid, traddr=port.addr_traddr,
                    trsvcid=port.addr_trsvcid or NVME_RDMA_IP_PORT)

    def remove_port(self, port: Any) -> None:
        lst = self.listeners.pop(port.portid, None)
        if lst is not None:
            lst.close()

    def queue_response(self, req: Request) -> None:
        cmd: RdmaCmd | None = req.priv if isinstance(req.priv, RdmaCmd) else None
        if cmd is None or cmd.req is not req:
            return  # its queue was torn down and the context reused: nothing to send
        cmd.responded = True
        q = req.sq.priv
        if q.dead:
            self._finish(q, cmd)  # executing when the queue died: its buffer goes back now
            return
        self._process(q, cmd)

    def p2p_client(self, port: Any) -> str | None:
        """The RDMA device serving `port`: the DMA client the P2P topology must reach.

        A listener bound to a wildcard address has no device until a host connects; then
        the device is unknown here and the policy says so.
        """
        lst = self.listeners.get(port.portid)
        if lst is None:
            return f"rdma port {port.portid} (not listening)"
        try:
            return lst.cm_id.device_name
        except TransportError:
            return f"rdma port {port.portid} ({port.addr_traddr}: no RDMA device bound)"

    def p2p_can_register(self, provider: Provider) -> str | None:
        """Why a device of ours cannot register `provider`'s memory as an MR, or None."""
        for lst in self.listeners.values():
            try:
                dev = self._device(lst.cm_id.device_name)
            except TransportError:
                continue
            reg, why = self._registration(dev, provider)
            if reg is None:
                return why
        return None

    def delete_ctrl(self, ctrl: Ctrl) -> None:
        for q in [q for q in self.queues.values() if q.sq is not None and q.sq.ctrl is ctrl]:
            self._teardown(q, "controller deleted")

    # -- accounting and shutdown ----------------------------------------------------
    def resources(self) -> dict[str, int]:
        qps = sum(q.counts()["qps"] for q in self.queues.values())
        mrs = sum(q.counts()["mrs"] for q in self.queues.values())
        mrs += sum(len(r.mrs) for r, _ in self.registrations.values() if r is not None)
        return {"qps": qps, "mrs": mrs, "queues": len(self.queues),
                "cm_ids": len(self.queues) + len(self.listeners)}

    def close(self) -> None:
        for q in list(self.queues.values()):
            self._teardown(q, "transport closing")
        self.polling.clear()
        self.posting.clear()
        if self._pass_handle is not None:
            self._pass_handle.cancel()
            self._pass_handle = None
        for portid in list(self.listeners):
            self.listeners.pop(portid).close()
        if self.channel is not None:
            self.loop.remove_reader(self.channel.fd)
            self.channel.close()
            self.channel = None
        for reg, _ in self.registrations.values():
            if reg is not None:
                reg.close()
        self.registrations.clear()
        for dev in self.devices.values():
            dev.close()
        self.devices.clear()
        if self._own_pool:
            self.pool.close()

    # -- CM events ------------------------------------------------------------------
    def _cm_events(self) -> None:
        assert self.channel is not None  # the reader is removed when the channel closes
        while True:
            try:
                ev = self.channel.get_event()
            except TransportError:
                log.exception("%s", logfmt.line("event", "rdma_cm_channel_failed", {}))
                return
            if ev is None:
                return
            try:
                self._cm_event(ev)
            except Exception:  # one bad connection must not stop the listener
                log.exception("%s", logfmt.line("event", "rdma_cm_event_failed", {
                    "cm_event": ev.type.name}))

    def _cm_event(self, ev: CmEvent) -> None:
        if ev.type == CmEventType.CONNECT_REQUEST:
            self._connect_request(ev)
            return
        q = self.queues.get(ev.id)
        if q is None:
            if ev.type == CmEventType.DEVICE_REMOVAL:
                for portid, lst in list(self.listeners.items()):
                    if lst.cm_id.ptr == ev.id:
                        logfmt.error(log, "rdma_device_removed", portid=portid,
                                     reason="device removed, listener closed")
                        del self.listeners[portid]
                        lst.close()
                        self.target.port_down(lst.port, "RDMA device removed")
            return
        if ev.type == CmEventType.ESTABLISHED:
            q.established = True
        elif ev.type in (CmEventType.DISCONNECTED, CmEventType.TIMEWAIT_EXIT,
                         CmEventType.DEVICE_REMOVAL, CmEventType.CONNECT_ERROR,
                         CmEventType.UNREACHABLE, CmEventType.REJECTED,
                         CmEventType.ADDR_CHANGE):
            self._teardown(q, ev.type.name.lower())

    def _device(self, name: str) -> Device:
        dev = self.devices.get(name)
        if dev is None:
            dev = self.devices[name] = Device(name)
        return dev

    def _connect_request(self, ev: CmEvent) -> None:
        cm_id = CmId(ptr=ev.id)
        port = next((lst.port for lst in self.listeners.values()
                     if lst.cm_id.ptr == ev.listen_id), None)
        parsed = parse_cm_request(ev.private_data)
        if isinstance(parsed, CmRequest):
            # CAP.MQES + 1: the port's param_max_queue_size, capped by the core
            max_io = self.target.mqes(port) + 1 if port is not None else 0
            status = check_cm_request(parsed, max_qid=NVMET_NR_QUEUES, max_io_queue_size=max_io)
        else:
            status = parsed
        if port is None:
            status = CmRejectStatus.NO_RESOURCES  # the listener went away meanwhile
        if status:
            request = vars(parsed) if isinstance(parsed, CmRequest) else {}
            logfmt.info(log, "rdma_connect_rejected", status=CmRejectStatus(status).name,
                        request=request)
            self._reject(cm_id, status)
            return
        assert isinstance(parsed, CmRequest)
        try:
            q = self._create_queue(port, cm_id, parsed, ev)
        except NvmetError as err:
            logfmt.warning(log, "rdma_connect_rejected", status="NO_RESOURCES",
                           qid=parsed.qid, reason=err)
            self._reject(cm_id, CmRejectStatus.NO_RESOURCES)
            return
        except Exception:  # a bug must not leave the host waiting for an answer
            log.exception("%s", logfmt.line("event", "rdma_queue_failed", {"qid": parsed.qid}))
            self._reject(cm_id, CmRejectStatus.NO_RESOURCES)
            return
        assert q.qp is not None  # RdmaQueue() made it or raised
        try:
            cm_id.accept(encode_cm_accept(q.depth), q.qp.qp_num,
                         responder_resources=0,  # hosts never RDMA READ from a target
                         initiator_depth=q.qp.max_rd_atomic)
        except TransportError as err:
            logfmt.warning(log, "rdma_accept_failed", qid=q.qid, reason=err)
            self._teardown(q, "accept failed")

    def _reject(self, cm_id: CmId, status: int) -> None:
        try:
            cm_id.reject(encode_cm_reject(status))
        except TransportError as err:
            logfmt.warning(log, "rdma_reject_failed", reason=err)
        cm_id.close()

    def _create_queue(self, port: Any, cm_id: CmId, creq: CmRequest, ev: CmEvent) -> RdmaQueue:
        dev = self._device(cm_id.device_name)
        reg, why = self._registration(dev, self.pool)
        if reg is None:
            raise TransportError(f"the system memory pool cannot be registered: {why}")
        inline = min(self.target.inline_data_size(port), NVMET_RDMA_MAX_INLINE_DATA_SIZE)
        # Our RDMA READs may not exceed what the host offered as responder resources.
        max_rd = min(ev.initiator_depth, dev.max_qp_init_rd_atom)
        q = RdmaQueue(self, port, cm_id, dev, creq, inline_size=inline,
                      max_rd_atomic=max_rd, max_dest_rd_atomic=0)
        try:
            q.sq = self.target.create_sq(port, self, qid=creq.qid, size=q.depth)
        except Exception:
            q.close_verbs()
            raise
        q.sq.priv = q
        self.queues[cm_id.ptr] = q
        log.debug("rdma: qid %d depth %d inline %d max_rd_atomic %d", q.qid, q.depth,
                  q.inline_size, max_rd)
        return q

    def _teardown(self, q: RdmaQueue, why: str) -> None:
        if q.dead:
            return
        q.dead = True
        logfmt.info(log, "rdma_queue_torn_down", qid=q.qid, reason=why)
        self.queues.pop(q.cm_id.ptr, None)
        self.polling.pop(q, None)
        self.posting.pop(q, None)
        q.cm_id.disconnect()
        q.close_verbs()
        for cmd in list(q.inflight):
            if cmd.state is CmdState.EXECUTING and not cmd.responded:
                continue  # the backend still owns req.buf; queue_response frees it
            self._finish(q, cmd)
        self.wait_buffer = deque((wq, c) for wq, c in self.wait_buffer if wq is not q)
        q.cm_id.close()
        if q.sq is not None:
            q.sq.destroy()

    # -- completions ------------------------------------------------------------------
    def _cq_ready(self, q: RdmaQueue) -> None:
        """The queue's completion channel is readable: the queue joins the poll group."""
        if q.dead or q.qp is None or not q.qp.take_event():
            return
        self.stats["cq_events"] += 1
        self.polling[q] = self._clock()
        self._poll_group()

    def _poll_pass(self) -> None:
        """One scheduled pass over the poll group (the loop ran everything else first)."""
        self._pass_handle = None
        self._poll_group()

    def _poll_group(self) -> None:
        """Drain the CQ of every queue in the poll group; re-arm those idle for a budget.

        A queue with commands in flight whose CQ had work stays disarmed and is polled
        again on the next loop pass, after the backend completions and other fds the
        loop has ready: at depth the next capsule usually lands within the budget and
        costs no wake-up (epoll, read of the channel, re-arm).  A queue with nothing in
        flight, or nothing for `poll_budget` seconds, is armed and polled once more (a
        completion landing between the last poll and the arm raised no event) and leaves
        the group; an idle target schedules nothing.  Polling an empty queue is what not
        to do here: the host side (fio, nvme-rdma, rxe) runs on the same two vCPUs, and
        spinning for the next QD1 capsule made QD1 latency 1.7x worse.
        """
        self._flush_posts()  # what the callbacks since the last pass queued
        now = self._clock()
        worked = False
        for q in list(self.polling):
            if q.dead or q.qp is None:
                del self.polling[q]
                continue
            if self._drain(q) and not q.dead:
                self.polling[q] = now
                worked = True
            if q.dead or q.qp is None:
                continue  # torn down while draining: _teardown took it out of the group
            if q.inflight and now - self.polling[q] < self.poll_budget:
                continue
            q.qp.arm()
            if self._drain(q) and not q.dead:
                self.polling[q] = now  # armed too; the event it raises is taken as usual
                worked = True
            else:
                self.polling.pop(q, None)
        self._flush_posts()
        # After work, one more pass even with the group empty: it runs right behind the
        # backend completions this pass caused (call_soon is FIFO) and posts their
        # responses in one chain, instead of the first of them scheduling a pass of its own.
        if (self.polling or worked) and self._pass_handle is None:
            self._pass_handle = self.loop.call_soon(self._poll_pass)

    def _post(self, q: RdmaQueue, wr: SendWR) -> None:
        """Queue a send-queue WR; it goes out with the others of this pass in one post.

        The WRs of one loop pass, in order: those the completions and the backend
        callbacks before the pass produced are posted when it starts, those it produced
        itself when it ends.  Outside a pass (a completion with no queue polling), a pass
        is scheduled: it runs once the callbacks already ready have queued theirs.
        """
        q.pending_wrs.append(wr)
        self.posting[q] = None
        if self._pass_handle is None:
            self._pass_handle = self.loop.call_soon(self._poll_pass)

    def _flush_posts(self) -> None:
        while self.posting:
            q = next(iter(self.posting))
            del self.posting[q]
            if q.pending_wrs:
                self.stats["posts"] += 1
                self.stats["posted_wrs"] += len(q.pending_wrs)
                q.post_pending()

    def _drain(self, q: RdmaQueue) -> int:
        """Poll `q`'s CQ until it is empty; how many completions that handled."""
        total = 0
        while n := self._poll_queue(q):
            total += n
        return total

    def _poll_queue(self, q: RdmaQueue) -> int:
        if q.dead or q.qp is None or q.qp.cq is None:
            return 0
        n, wcs = q.qp.cq.poll(POLL_BATCH)
        for wc in wcs:
            if q.dead:
                break
            self._completion(q, wc)
        self.stats["completions"] += n
        return n

    def _completion(self, q: RdmaQueue, wc: Any) -> None:
        kind, index = wc.wr_id >> 32, wc.wr_id & 0xFFFFFFFF
        ok = wc.status == e.IBV_WC_SUCCESS
        if kind == _RECV:
            if not ok:
                if wc.status != e.IBV_WC_WR_FLUSH_ERR:
                    self._teardown(q, f"receive failed (wc status {wc.status})")
                return
            if wc.byte_len < SQE_SIZE:
                self._teardown(q, f"capsule of {wc.byte_len} bytes is shorter than an SQE")
                return
            if not q.free_cmds:
                self._teardown(q, "more capsules than the queue depth")
                return
            cmd = q.free_cmds.popleft()  # reset when it went back to the free list
            cmd.state = CmdState.NEW
            cmd.slot, cmd.byte_len = index, wc.byte_len
            q.inflight.add(cmd)
            self._process(q, cmd)
            return
        cmd = q.cmds[index]
        if cmd.state is CmdState.TRANSFERRING_HOST_TO_TARGET:
            q.reads_in_flight -= 1
            q.send_credits += cmd.wr_count
            cmd.wr_count = 0
            if ok:
                cmd.read_done = True
                self._process(q, cmd)
            elif cmd.req is not None:
                # A bad rkey or host memory: the QP is in error now; report and leave.
                logfmt.warning(log, "rdma_read_failed", qid=q.qid, wc_status=wc.status)
                cmd.req.complete(Status.DATA_XFER_ERROR | DNR)
                self._teardown(q, "RDMA READ failed")
                return
            self._kick(q)
        elif cmd.state in (CmdState.TRANSFERRING_TARGET_TO_HOST, CmdState.COMPLETING):
            q.send_credits += cmd.wr_count
            cmd.wr_count = 0
            if not ok:
                logfmt.warning(log, "rdma_send_failed", qid=q.qid, wc_status=wc.status)
                self._finish(q, cmd)
                self._teardown(q, "RDMA WRITE/SEND failed")
                return
            cmd.send_done = True
            self._process(q, cmd)
            self._kick(q)

    def _kick(self, q: RdmaQueue) -> None:
        """Resources came back: let the heads of the wait lists move, in order."""
        for waiters in (q.wait_read, q.wait_send):
            while waiters and not q.dead:
                head = waiters[0]
                before = head.state
                self._process(q, head)
                if head.state is before:
                    break

    # -- the command state machine --------------------------------------------------------
    def _process(self, q: RdmaQueue, cmd: RdmaCmd) -> None:
        if cmd.busy:
            return  # re-entered from init()/execute(): the outer loop goes on
        cmd.busy = True
        try:
            while not q.dead:
                step = _STEPS[cmd.state]
                nxt = step(self, q, cmd)
                if nxt is cmd.state:
                    break
                cmd.state = nxt
        finally:
            cmd.busy = False

    def _st_new(self, q: RdmaQueue, cmd: RdmaCmd) -> CmdState:
        assert q.sq is not None  # set right after the queue is made, before any RECV
        req = q.sq.new_request(q.capsule(cmd.slot, cmd.byte_len))
        cmd.req = req
        req.priv = cmd
        if not req.init():
            return CmdState.EXECUTED  # the core completed it already
        assert req.cmd is not None  # init() decoded it
        m = map_sgl(req.cmd.sgl, transfer_len=req.transfer_len,
                    host_write=req.data_dir == DataDir.TO_CTRL, inline_data_size=q.inline_size,
                    capsule_data_len=cmd.byte_len - SQE_SIZE, keyed_sgls=True,
                    max_transfer=self.target.max_transfer)
        if isinstance(m, int):
            req.complete(m)
            return CmdState.EXECUTED
        cmd.dmap = m
        if m.kind == SglKind.INLINE:
            base = SQE_SIZE + m.offset
            req.use_in_capsule_data(q.capsule(cmd.slot, cmd.byte_len)[base:base + m.length])
            return CmdState.READY_TO_EXECUTE
        if m.kind == SglKind.KEYED:
            return CmdState.NEED_BUFFER
        return CmdState.READY_TO_EXECUTE

    def _st_need_buffer(self, q: RdmaQueue, cmd: RdmaCmd) -> CmdState:
        if self.wait_buffer and self.wait_buffer[0][1] is not cmd:
            if not cmd.waiting:
                cmd.waiting = True
                self.wait_buffer.append((q, cmd))
            return CmdState.NEED_BUFFER
        if not self._alloc(q, cmd):
            if not cmd.waiting:
                cmd.waiting = True
                self.stats["buffer_waits"] += 1
                self.wait_buffer.append((q, cmd))
            return CmdState.NEED_BUFFER
        if cmd.waiting:
            cmd.waiting = False
            self.wait_buffer.popleft()
        assert cmd.req is not None
        if cmd.req.data_dir == DataDir.TO_CTRL:
            return CmdState.DATA_TRANSFER_TO_TARGET_PENDING
        return CmdState.READY_TO_EXECUTE

    def _alloc(self, q: RdmaQueue, cmd: RdmaCmd) -> bool:
        """The data buffer through the core (its P2P provider first, else our registered
        pool) and the lkey and SGE address of the MR covering it; False while the pool is
        exhausted."""
        req = cmd.req
        assert req is not None and cmd.dmap is not None  # NEED_BUFFER comes after the map
        if not req.alloc_data_buffer(cmd.dmap.length, self.pool):
            return False
        chunk = req.chunk
        assert chunk is not None  # with a pool, the buffer is always a chunk
        reg, _ = self._registration(q.dev, chunk.provider)
        # The pool's MRs are made before the queue (_create_queue), and the policy chooses
        # a P2P provider only after p2p_can_register() got every listener's device's MRs.
        assert reg is not None, f"{chunk.provider.name} is not registered on {q.dev.name}"
        cmd.lkey, cmd.sge_addr = reg.lkeys[chunk.region], reg.sge_addr(chunk)
        return True

    def _registration(self, dev: Device, provider: Provider,
                      ) -> tuple[PoolRegistration | None, str]:
        """(the device's MRs over `provider`, "") or (None, why it refused them); asked of
        the device once per provider."""
        key = (dev.name, id(provider))
        if key not in self.registrations:
            self.registrations[key] = register_provider(dev.pd, provider, dev.name)
            if self.registrations[key][0] is None:
                logfmt.warning(log, "rdma_mr_refused", device=dev.name,
                               reason=self.registrations[key][1])
        return self.registrations[key]

    def _st_read_pending(self, q: RdmaQueue, cmd: RdmaCmd) -> CmdState:
        assert q.qp is not None and q.qp.qp is not None and cmd.req is not None
        if q.qp.max_rd_atomic == 0:
            cmd.req.complete(Status.DATA_XFER_ERROR | DNR)  # the host offered no READ depth
            return CmdState.EXECUTED
        ready = q.reads_in_flight < q.qp.max_rd_atomic and q.send_credits >= 1
        if not self._my_turn(q.wait_read, cmd, ready, "read_waits"):
            return CmdState.DATA_TRANSFER_TO_TARGET_PENDING
        self._post(q, q.data_wr(cmd, e.IBV_WR_RDMA_READ))
        q.reads_in_flight += 1
        q.send_credits -= 1
        cmd.wr_count = 1
        return CmdState.TRANSFERRING_HOST_TO_TARGET

    def _my_turn(self, line: deque[RdmaCmd], cmd: RdmaCmd, ready: bool, stat: str) -> bool:
        """First come, first served on a queue resource: True when `cmd` may go now (and
        leaves the line); otherwise it waits in line, counted once under `stat`."""
        if (line and line[0] is not cmd) or not ready:
            if not cmd.waiting:
                cmd.waiting = True
                self.stats[stat] += 1
                line.append(cmd)
            return False
        if cmd.waiting:
            cmd.waiting = False
            line.popleft()
        return True

    def _st_reading(self, q: RdmaQueue, cmd: RdmaCmd) -> CmdState:
        return CmdState.READY_TO_EXECUTE if cmd.read_done else cmd.state

    def _st_ready(self, q: RdmaQueue, cmd: RdmaCmd) -> CmdState:
        assert cmd.req is not None
        cmd.req.execute()  # may call queue_response before returning
        return CmdState.EXECUTING

    def _st_executing(self, q: RdmaQueue, cmd: RdmaCmd) -> CmdState:
        if not cmd.responded:
            return CmdState.EXECUTING
        return CmdState.EXECUTED

    def _st_executed(self, q: RdmaQueue, cmd: RdmaCmd) -> CmdState:
        if not cmd.recv_reposted:
            cmd.recv_reposted = True
            q.post_recv(cmd.slot)
        return CmdState.READY_TO_COMPLETE

    def _st_ready_to_complete(self, q: RdmaQueue, cmd: RdmaCmd) -> CmdState:
        req, m, send = cmd.req, cmd.dmap, cmd.send_wr
        assert req is not None and send is not None and q.qp is not None and q.rsp is not None
        rsp = q.rsp.view  # a live queue's verbs objects
        assert rsp is not None
        with_data = (m is not None and m.kind == SglKind.KEYED and req.cqe.status == 0
                     and req.data_dir == DataDir.FROM_CTRL)
        need = 2 if with_data else 1
        if not self._my_turn(q.wait_send, cmd, q.send_credits >= need, "send_waits"):
            return CmdState.READY_TO_COMPLETE
        req.cqe.encode_into(rsp, cmd.index * CQE_SIZE)
        inv = m is not None and m.kind == SglKind.KEYED and m.invalidate
        send.opcode = e.IBV_WR_SEND_WITH_INV if inv else e.IBV_WR_SEND
        send.imm_data = m.key if m is not None and inv else 0  # imm_data is invalidate_rkey's storage
        if with_data:  # the send queue is ordered: the data lands before the completion
            self._post(q, q.data_wr(cmd, e.IBV_WR_RDMA_WRITE))
        self._post(q, send)
        q.send_credits -= need
        cmd.wr_count = need
        return CmdState.TRANSFERRING_TARGET_TO_HOST if with_data else CmdState.COMPLETING

    def _st_sending(self, q: RdmaQueue, cmd: RdmaCmd) -> CmdState:
        return CmdState.COMPLETED if cmd.send_done else cmd.state

    def _st_completed(self, q: RdmaQueue, cmd: RdmaCmd) -> CmdState:
        self._finish(q, cmd)
        return CmdState.COMPLETED

    def _finish(self, q: RdmaQueue, cmd: RdmaCmd) -> None:
        """Return the command's buffer and context; idempotent."""
        if cmd not in q.inflight:
            return
        q.inflight.discard(cmd)
        if cmd.waiting:
            for waiters in (q.wait_read, q.wait_send):
                if cmd in waiters:
                    waiters.remove(cmd)
            self.wait_buffer = deque((wq, c) for wq, c in self.wait_buffer if c is not cmd)
        req = cmd.req
        freed = req is not None and req.chunk is not None
        if req is not None:
            req.free_data_buffer()
            req.priv = None
        cmd.reset()
        q.free_cmds.append(cmd)
        if freed and self.wait_buffer:
            self._kick_buffers()

    def _kick_buffers(self) -> None:
        while self.wait_buffer:
            wq, head = self.wait_buffer[0]
            self._process(wq, head)
            if head.state is CmdState.NEED_BUFFER:
                break


_STEPS = {
    CmdState.NEW: RdmaTransport._st_new,
    CmdState.NEED_BUFFER: RdmaTransport._st_need_buffer,
    CmdState.DATA_TRANSFER_TO_TARGET_PENDING: RdmaTransport._st_read_pending,
    CmdState.TRANSFERRING_HOST_TO_TARGET: RdmaTransport._st_reading,
    CmdState.READY_TO_EXECUTE: RdmaTransport._st_ready,
    CmdState.EXECUTING: RdmaTransport._st_executing,
    CmdState.EXECUTED: RdmaTransport._st_executed,
    CmdState.READY_TO_COMPLETE: RdmaTransport._st_ready_to_complete,
    CmdState.TRANSFERRING_TARGET_TO_HOST: RdmaTransport._st_sending,
    CmdState.COMPLETING: RdmaTransport._st_sending,
    CmdState.COMPLETED: RdmaTransport._st_completed,
}
