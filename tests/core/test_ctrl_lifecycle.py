"""The controller lifecycle table, property-tested over (state, input) pairs.

Inputs are Property Set CC writes (well-formed and random) and keep-alive expiry, sent
by a host over the loop transport in any order.  After each one:

* the controller is in a state of `CtrlState` and its CC/CSTS are exactly what the
  kernel's nvmet_update_cc() / nvmet_start_ctrl() / nvmet_clear_ctrl() make of the same
  writes (a register-level model below, written from drivers/nvme/target/core.c);
* the state agrees with the registers, and the host gets the right NVMe status: the
  Property Set succeeds, Keep Alive and I/O succeed when READY and are Command Sequence
  Error otherwise.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvmet_p2p.core.ctrl import TRANSITIONS, CcEvent, CtrlState
from nvmet_p2p.wire.command import AdminOpcode, FabricsType, IoOpcode, Sqe, fabrics_sqe
from nvmet_p2p.wire.regs import REG_CC
from tests.support.loop_env import SUBNQN, LoopEnv

DNR = 0x4000
CMD_SEQ_ERROR = 0x00C | DNR
EN, SHN_NORMAL, SHN_ABRUPT = 1, 1 << 14, 2 << 14
GOOD = EN | 6 << 16 | 4 << 20  # 64-byte SQEs, 16-byte CQEs
RDY, CFS, SHST_CMPLT = 1, 2, 2 << 2

cc_writes = st.one_of(
    st.sampled_from([0, GOOD, GOOD | SHN_NORMAL, GOOD | SHN_ABRUPT, SHN_NORMAL, SHN_ABRUPT,
                     EN, GOOD | 1 << 7, GOOD | 1 << 11, GOOD | 1 << 4]),
    st.integers(0, 0xFFFFFFFF))
inputs = st.lists(st.one_of(cc_writes, st.just("kato")), min_size=1, max_size=10)


def kernel_update_cc(cc: int, csts: int, new: int) -> tuple[int, int]:
    """nvmet_update_cc() on (ctrl->cc, ctrl->csts), for an I/O controller."""
    old, cc = cc, new

    def start(cc: int) -> int:
        ok = (cc >> 16) & 0xF == 6 and (cc >> 20) & 0xF == 4 and not (cc >> 7) & 0xF \
            and not (cc >> 11) & 0x7 and not (cc >> 4) & 0x7
        return RDY if ok else CFS

    if new & EN and not old & EN:
        csts = start(cc)
    if not new & EN and old & EN:
        csts, cc = csts & ~RDY, 0
    if new & (3 << 14) and not old & (3 << 14):
        csts, cc = (csts & ~RDY) | SHST_CMPLT, 0
    if not new & (3 << 14) and old & (3 << 14):
        csts &= ~SHST_CMPLT
    return cc, csts


def check_consistent(ctrl) -> None:
    s = ctrl.state
    assert isinstance(s, CtrlState)
    if s is CtrlState.READY:
        assert ctrl.csts & RDY and ctrl.cc & EN
    if s is CtrlState.CONNECTED:
        assert not ctrl.csts & RDY and not ctrl.cc & EN
    if s is CtrlState.CONFIG_FATAL:
        assert ctrl.csts == CFS and ctrl.cc & EN
    if s is CtrlState.SHUT_DOWN:
        assert ctrl.csts & SHST_CMPLT and not ctrl.csts & RDY and not ctrl.cc & EN
    if s is CtrlState.FATAL:
        assert ctrl.csts & CFS and ctrl.dead


def test_every_pair_in_the_table_is_a_state() -> None:
    for (state, event), nxt in TRANSITIONS.items():
        assert isinstance(state, CtrlState) and isinstance(event, CcEvent)
        assert isinstance(nxt, CtrlState)
    assert not any(s is CtrlState.FATAL for s, _ in TRANSITIONS)  # FATAL takes nothing
    # every live state can reach FATAL (keep-alive expiry) and be shut down
    live = set(CtrlState) - {CtrlState.FATAL}
    assert {s for s, e in TRANSITIONS if e is CcEvent.FATAL} == live
    assert {s for s, e in TRANSITIONS if e is CcEvent.SHUTDOWN} == live


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(inputs)
def test_lifecycle_matches_the_kernel_registers(seq: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = LoopEnv(Path(tmp))
        try:
            env.port()
            env.add_subsystem()
            h = env.connect(enable=False, kato_ms=5000)
            ctrl = env.target.get_subsys(SUBNQN).ctrls[h.cntlid]
            io = h.open_queue(1, 32)
            cc, csts = 0, 0
            for item in seq:
                if item == "kato":
                    env.clock.advance(6)
                    env.target.tick()
                    assert ctrl.state is CtrlState.FATAL
                    check_consistent(ctrl)
                    assert not h.admin.connected
                    break
                cqe, _ = h.admin.execute(fabrics_sqe(FabricsType.PROPERTY_SET, attrib=0,
                                                     offset=REG_CC, value=item))
                assert cqe.status == 0
                cc, csts = kernel_update_cc(cc, csts, item)
                assert (ctrl.cc, ctrl.csts) == (cc, csts), (hex(item), ctrl.state)
                check_consistent(ctrl)
                ka, _ = h.admin_cmd(AdminOpcode.KEEP_ALIVE, check=False)
                assert ka.status == (0 if ctrl.ready else CMD_SEQ_ERROR)
                if ctrl.ready and 1 not in h.io:
                    h.connect_queue(io, SUBNQN, h.cntlid)
                    h.io[1] = io
                if 1 in h.io and io.connected:
                    rd, _ = io.execute(Sqe(opcode=IoOpcode.READ, nsid=1), read_len=512)
                    assert rd.status == (0 if ctrl.ready else CMD_SEQ_ERROR)
            h.disconnect()
            io.close()
        finally:
            leaks = env.close()
        assert not leaks, leaks
