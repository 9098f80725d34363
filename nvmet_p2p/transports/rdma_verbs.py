"""Verbs resources on pyverbs: device, registered buffers, one RC QP with its CQ.

Every resource is a context manager with an idempotent `close()`; owners close
children first.  Nothing here blocks: QP creation and state changes are quick
commands, `CQ.poll` never sleeps, and a CQ's completion channel is non-blocking and
read only when the reactor saw its fd readable.

The QP is an "external" QP for librdmacm: `connect_qp` walks it INIT -> RTR -> RTS
with the attributes the CM computed (`CmId.init_qp_attr`), overriding only the RDMA
READ depths, which are ours to choose within what the peer offered.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
from typing import Self

import pyverbs.base
import pyverbs.enums as e
from pyverbs.addr import GID, AHAttr, GlobalRoute
from pyverbs.cq import CQ, CompChannel
from pyverbs.device import Context
from pyverbs.mr import MR
from pyverbs.pd import PD
from pyverbs.pyverbs_error import PyverbsError
from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
from pyverbs.wr import SGE, RecvWR, SendWR

from nvmet_p2p.cmb import buffer_address
from nvmet_p2p.errors import TransportError
from nvmet_p2p.transports.rdma_cm import (
    IBV_QPS_ERR,
    IBV_QPS_INIT,
    IBV_QPS_RTR,
    IBV_QPS_RTS,
    CmId,
    QpAttrStruct,
)

log = logging.getLogger("nvmet_p2p.rdma")


class _CachedLoggers:
    """`logging` as pyverbs.base sees it, with getLogger cached per name.

    Every pyverbs object looks up a logger by its class name when it is made, and
    `CQ.poll` makes one WC object per completion: logging.getLogger takes the logging
    module's lock each time, two thirds of what a WC costs (the 4k QD32 profile showed
    it at 3% of the target's time).  getLogger returns the same logger for the same name
    anyway, so a cache changes nothing else.
    """

    def __init__(self) -> None:
        self.getLogger = functools.lru_cache(maxsize=None)(logging.getLogger)

    def __getattr__(self, name: str) -> object:
        return getattr(logging, name)


pyverbs.base.logging = _CachedLoggers()  # type: ignore[attr-defined]

LOCAL_ACCESS = e.IBV_ACCESS_LOCAL_WRITE
REMOTE_ACCESS = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ | e.IBV_ACCESS_REMOTE_WRITE


class Device:
    """An opened RDMA device with one PD: what every queue on it shares."""

    def __init__(self, name: str) -> None:
        self.name = name
        try:
            self.ctx = Context(name=name)
        except Exception as err:  # pyverbs raises its own error types
            raise TransportError(f"cannot open RDMA device {name}: {err}") from err
        self.pd = PD(self.ctx)
        attr = self.ctx.query_device()
        self.max_qp_wr = attr.max_qp_wr
        self.max_cqe = attr.max_cqe
        self.max_qp_rd_atom = attr.max_qp_rd_atom  # RDMA READs we serve (responder)
        self.max_qp_init_rd_atom = attr.max_qp_init_rd_atom  # RDMA READs we issue

    def close(self) -> None:
        if self.pd is not None:
            self.pd.close()
            self.pd = None
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RegisteredBuffer:
    """Page-aligned anonymous memory registered as one MR (a recv ring, a host buffer)."""

    def __init__(self, pd: PD, size: int, access: int = LOCAL_ACCESS) -> None:
        self.size = size
        self._mm: mmap.mmap | None = mmap.mmap(-1, max(size, mmap.PAGESIZE))
        self.addr = buffer_address(self._mm)
        self.view: memoryview | None = memoryview(self._mm)[:size]
        try:
            self.mr: MR | None = MR(pd, size, access, address=self.addr)
        except Exception as err:
            self.close()
            raise TransportError(f"cannot register {size} bytes: {err}") from err
        self.lkey = self.mr.lkey
        self.rkey = self.mr.rkey

    def close(self) -> None:
        mr = getattr(self, "mr", None)  # absent when ibv_reg_mr failed in __init__
        if mr is not None:
            mr.close()
            self.mr = None
        if self.view is not None:
            self.view.release()
            self.view = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a slice handed out is still alive; GC unmaps later
                log.debug("registered buffer still exported at close")
            self._mm = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


EVENT_FD_LINK = "anon_inode:[infinibandevent]"  # what uverbs names a completion channel


def _event_fds() -> set[int]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == EVENT_FD_LINK:
                out.add(int(name))
        except OSError:
            continue  # closed meanwhile (the listing's own fd, a racing close)
    return out


class CompletionChannel:
    """A completion channel for one CQ, with the fd the reactor watches.

    pyverbs 44 does not expose the channel's fd, so it is found as the one uverbs
    event fd that appeared while the channel was created (the reactor thread is the
    only one creating verbs objects).  The fd is made non-blocking: `take_event` runs
    only once the reactor saw it readable and never sleeps inside pyverbs holding the
    GIL.  One channel per CQ because pyverbs' get_cq_event insists on knowing which
    CQ fired.
    """

    def __init__(self, dev: Device) -> None:
        before = _event_fds()
        try:
            self.cc: CompChannel | None = CompChannel(dev.ctx)
        except PyverbsError as err:
            raise TransportError(f"cannot create a completion channel on {dev.name}: {err}") \
                from err
        new = _event_fds() - before
        if len(new) != 1:
            self.close()
            raise TransportError(f"cannot find the completion channel's fd on {dev.name} "
                                 f"(new uverbs event fds: {sorted(new)})")
        self.fd = new.pop()
        os.set_blocking(self.fd, False)

    def take_event(self, cq: CQ) -> bool:
        """Consume and acknowledge `cq`'s pending event; False when there was none."""
        assert self.cc is not None
        try:
            self.cc.get_cq_event(cq)
        except PyverbsError:
            return False  # EAGAIN: a wake-up without an event
        cq.ack_events(1)  # unacknowledged events would make destroying the CQ hang
        return True

    def close(self) -> None:
        if self.cc is not None:
            self.cc.close()
            self.cc = None


