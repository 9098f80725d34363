"""Property test over (controller/queue state x raw command), over the loop transport.

A Hypothesis state machine puts a host's admin and I/O queue into a state
(unconnected, connected but not enabled, enabled, shut down; I/O or discovery
subsystem) and sends random raw capsules: any opcode, flags, NSID, command dwords,
SGL type, length and key, in-capsule data.  Random Property Sets and Connects move
the state on too.  For every command:

* exactly one completion arrives, for its CID on its queue (an accepted Asynchronous
  Event Request may stay outstanding: at most 4 of them);
* its status is one the spec allows for the state the queue was in, and exactly the
  one REFERENCE.md §3 names where it names one;
* the target never raises and never logs an error (no Internal Error from a bug).

Afterwards a verified write and read still work, and nothing leaked.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nvmet_p2p.host.loop import LoopHost, LoopQueue
from nvmet_p2p.wire.command import Cqe, Sgl, Sqe
from nvmet_p2p.wire.limits import NVME_DISC_SUBSYS_NAME
from tests.support.loop_env import SUBNQN, LoopEnv

DNR = 0x4000
NS_SIZE = 1 << 20
NBLOCKS = NS_SIZE // 512
UNCONNECTED, CONNECTED, ENABLED, SHUTDOWN = "unconnected", "connected", "enabled", "shutdown"
NO_CQE = -1  # an accepted AER: no completion yet

SGL_ERRORS = {0x002 | DNR, 0x00F | DNR, 0x011 | DNR, 0x016 | DNR, 0x004 | DNR}
CONNECT_STATUSES = {0, 0x00C | DNR, 0x180 | DNR, 0x181 | DNR, 0x182 | DNR,
                    0x184 | DNR} | SGL_ERRORS
ADMIN_OPS = {0x02, 0x06, 0x08, 0x09, 0x0A, 0x0C, 0x18}
DISC_ADMIN_OPS = {0x02, 0x06, 0x09, 0x0A, 0x0C, 0x18}
ADMIN_STATUSES = {0, 0x002 | DNR, 0x00B | DNR, 0x00C | DNR, 0x10D | DNR,
                  0x105 | DNR} | SGL_ERRORS
IO_OPS = {0x00, 0x01, 0x02, 0x08, 0x09}
IO_STATUSES = {0, 0x080 | DNR} | SGL_ERRORS

u32 = st.integers(0, 0xFFFFFFFF)
dword = st.one_of(st.just(0), st.integers(0, 16), st.integers(NBLOCKS - 8, NBLOCKS + 8), u32)
CC_EN = 1 | 6 << 16 | 4 << 20  # enable with 64-byte SQEs and 16-byte CQEs
STATES = st.sampled_from([UNCONNECTED, CONNECTED, ENABLED, ENABLED, ENABLED, SHUTDOWN])
DISC = st.sampled_from([False, False, False, True])


@st.composite
def commands(draw: st.DrawFn) -> tuple[Sqe, Sgl | str, bytes, int]:
    """(SQE, data pointer, in-capsule data, length).  The data pointer is an Sgl as
    drawn, or "fit" (keyed to a registered buffer of the command's own transfer
    length), "fit-inline" (that length in the capsule) or "registered" (a registered
    buffer of `length`)."""
    known = sorted(ADMIN_OPS | IO_OPS | {0x7F, 0x05, 0x80})
    opcode = draw(st.sampled_from(known) if draw(st.integers(0, 9)) < 8 else st.integers(0, 255))
    # mostly well-formed flags and NSID 1, so commands get past the first checks
    flags = 0x40 if draw(st.integers(0, 9)) < 8 else draw(st.integers(0, 255))
    nsid = 1 if draw(st.integers(0, 9)) < 6 else draw(st.sampled_from([0, 2, 0xFFFFFFFF]) | u32)
    cdw = [draw(dword) if draw(st.integers(0, 9)) < 7 else 0 for _ in range(6)]
    if opcode == 0x7F and draw(st.booleans()):  # a well-formed Property Get / Set
        nsid = draw(st.sampled_from([0x00, 0x04]))
        cdw[0] = draw(st.sampled_from([0, 1]))
        cdw[1] = draw(st.sampled_from([0x00, 0x08, 0x14, 0x1C]))
        cdw[2] = draw(st.sampled_from([0, CC_EN, CC_EN | 1 << 14, 1, 1 << 14]))
        cdw[3] = 0
    sqe = Sqe(opcode=opcode, flags=flags, nsid=nsid, cdw10=cdw[0], cdw11=cdw[1],
              cdw12=cdw[2], cdw13=cdw[3], cdw14=cdw[4], cdw15=cdw[5])
    length = draw(st.one_of(st.sampled_from([0, 512, 1024, 4096]),
                            st.integers(0, (1 << 20) + 512)))
    kind = draw(st.sampled_from(["fit"] * 4 + ["fit-inline", "registered", "keyed", "inline",
                                               "other"]))
    payload = b""
    sgl: Sgl | str = kind
    if kind == "keyed":  # a key nobody registered
        sgl = Sgl(draw(st.sampled_from([0x40, 0x4F])), draw(u32), length, draw(u32))
    elif kind == "inline":
        offset = draw(st.one_of(st.sampled_from([0, 4095, 8192, (1 << 64) - 512]),
                                st.integers(0, (1 << 64) - 1)))
        sgl = Sgl(0x01, offset, min(length, 0xFFFFFFFF))
        payload = bytes(draw(st.sampled_from([0, 512, 1024, 4096, 5000])))
    elif kind == "other":
        sgl = Sgl(draw(st.integers(0, 255)), draw(u32), draw(st.integers(0, (1 << 24) - 1)))
    return sqe, sgl, payload, length


def transfer_len(sqe: Sqe, admin: bool) -> int:
    """The data length a well-formed command of this kind moves (0 if none or unknown)."""
    op = sqe.opcode
    if op == 0x7F:
        return 1024 if sqe.nsid & 0xFF == 0x01 else 0
    if admin:
        if op == 0x06:
            return 4096
        if op == 0x02:
            return ((sqe.cdw10 >> 16 | (sqe.cdw11 & 0xFFFF) << 16) + 1) * 4
        return 0
    if op in (0x01, 0x02):
        return ((sqe.cdw12 & 0xFFFF) + 1) * 512
    return ((sqe.cdw10 & 0xFF) + 1) * 16 if op == 0x09 else 0


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory()
        self.env = LoopEnv(Path(self._tmp.name))
        self.env.port(inline_data_size=4096)
        self.env.add_subsystem(namespaces={1: "memory"}, ns_size=NS_SIZE)
        self.errors: list[logging.LogRecord] = []
        self._handler = _Collect(self.errors)
        logging.getLogger("nvmet_p2p").addHandler(self._handler)
        self.host: LoopHost | None = None
        self.admin: LoopQueue | None = None
        self.io: LoopQueue | None = None
        self.cqes: dict[int, list[Cqe]] = {}
        self.aers = 0
        self.cid = 0

    # -- building a state ------------------------------------------------------------
    def _watch(self, q: LoopQueue) -> LoopQueue:
        seen = self.cqes.setdefault(id(q), [])
        orig = q.conn.on_cqe

        def on_cqe(raw: bytes) -> None:
            seen.append(Cqe.decode(raw))
            orig(raw)
        q.conn.on_cqe = on_cqe
        return q

    def _drop(self) -> None:
        for q in (self.admin, self.io):
            if q is not None:
                q.close()
        if self.host is not None:
            self.host.disconnect()
        self.cqes.clear()
        self.aers = 0

    @initialize(state=STATES, disc=DISC)
    def start(self, state: str, disc: bool) -> None:
        self.reset(state, disc)

    @rule(state=STATES, disc=DISC)
    def reset(self, state: str, disc: bool) -> None:
        self._drop()
        nqn = NVME_DISC_SUBSYS_NAME if disc else SUBNQN
        h = self.host = self.env.host()
        if state == UNCONNECTED:
            self.admin = h.open_queue(0, 32)
        else:
            h.connect(nqn, enable=False)
            self.admin = h.admin
            if state in (ENABLED, SHUTDOWN):
                h.enable()
                if not disc:
                    q = h.open_queue(1, 32)
                    h.connect_queue(q, nqn, h.cntlid)
                    h.io[1] = q
            if state == SHUTDOWN:
                h.shutdown()
        self.io = h.io.get(1) or h.open_queue(1, 32)
        self._watch(self.admin)
        self._watch(self.io)

    # -- what the spec allows ----------------------------------------------------------
    def _state(self, q: LoopQueue) -> str:
        ctrl = q.conn.sq.ctrl
        if ctrl is None:
            return UNCONNECTED
        if ctrl.ready:
            return ENABLED
        return SHUTDOWN if ctrl.csts & 0xC else CONNECTED

    def _allowed(self, q: LoopQueue, sqe: Sqe) -> set[int]:
        if sqe.flags & 0x3 or sqe.flags & 0xC0 != 0x40:
            return {0x002 | DNR}  # fused / PRP: refused first, in any state
        state = self._state(q)
        fabrics = sqe.opcode == 0x7F
        if state == UNCONNECTED:
            return CONNECT_STATUSES if fabrics and sqe.nsid & 0xFF == 0x01 else {0x00C | DNR}
        ctrl = q.conn.sq.ctrl
        if q.conn.sq.qid == 0:
            if fabrics:
                return {0, 0x002 | DNR} | SGL_ERRORS if sqe.nsid & 0xFF in (0, 4) \
                    else {0x001 | DNR}
            if state != ENABLED:
                return {0x00C | DNR}
            ops = DISC_ADMIN_OPS if ctrl.subsys.is_discovery else ADMIN_OPS
            if sqe.opcode not in ops:
                return {0x001 | DNR}
            return ADMIN_STATUSES | ({NO_CQE} if sqe.opcode == 0x0C else set())
        if state != ENABLED:
            return {0x00C | DNR}
        if fabrics:
            return {0x001 | DNR}
        if sqe.nsid not in ctrl.subsys.ns:
            return {0x00B | DNR}
        if sqe.opcode not in IO_OPS:
            return {0x001 | DNR}
        if sqe.opcode in (0x01, 0x02, 0x08):
            slba, nlb = sqe.cdw10 | sqe.cdw11 << 32, (sqe.cdw12 & 0xFFFF) + 1
            if slba + nlb > NBLOCKS:
                return {0x080 | DNR}
        return IO_STATUSES

    # -- the rule under test -------------------------------------------------------------
    @precondition(lambda self: self.admin is not None and self.admin.connected)
    @rule(cmd=commands(), on_io=st.booleans())
    def send(self, cmd: tuple[Sqe, Sgl | str, bytes, int], on_io: bool) -> None:
        sqe, sgl, payload, length = cmd
        q = self.io if on_io else self.admin
        if not q.connected:
            return
        self.cid = (self.cid + 1) & 0xFFFF
        sqe.cid = self.cid
        key = None
        if isinstance(sgl, str):
            if sgl.startswith("fit"):
                length = min(transfer_len(sqe, q.conn.sq.qid == 0), 1 << 21)
            if sgl == "fit-inline" and length <= 4096:
                sgl, payload = Sgl(0x01, 0, length), bytes(length)
            else:
                key = self.host.mem.register(bytearray(max(length, 1)))
                sgl = Sgl(0x40, 0, length, key)
        sqe.dptr = sgl.encode()
        allowed = self._allowed(q, sqe)
        seen = self.cqes[id(q)]
        before = len(seen)
        q.conn.submit(sqe.encode() + payload)  # must not raise
        self.env.pump()
        if key is not None:
            self.host.mem.deregister(key)
        new = seen[before:]
        if not new:
            assert NO_CQE in allowed, f"no completion for {sqe}"
            self.aers += 1
            assert self.aers <= 4, "more than 4 AERs held"
            return
        assert len(new) == 1, f"{len(new)} completions for one command: {new}"
        cqe = new[0]
        assert (cqe.cid, cqe.sq_id) == (sqe.cid, q.conn.sq.qid), cqe
        assert cqe.status in allowed, (
            f"status {cqe.status:#06x} not in {sorted(hex(s) for s in allowed)} for {sqe}, "
            f"sgl {sgl}, {len(payload)} bytes in capsule, queue state {self._state(q)}")
        if cqe.status == 0x105 | DNR:
            assert self.aers == 4, f"AER limit hit with {self.aers} outstanding"

    @invariant()
    def nothing_broke(self) -> None:
        assert not self.errors, [r.getMessage() for r in self.errors]
        ns = self.env.ns(1)
        assert ns is not None and ns.inflight == 0

    def teardown(self) -> None:
        try:
            if self.host is not None and self.io is not None and self.io.connected \
                    and self._state(self.io) == ENABLED:
                _verify(self.host)
            self._drop()
            fresh = self.env.connect()
            _verify(fresh)
            fresh.disconnect()
            assert not self.errors, [r.getMessage() for r in self.errors]
        finally:
            logging.getLogger("nvmet_p2p").removeHandler(self._handler)
            leaks = self.env.close()
            self._tmp.cleanup()
        assert not leaks, leaks


class _Collect(logging.Handler):
    def __init__(self, out: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record)


def _verify(h: LoopHost) -> None:
    data = bytes(range(256)) * 8
    h.write(1, 100, data)
    assert h.read(1, 100, 4) == data


CoreMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
test_core_state_machine = CoreMachine.TestCase
