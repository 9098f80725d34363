"""RDMA transport logic that needs no RDMA device: CM private data, reject rules,
queue sizing, the librdmacm struct layouts, and the command state machine driven
with fake verbs objects (the real ones are exercised in tests/test_rdma_vm.py)."""

from __future__ import annotations

import asyncio
import ctypes
import struct
from types import SimpleNamespace

import pytest

from nvmet_p2p.core.request import DataDir
from nvmet_p2p.errors import TransportError
from nvmet_p2p.transports import rdma_cm as cm
from nvmet_p2p.wire.command import CQE_SIZE, SQE_SIZE, Cqe, IoOpcode, Psdt, Sgl, SglType, Sqe

pv = pytest.importorskip("pyverbs.enums", reason="pyverbs (python3-pyverbs) is not installed")

from nvmet_p2p import rdma
from nvmet_p2p.cmb import SystemMemoryProvider

# -- private data ---------------------------------------------------------------------------

REQ_GOLDEN = [
    # (recfmt, qid, hrqsize, hsqsize, cntlid), bytes: what the Linux host sends for its
    # admin queue and a 128-entry I/O queue.
    ((0, 0, 32, 31, 0), bytes.fromhex("0000 0000 2000 1f00 0000") + bytes(22)),
    ((0, 3, 128, 127, 0), bytes.fromhex("0000 0300 8000 7f00 0000") + bytes(22)),
    ((0, 1, 16, 15, 0x1234), bytes.fromhex("0000 0100 1000 0f00 3412") + bytes(22)),
]


@pytest.mark.parametrize("fields,raw", REQ_GOLDEN)
def test_cm_request_golden_both_ways(fields, raw):
    assert cm.CmRequest(*fields).encode() == raw
    assert cm.parse_cm_request(raw) == cm.CmRequest(*fields)


def test_cm_request_too_short_every_prefix():
    raw = REQ_GOLDEN[0][1]
    for n in range(cm.CM_REQ_LEN):
        assert cm.parse_cm_request(raw[:n]) is cm.CmRejectStatus.INVALID_LEN
    # longer is fine (RoCE pads the CM private data area to 56 bytes)
    assert cm.parse_cm_request(raw + bytes(24)) == cm.CmRequest(0, 0, 32, 31)


def test_accept_and_reject_encodings():
    assert cm.encode_cm_accept(128) == b"\x00\x00\x80\x00" + bytes(28)
    assert cm.decode_cm_accept(cm.encode_cm_accept(32)) == 32
    assert cm.encode_cm_reject(0x04) == b"\x00\x00\x04\x00"
    assert cm.decode_cm_reject(b"\x00\x00\x06\x00") == 6
    assert cm.decode_cm_reject(b"") is None  # a reject from no target (port not listening)
    assert cm.decode_cm_reject(b"\x01\x00\x06\x00") is None
    with pytest.raises(ValueError):
        cm.decode_cm_accept(b"\0")


def _check(recfmt=0, qid=0, hrqsize=32, hsqsize=31, max_io=128):
    return cm.check_cm_request(cm.CmRequest(recfmt, qid, hrqsize, hsqsize), max_qid=128,
                               max_io_queue_size=max_io)


@pytest.mark.parametrize("kw,status", [
    ({}, 0),
    ({"recfmt": 1}, cm.CmRejectStatus.INVALID_RECFMT),
    ({"qid": 129, "hrqsize": 8, "hsqsize": 7}, cm.CmRejectStatus.INVALID_QID),
    ({"qid": 128, "hrqsize": 8, "hsqsize": 7}, 0),
    ({"hsqsize": 0}, cm.CmRejectStatus.INVALID_HSQSIZE),
    ({"hsqsize": 32}, cm.CmRejectStatus.INVALID_HSQSIZE),  # admin: at most 32 entries
    ({"qid": 1, "hrqsize": 128, "hsqsize": 127}, 0),
    ({"qid": 1, "hrqsize": 128, "hsqsize": 128}, cm.CmRejectStatus.INVALID_HSQSIZE),
    ({"qid": 1, "hrqsize": 64, "hsqsize": 63, "max_io": 64}, 0),
    ({"qid": 1, "hrqsize": 64, "hsqsize": 64, "max_io": 64}, cm.CmRejectStatus.INVALID_HSQSIZE),
    ({"hrqsize": 0}, cm.CmRejectStatus.INVALID_HRQSIZE),
    ({"hrqsize": 33}, cm.CmRejectStatus.INVALID_HRQSIZE),
    ({"recfmt": 1, "hsqsize": 0}, cm.CmRejectStatus.INVALID_RECFMT),  # recfmt checked first
])
def test_reject_rules(kw, status):
    assert _check(**kw) == status