class QueuePair:
    """One RC QP and the single CQ that takes both its send and receive completions.

    With `events`, the CQ has its own completion channel (`event_fd`) and starts armed.
    The owner watches the fd; when it is readable: `take_event()`, poll the CQ until it
    is empty, `arm()`, and poll once more (a completion that landed between the last
    poll and the arm raised no event).
    """

    def __init__(self, dev: Device, *, send_depth: int, recv_depth: int,
                 max_send_sge: int = 1, events: bool = False) -> None:
        self.send_depth = send_depth
        self.recv_depth = recv_depth
        self.channel = CompletionChannel(dev) if events else None
        cc = self.channel.cc if self.channel is not None else None
        try:
            self.cq: CQ | None = CQ(dev.ctx, send_depth + recv_depth, None, cc, 0)
        except PyverbsError as err:
            self._close_channel()
            raise TransportError(f"cannot create a CQ of {send_depth + recv_depth}: {err}") \
                from err
        try:
            cap = QPCap(max_send_wr=send_depth, max_recv_wr=recv_depth,
                        max_send_sge=max_send_sge, max_recv_sge=1)
            init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap,
                              sq_sig_all=0)
            self.qp: QP | None = QP(dev.pd, init)
        except Exception as err:
            self.cq.close()
            self.cq = None
            self._close_channel()
            raise TransportError(f"cannot create a QP ({send_depth}/{recv_depth}): {err}") \
                from err
        self.qp_num = self.qp.qp_num
        self.max_rd_atomic = 0  # RDMA READs this QP may have outstanding (set by connect_qp)
        if self.channel is not None:
            self.cq.req_notify()

    @property
    def event_fd(self) -> int | None:
        return self.channel.fd if self.channel is not None else None

    def take_event(self) -> bool:
        """Consume the CQ's pending event (it is disarmed now); False if there was none."""
        assert self.channel is not None and self.cq is not None
        return self.channel.take_event(self.cq)

    def arm(self) -> None:
        """Ask for an event on the next completion."""
        assert self.cq is not None
        self.cq.req_notify()

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def connect(self, cm_id: CmId, *, max_rd_atomic: int, max_dest_rd_atomic: int) -> None:
        """INIT -> RTR -> RTS with the CM's path and PSNs (the passive side, before accept)."""
        self.to_init(cm_id)
        self.to_rts(cm_id, max_rd_atomic=max_rd_atomic, max_dest_rd_atomic=max_dest_rd_atomic)

    def to_init(self, cm_id: CmId, *, remote_access: bool = False) -> None:
        """RESET -> INIT: RECVs can be posted from here on.

        `remote_access`: let the peer RDMA READ/WRITE through this QP (a host exposing
        its buffers).  Before rdma_connect the CM does not know our responder resources
        yet and would grant remote writes only.
        """
        assert self.qp is not None
        cattr, mask = cm_id.init_qp_attr(IBV_QPS_INIT)
        if remote_access:
            cattr.qp_access_flags |= e.IBV_ACCESS_REMOTE_READ | e.IBV_ACCESS_REMOTE_WRITE
        self.qp.modify(to_qp_attr(cattr), mask)

    def to_rts(self, cm_id: CmId, *, max_rd_atomic: int, max_dest_rd_atomic: int) -> None:
        """INIT -> RTR -> RTS; the READ depths are the ones we announced to the peer."""
        assert self.qp is not None
        cattr, mask = cm_id.init_qp_attr(IBV_QPS_RTR)
        cattr.max_dest_rd_atomic = max_dest_rd_atomic
        self.qp.modify(to_qp_attr(cattr), mask)
        cattr, mask = cm_id.init_qp_attr(IBV_QPS_RTS)
        cattr.max_rd_atomic = max_rd_atomic
        self.qp.modify(to_qp_attr(cattr), mask)
        self.max_rd_atomic = max_rd_atomic

    def post_chain(self, wrs: list[SendWR]) -> None:
        """Post `wrs` in order; linked into one ibv_post_send when the layout allows.

        On rxe every ibv_post_send is a write(2) to the device (its doorbell) however
        many WRs it carries, so the responses and RDMA READs/WRITEs one loop pass
        produces go out as one chain (SPDK batches the same way).
        """
        assert self.qp is not None
        if not wrs:
            return
        if not _LINK.ok:
            for wr in wrs:
                self.qp.post_send(wr)
            return
        last = len(wrs) - 1
        for i in range(last):
            wrs[i].next_wr = wrs[i + 1]
        _LINK.unlink(wrs[last])  # a reused WR still points at whatever followed it last time
        self.qp.post_send(wrs[0])

    def to_error(self) -> None:
        """Flush every posted WR (they complete with IBV_WC_WR_FLUSH_ERR)."""
        if self.qp is not None:
            attr = QPAttr()
            attr.qp_state = IBV_QPS_ERR
            try:
                self.qp.modify(attr, e.IBV_QP_STATE)
            except PyverbsError as err:
                log.debug("QP %d to ERR: %s", self.qp_num, err)

    def close(self) -> None:
        if self.qp is not None:
            self.qp.close()
            self.qp = None
        if self.cq is not None:
            self.cq.close()
            self.cq = None
        self._close_channel()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def recv_wr(wr_id: int, addr: int, length: int, lkey: int) -> RecvWR:
    """A one-SGE RECV work request; its owner must `close()` it exactly once.

    pyverbs 44 frees the memory behind a WR or an SGE only in `close()` (the
    deallocator is misspelled `__dealloc`), so every WR built and dropped leaks its
    scatter list.  We build WRs once, reuse them, and close the SGE after the WR has
    copied it.
    """
    sge = SGE(addr, length, lkey)
    try:
        return RecvWR(wr_id=wr_id, num_sge=1, sg=[sge])
    finally:
        sge.close()


def send_wr(wr_id: int, opcode: int, addr: int, length: int, lkey: int, *,
            signaled: bool) -> SendWR:
    """A one-SGE send-queue work request (SEND, RDMA READ/WRITE); see `recv_wr`."""
    sge = SGE(addr, length, lkey)
    try:
        return SendWR(wr_id=wr_id, opcode=opcode, num_sge=1, sg=[sge],
                      send_flags=e.IBV_SEND_SIGNALED if signaled else 0)
    finally:
        sge.close()


class _WrLink:
    """Clears a SendWR's `next` link, which pyverbs 44 can set but not unset.

    The setter refuses None and a WR built once and reused keeps its old link, so a
    chain's last WR would carry on into a stale one.  Where `ibv_send_wr` sits inside the
    SendWR object is found once, by linking two WRs and looking for the pointer in the
    first (checked against its wr_id and opcode); if it is not found, `ok` is False and
    every WR is posted on its own.
    """

    def __init__(self) -> None:
        self.offset = -1  # of ibv_send_wr.next inside the SendWR object
        a = send_wr(0x5EED_0F_C4A1_4E5D, e.IBV_WR_RDMA_WRITE, 0x1000, 16, 1, signaled=False)
        b = send_wr(2, e.IBV_WR_SEND, 0x2000, 16, 1, signaled=True)
        try:
            a.next_wr = b
            size = type(a).__basicsize__
            raw = ctypes.string_at(id(a), size)
            for off in range(8, size - 7, 8):
                wr = int.from_bytes(raw[off:off + 8], "little") - id(b)  # b's ibv_send_wr
                if off != wr + 8 or not 0 <= wr <= size - 32:
                    continue  # next follows wr_id (u64); then sg_list, num_sge, opcode
                if int.from_bytes(raw[wr:wr + 8], "little") == a.wr_id and \
                        int.from_bytes(raw[wr + 28:wr + 32], "little") == a.opcode:
                    self.offset = off
                    break
        finally:
            a.close()
            b.close()

    @property
    def ok(self) -> bool:
        return self.offset >= 0

    def unlink(self, wr: SendWR) -> None:
        ctypes.c_void_p.from_address(id(wr) + self.offset).value = None