def test_librdmacm_struct_layouts():
    # offsetof()/sizeof() from rdma-core 44's headers, compiled on x86_64
    assert ctypes.sizeof(cm.ConnParamStruct) == 24
    assert cm.ConnParamStruct.qp_num.offset == 16
    assert ctypes.sizeof(cm.CmEventStruct) == 80
    assert cm.CmEventStruct.event.offset == 16 and cm.CmEventStruct.conn.offset == 24
    assert ctypes.sizeof(cm.AhAttrStruct) == 32 and cm.AhAttrStruct.is_global.offset == 29
    assert ctypes.sizeof(cm.QpAttrStruct) == 144
    assert cm.QpAttrStruct.ah_attr.offset == 56
    assert cm.QpAttrStruct.max_rd_atomic.offset == 126
    assert cm.QpAttrStruct.rate_limit.offset == 136


def test_sockaddr_layouts():
    v4 = bytes(cm.sockaddr("ipv4", "192.0.2.1", 4420))[:16]
    assert v4 == struct.pack("<H", 2) + b"\x11\x44" + bytes([192, 0, 2, 1]) + bytes(8)
    v6 = bytes(cm.sockaddr("ipv6", "::1", 4420))[:28]
    assert len(v6) == 28 and v6[2:4] == b"\x11\x44" and v6[23] == 1
    with pytest.raises(TransportError):
        cm.sockaddr("ib", "x", 1)


# -- the command state machine with fake verbs --------------------------------------------

class FakeQP:
    def __init__(self, max_rd_atomic=4):
        self.max_rd_atomic = max_rd_atomic
        self.sends: list = []  # every WR posted, in order
        self.posts: list[list[int]] = []  # the opcodes of each post_chain call
        self.recvs: list[int] = []
        self.qp = self
        self.cq = None

    def post_chain(self, wrs):
        posted = [SimpleNamespace(wr_id=wr.wr_id, opcode=wr.opcode, imm=wr.imm_data)
                  for wr in wrs]
        self.posts.append([w.opcode for w in posted])
        self.sends.extend(posted)

    def post_recv(self, wr):
        self.recvs.append(wr.wr_id)

    def to_error(self):
        pass

    def close(self):
        self.qp = None


class FakeBuf:
    def __init__(self, size):
        self.data = bytearray(size)
        self.view = memoryview(self.data)
        self.addr = 0x10000
        self.lkey = 1

    def close(self):
        pass


class FakeReq:
    def __init__(self, sq, capsule):
        self.sq, self.capsule = sq, capsule
        self.cmd = None
        self.cqe = Cqe()
        self.transfer_len, self.data_dir = 0, DataDir.NONE
        self.buf = self.priv = self.p2p_dev = self.chunk = None
        self.executed = False

    def init(self):
        self.cmd = Sqe.decode(self.capsule)
        self.cqe.cid = self.cmd.cid
        if self.cmd.opcode == 0x7E:  # "bad command": the core fails it inside init
            self.complete(0x4001)
            return False
        nlb = (self.cmd.cdw12 & 0xFFFF) + 1
        self.transfer_len = nlb * 512
        self.data_dir = DataDir.TO_CTRL if self.cmd.opcode == IoOpcode.WRITE else \
            DataDir.FROM_CTRL
        return True

    def execute(self):
        self.executed = True
        if self.data_dir == DataDir.FROM_CTRL:
            self.buf[:] = bytes([self.cmd.cid & 0xFF]) * len(self.buf)
        else:
            self.sq.written.append(bytes(self.buf))
        if self.sq.sync:
            self.complete(0)
        else:
            self.sq.pending.append(self)

    def complete(self, status, result=0):
        self.cqe.status = status
        self.sq.transport.queue_response(self)

    # the core's buffer calls, as core.request.Request without P2P
    def alloc_data_buffer(self, length, pool=None):
        chunk = pool.alloc(length)
        if chunk is None:
            return False
        self.chunk, self.buf = chunk, chunk.view
        return True

    def use_in_capsule_data(self, data):
        self.buf = data

    def free_data_buffer(self):
        chunk, self.chunk, self.buf = self.chunk, None, None
        if chunk is not None:
            chunk.free()