def _gid_text(raw: bytes) -> str:
    h = raw.hex()
    return ":".join(h[i:i + 4] for i in range(0, 32, 4))


def to_qp_attr(c: QpAttrStruct) -> QPAttr:
    """pyverbs QPAttr from the ctypes ibv_qp_attr librdmacm filled in."""
    a = QPAttr()
    for name in ("qp_state", "cur_qp_state", "path_mtu", "qkey", "rq_psn", "sq_psn",
                 "dest_qp_num", "qp_access_flags", "pkey_index", "max_rd_atomic",
                 "max_dest_rd_atomic", "min_rnr_timer", "port_num", "timeout", "retry_cnt",
                 "rnr_retry"):
        setattr(a, name, getattr(c, name))
    ah = c.ah_attr
    gid = GID()
    gid.gid = _gid_text(bytes(ah.grh.dgid))
    gr = GlobalRoute(dgid=gid, flow_label=ah.grh.flow_label, sgid_index=ah.grh.sgid_index,
                     hop_limit=ah.grh.hop_limit, traffic_class=ah.grh.traffic_class)
    a.ah_attr = AHAttr(dlid=ah.dlid, sl=ah.sl, src_path_bits=ah.src_path_bits,
                       static_rate=ah.static_rate, is_global=ah.is_global,
                       port_num=ah.port_num, gr=gr)
    return a


_LINK = _WrLink()