class FakeSQ:
    def __init__(self, transport, sync=True):
        self.transport, self.sync = transport, sync
        self.pending: list = []
        self.written: list = []
        self.destroyed = False
        self.ctrl = None
        self.priv = None

    def new_request(self, capsule):
        return FakeReq(self, bytes(capsule))

    def destroy(self):
        self.destroyed = True


class FakeCmId:
    ptr = 0xABC

    def disconnect(self):
        self.disconnected = True

    def close(self):
        self.closed = True


@pytest.fixture
def env():
    loop = asyncio.new_event_loop()
    pool = SystemMemoryProvider(64 << 10, hugepages=False, slab_size=64 << 10)
    target = SimpleNamespace(loop=loop, max_transfer=1 << 20, mqes=lambda port: 127,
                             register_transport=lambda ops: None)
    t = rdma.RdmaTransport(target, pool=pool)
    reg = SimpleNamespace(lkeys=[7], sge_addr=lambda c: c.addr)
    t._registration = lambda dev, provider: (reg, "")
    yield t, pool
    pool.close()
    loop.close()


def make_queue(t, *, depth=4, inline=4096, max_rd_atomic=4, send_credits=None, sync=True,
               qid=1):
    q = object.__new__(rdma.RdmaQueue)
    q.transport, q.port, q.cm_id, q.dev = t, None, FakeCmId(), SimpleNamespace(name="fake")
    q.qid, q.depth, q.inline_size = qid, depth, inline
    q.slot_size = SQE_SIZE + inline
    q.established = True
    q.dead = False
    q.qp = FakeQP(max_rd_atomic)
    q.ring = FakeBuf(depth * q.slot_size)
    ncmds = depth + 2 * depth + 1
    q.rsp = FakeBuf(ncmds * CQE_SIZE)
    q.send_credits = send_credits if send_credits is not None else 2 * depth + 1
    q.reads_in_flight = 0
    q.event_fd = None
    q.build_wrs(ncmds)
    q.sq = FakeSQ(t, sync)
    q.sq.priv = q
    t.queues[q.cm_id.ptr] = q
    return q


def arrive(t, q, slot, opcode, cid, sgl, payload=b"", nlb=1):
    sqe = Sqe(opcode=opcode, flags=Psdt.SGL_MPTR_CONTIG << 6, cid=cid, nsid=1,
              cdw12=nlb - 1, dptr=sgl.encode())
    capsule = sqe.encode() + payload
    base = slot * q.slot_size
    q.ring.view[base:base + len(capsule)] = capsule
    deliver(t, q, SimpleNamespace(wr_id=slot, status=0, byte_len=len(capsule)))


def deliver(t, q, wc):
    """One completion, then the end of the loop pass: what it queued is posted."""
    t._completion(q, wc)
    t._flush_posts()


def wc_for(q, cmd_index, status=0):
    return SimpleNamespace(wr_id=1 << 32 | cmd_index, status=status, byte_len=0)


def cmd_of(q, cid):
    return next(c for c in q.inflight if c.req is not None and c.req.cmd.cid == cid)


KEYED = SglType.KEYED_DATA_BLOCK


def test_host_write_keyed_walks_every_state(env):
    t, pool = env
    q = make_queue(t)
    avail = pool.counters().get("available")
    arrive(t, q, 0, IoOpcode.WRITE, 5, Sgl(KEYED, 0x9000, 512, 0x77))
    c = cmd_of(q, 5)
    assert c.state is rdma.CmdState.TRANSFERRING_HOST_TO_TARGET
    assert [s.opcode for s in q.qp.sends] == [pv.IBV_WR_RDMA_READ]
    assert q.reads_in_flight == 1 and q.qp.recvs == []
    c.req.chunk.view[:] = b"\x5a" * 512  # what the RDMA READ brought in
    deliver(t, q, wc_for(q, c.index))
    assert c.state is rdma.CmdState.COMPLETING
    assert q.sq.written == [b"\x5a" * 512]
    assert q.qp.recvs == [0]  # the RECV went back when the response was queued
    assert q.qp.sends[-1].opcode == pv.IBV_WR_SEND
    idx = c.index
    rsp = Cqe.decode(bytes(q.rsp.view[idx * CQE_SIZE:(idx + 1) * CQE_SIZE]))
    assert rsp.cid == 5 and rsp.status == 0
    deliver(t, q, wc_for(q, idx))
    assert not q.inflight and len(q.free_cmds) == len(q.cmds)
    assert q.send_credits == 2 * q.depth + 1
    if avail is not None:
        assert pool.counters()["available"] == avail


def test_host_read_keyed_with_invalidate_chains_write_and_send_with_inv(env):
    t, _ = env
    q = make_queue(t)
    arrive(t, q, 1, IoOpcode.READ, 9, Sgl(SglType.KEYED_DATA_BLOCK_INV, 0x9000, 1024, 0x4242),
           nlb=2)
    c = cmd_of(q, 9)
    assert c.state is rdma.CmdState.TRANSFERRING_TARGET_TO_HOST
    # one post: the RDMA WRITE heads the chain; the SEND_WITH_INV follows it
    assert q.qp.posts == [[pv.IBV_WR_RDMA_WRITE, pv.IBV_WR_SEND_WITH_INV]]
    assert c.wr_count == 2 and q.send_credits == 2 * q.depth + 1 - 2
    deliver(t, q, wc_for(q, c.index))
    assert not q.inflight


def test_send_with_inv_carries_rkey_when_no_data(env):
    t, _ = env
    q = make_queue(t)
    arrive(t, q, 0, IoOpcode.WRITE, 3, Sgl(SglType.KEYED_DATA_BLOCK_INV, 0x9000, 512, 0x55))
    c = cmd_of(q, 3)
    deliver(t, q, wc_for(q, c.index))
    send = q.qp.sends[-1]
    assert send.opcode == pv.IBV_WR_SEND_WITH_INV and send.imm == 0x55


def test_inline_data_is_a_slice_of_the_capsule(env):
    t, _ = env
    q = make_queue(t)
    payload = bytes(range(256)) * 4
    arrive(t, q, 2, IoOpcode.WRITE, 4, Sgl(SglType.DATA_BLOCK_OFFSET, 0, 512), payload, nlb=1)
    assert q.sq.written == [payload[:512]]
    assert [s.opcode for s in q.qp.sends] == [pv.IBV_WR_SEND]


def test_sgl_errors_complete_without_data_movement(env):
    t, _ = env
    q = make_queue(t)
    arrive(t, q, 0, IoOpcode.WRITE, 1, Sgl(SglType.DATA_BLOCK_OFFSET, 4095, 512), bytes(512))
    arrive(t, q, 1, IoOpcode.WRITE, 2, Sgl(0x50, 0, 512))
    arrive(t, q, 2, IoOpcode.WRITE, 3, Sgl(KEYED, 0, 2 << 20, 1), nlb=4096)
    statuses = [Cqe.decode(bytes(q.rsp.view[c.index * CQE_SIZE:(c.index + 1) * CQE_SIZE]))
                for c in sorted(q.inflight, key=lambda c: c.req.cmd.cid)]
    assert [s.status & 0x7FF for s in statuses] == [0x16, 0x11, 0x0F]
    assert all(s.opcode == pv.IBV_WR_SEND for s in q.qp.sends)
    assert q.sq.written == []


def test_core_failing_in_init_is_reentrant(env):
    t, _ = env
    q = make_queue(t)
    arrive(t, q, 0, 0x7E, 1, Sgl(KEYED, 0, 0, 0))
    (c,) = q.inflight
    assert c.state is rdma.CmdState.COMPLETING and q.qp.recvs == [0]


def test_send_credits_make_a_burst_wait(env):
    t, _ = env
    q = make_queue(t, send_credits=3)
    for slot, cid in enumerate((1, 2)):
        arrive(t, q, slot, IoOpcode.READ, cid, Sgl(KEYED, 0x9000, 512, 0x10 + cid))
    first, second = cmd_of(q, 1), cmd_of(q, 2)
    assert first.state is rdma.CmdState.TRANSFERRING_TARGET_TO_HOST
    assert second.state is rdma.CmdState.READY_TO_COMPLETE and list(q.wait_send) == [second]
    deliver(t, q, wc_for(q, first.index))
    assert second.state is rdma.CmdState.TRANSFERRING_TARGET_TO_HOST and not q.wait_send


def test_read_depth_limits_outstanding_rdma_reads(env):
    t, _ = env
    q = make_queue(t, max_rd_atomic=1)
    for slot, cid in enumerate((1, 2)):
        arrive(t, q, slot, IoOpcode.WRITE, cid, Sgl(KEYED, 0x9000, 512, 0x20))
    first, second = cmd_of(q, 1), cmd_of(q, 2)
    assert second.state is rdma.CmdState.DATA_TRANSFER_TO_TARGET_PENDING
    assert q.reads_in_flight == 1
    deliver(t, q, wc_for(q, first.index))
    assert second.state is rdma.CmdState.TRANSFERRING_HOST_TO_TARGET


def test_buffer_exhaustion_waits_then_proceeds(env):
    t, _ = env
    q = make_queue(t, sync=False)
    size = 32 << 10  # two of these fill the 64 KiB pool
    for slot, cid in enumerate((1, 2, 3)):
        arrive(t, q, slot, IoOpcode.READ, cid, Sgl(KEYED, 0x9000, size, 0x30), nlb=size // 512)
    third = cmd_of(q, 3)
    assert third.state is rdma.CmdState.NEED_BUFFER and t.stats["buffer_waits"] == 1
    first = cmd_of(q, 1)
    first.req.complete(0)  # the backend finishes the first read
    deliver(t, q, wc_for(q, first.index))
    assert third.state is rdma.CmdState.EXECUTING


def test_teardown_forces_completion_and_returns_buffers(env):
    t, _ = env
    q = make_queue(t, sync=False, send_credits=1)
    arrive(t, q, 0, IoOpcode.READ, 1, Sgl(KEYED, 0x9000, 4096, 0x30), nlb=8)  # executing
    arrive(t, q, 1, IoOpcode.WRITE, 2, Sgl(KEYED, 0x9000, 4096, 0x30), nlb=8)  # reading
    executing, reading = cmd_of(q, 1), cmd_of(q, 2)
    assert executing.state is rdma.CmdState.EXECUTING
    t._teardown(q, "test")
    assert q.dead and q.sq.destroyed and q.cm_id.closed
    assert reading not in q.inflight and executing in q.inflight  # backend still owns it
    executing.req.complete(0)
    assert not q.inflight and len(q.free_cmds) == len(q.cmds)
    assert t.resources()["queues"] == 0


def test_short_capsule_is_fatal(env):
    t, _ = env
    q = make_queue(t)
    t._completion(q, SimpleNamespace(wr_id=0, status=0, byte_len=SQE_SIZE - 1))
    assert q.dead and q.sq.destroyed


def test_rdma_read_error_fails_the_command_and_the_queue(env):
    t, _ = env
    q = make_queue(t)
    arrive(t, q, 0, IoOpcode.WRITE, 1, Sgl(KEYED, 0x9000, 512, 0xBAD))
    c = cmd_of(q, 1)
    req = c.req
    deliver(t, q, wc_for(q, c.index, status=10))  # IBV_WC_REM_ACCESS_ERR
    assert req.cqe.status & 0x7FF == 0x004 and q.dead and not q.inflight
    assert not req.executed


class FakeCQ:
    """Hands out `pending` completions POLL_BATCH at a time, like ibv_poll_cq."""

    def __init__(self, pending):
        self.pending = list(pending)
        self.polls = 0

    def poll(self, n):
        self.polls += 1
        out, self.pending = self.pending[:n], self.pending[n:]
        return len(out), out


def test_cq_event_rearms_first_then_drains_every_batch(env):
    t, _ = env
    t.poll_budget = 0  # re-arm as soon as the CQ is empty
    q = make_queue(t, depth=4)
    order = []
    q.qp.take_event = lambda: order.append("take") or True
    q.qp.arm = lambda: order.append("arm")
    flushed = [SimpleNamespace(wr_id=i % 4, status=rdma.e.IBV_WC_WR_FLUSH_ERR,
                               byte_len=0) for i in range(rdma.POLL_BATCH + 3)]
    q.qp.cq = FakeCQ(flushed)
    orig = t._poll_queue
    t._poll_queue = lambda queue: order.append("poll") or orig(queue)
    t._cq_ready(q)
    # drained first, then armed and polled once more: a completion landing between the
    # last poll and the arm raises no event and would otherwise wait for the next one
    assert order == ["take", "poll", "poll", "poll", "arm", "poll"]
    assert q.qp.cq.pending == [] and t.stats["completions"] == rdma.POLL_BATCH + 3
    assert t.stats["cq_events"] == 1


def test_cq_event_catches_a_completion_landing_before_the_arm(env):
    t, _ = env
    q = make_queue(t)
    cq = q.qp.cq = FakeCQ([])
    arms = []

    def arm():
        arms.append(1)
        if len(arms) == 1:  # lands after the drain, before the CQ was armed: no event
            cq.pending.append(SimpleNamespace(wr_id=0, status=rdma.e.IBV_WC_WR_FLUSH_ERR,
                                              byte_len=0))

    t.poll_budget = 0
    q.qp.take_event, q.qp.arm = (lambda: True), arm
    t._cq_ready(q)
    assert cq.pending == [] and t.stats["completions"] == 1 and len(arms) == 1
    # it had work after the arm: it stays in the poll group for the next pass
    assert q in t.polling and t._pass_handle is not None
    t._pass_handle.cancel()
    t._poll_pass()
    assert len(arms) == 2 and q not in t.polling and t._pass_handle is None


def test_poll_group_keeps_a_busy_queue_disarmed_for_the_budget(env):
    t, _ = env
    now = [100.0]
    t._clock = lambda: now[0]
    q = make_queue(t, sync=False)
    arrive(t, q, 0, IoOpcode.READ, 1, Sgl(KEYED, 0x9000, 512, 0x31))  # in flight: executing
    flushed = SimpleNamespace(wr_id=1, status=rdma.e.IBV_WC_WR_FLUSH_ERR, byte_len=0)
    cq = q.qp.cq = FakeCQ([flushed])
    arms = []
    q.qp.take_event, q.qp.arm = (lambda: True), (lambda: arms.append(now[0]))
    t._cq_ready(q)
    assert t.stats["completions"] == 1 and not arms and q in t.polling
    assert t._pass_handle is not None  # the next pass is scheduled on the loop
    t._pass_handle.cancel()
    now[0] += t.poll_budget / 2
    cq.pending.append(flushed)
    t._poll_pass()  # picked up by polling, no event, no arm
    assert t.stats["completions"] == 2 and t.stats["cq_events"] == 1 and not arms
    now[0] += t.poll_budget * 0.9  # within the budget of the last completion
    t._pass_handle.cancel()
    t._poll_pass()
    assert not arms and q in t.polling
    now[0] += t.poll_budget
    t._pass_handle.cancel()
    t._poll_pass()  # idle for the budget: armed, polled once more, out of the group
    assert arms == [now[0]] and not t.polling and t._pass_handle is None
    polls = cq.polls
    t._poll_pass()
    assert cq.polls == polls and t._pass_handle is None  # an idle target polls nothing


def test_poll_group_rearms_a_queue_with_nothing_in_flight_at_once(env):
    t, _ = env
    q = make_queue(t)
    q.qp.cq = FakeCQ([SimpleNamespace(wr_id=0, status=rdma.e.IBV_WC_WR_FLUSH_ERR,
                                      byte_len=0)])
    arms = []
    q.qp.take_event, q.qp.arm = (lambda: True), (lambda: arms.append(1))
    t._cq_ready(q)  # QD1: the next capsule is far away; the host side needs the CPU
    assert not q.inflight and arms == [1] and not t.polling
    # one pass follows work, to post what the backend completions queue meanwhile
    assert t._pass_handle is not None
    t._pass_handle.cancel()
    t._poll_pass()
    assert arms == [1] and t._pass_handle is None  # nothing more: an idle target sleeps


def test_cq_event_on_a_dead_queue_does_nothing(env):
    t, _ = env
    q = make_queue(t)
    q.qp.take_event = lambda: pytest.fail("a dead queue's CQ is not touched")
    q.dead = True
    t._cq_ready(q)
    assert t.stats["cq_events"] == 0


def test_work_requests_are_reused(env):
    t, _ = env
    q = make_queue(t)
    recv_wrs = list(q.recv_wrs)
    for cid in (1, 2):  # the same chunk comes back from the pool for the second read
        arrive(t, q, 0, IoOpcode.READ, cid, Sgl(KEYED, 0x9000 + cid, 512, 0x40 + cid))
        c = cmd_of(q, cid)
        deliver(t, q, wc_for(q, c.index))
    assert q.recv_wrs == recv_wrs and len(q.data_wrs) == 1
    (wr,) = q.data_wrs.values()
    assert wr.opcode == pv.IBV_WR_RDMA_WRITE and wr.wr_id == 1 << 32 | c.index
    q.close_verbs()
    assert q.recv_wrs == [] and q.data_wrs == {} and all(c.send_wr is None for c in q.cmds)


def test_the_work_requests_of_one_pass_go_out_in_one_post(env):
    t, _ = env
    q = make_queue(t, sync=False)
    for slot, cid in enumerate((1, 2)):  # two capsules in one poll of the CQ
        sqe = Sqe(opcode=IoOpcode.READ, flags=Psdt.SGL_MPTR_CONTIG << 6, cid=cid, nsid=1,
                  dptr=Sgl(KEYED, 0x9000, 512, 0x30 + cid).encode())
        q.ring.view[slot * q.slot_size:slot * q.slot_size + SQE_SIZE] = sqe.encode()
        t._completion(q, SimpleNamespace(wr_id=slot, status=0, byte_len=SQE_SIZE))
    for req in list(q.sq.pending):  # the backend finishes both before the next pass
        req.complete(0)
    assert q.qp.posts == [] and t._pass_handle is not None  # queued; a pass will post them
    t._pass_handle.cancel()
    t._poll_pass()
    write, send = pv.IBV_WR_RDMA_WRITE, pv.IBV_WR_SEND
    assert q.qp.posts == [[write, send, write, send]]
    assert t.stats["posts"] == 1 and t.stats["posted_wrs"] == 4


def test_a_torn_down_queue_posts_nothing_it_had_queued(env):
    t, _ = env
    q = make_queue(t)
    sqe = Sqe(opcode=IoOpcode.READ, flags=Psdt.SGL_MPTR_CONTIG << 6, cid=1, nsid=1,
              dptr=Sgl(KEYED, 0x9000, 512, 0x31).encode())
    q.ring.view[:SQE_SIZE] = sqe.encode()
    t._completion(q, SimpleNamespace(wr_id=0, status=0, byte_len=SQE_SIZE))
    assert q.pending_wrs
    t._teardown(q, "test")
    t._flush_posts()
    assert q.qp is None and not t.posting and not q.inflight


def test_a_reused_work_request_is_unlinked_from_its_last_chain():
    # pyverbs 44 links WRs but cannot unlink them; rdma_verbs clears the link itself
    from nvmet_p2p.transports import rdma_verbs
    assert rdma_verbs._LINK.ok  # the SendWR layout of the installed pyverbs was recognised
    a = rdma_verbs.send_wr(1, pv.IBV_WR_RDMA_WRITE, 0x1000, 512, 1, signaled=False)
    b = rdma_verbs.send_wr(2, pv.IBV_WR_SEND, 0x2000, 16, 1, signaled=True)
    try:
        a.next_wr = b  # (reading next_wr back while it is set fails inside pyverbs)
        link = ctypes.c_void_p.from_address(id(a) + rdma_verbs._LINK.offset)
        assert link.value is not None
        rdma_verbs._LINK.unlink(a)
        assert a.next_wr is None and a.wr_id == 1 and a.opcode == pv.IBV_WR_RDMA_WRITE
    finally:
        a.close()
        b.close()


def test_pyverbs_objects_get_their_loggers_from_a_cache():
    import logging

    import pyverbs.base
    from pyverbs.cq import WC

    from nvmet_p2p.transports import rdma_verbs  # noqa: F401  (installs the cache)
    shim = pyverbs.base.logging
    assert shim is not logging and shim.getLogger("WC") is logging.getLogger("WC")
    assert shim.DEBUG == logging.DEBUG  # everything else is the logging module's
    assert WC(wr_id=5).wr_id == 5
