"""Focused unit tests of the core over loop: registers, Identify, logs, features,
keep-alive, namespace disable with I/O in flight and configuration changes under live
controllers."""

from __future__ import annotations

import random

import pytest

from nvmet_p2p.backends.base import Backend, Completion
from nvmet_p2p.backends.memory import MemoryBackend
from nvmet_p2p.errors import ConfigError
from nvmet_p2p.host.base import CC_ENABLE
from nvmet_p2p.host.loop import LoopHost
from nvmet_p2p.wire import identify as idf
from nvmet_p2p.wire import log as lg
from nvmet_p2p.wire.command import (
    AdminOpcode,
    ConnectData,
    FabricsType,
    IoOpcode,
    Sqe,
    connect_invalid_result,
    fabrics_sqe,
)
from nvmet_p2p.wire.limits import NVME_CNTLID_DYNAMIC, NVME_DISC_SUBSYS_NAME
from nvmet_p2p.wire.sqe_layout import (
    CONNECT_IPO_SQE_QID,
)
from tests.support.loop_env import SUBNQN, LoopEnv

DNR = 0x4000
PROP_CAP, PROP_VS, PROP_CC, PROP_CSTS = 0x00, 0x08, 0x14, 0x1C
CSTS_RDY, CSTS_CFS, CSTS_SHST_CMPLT = 1, 2, 2 << 2


# -- Connect ---------------------------------------------------------------------------

def test_connect_result_and_sq_head(target_env: LoopEnv) -> None:
    h = target_env.host()
    q = h.open_queue(0, 32)
    data = ConnectData(h.hostid, NVME_CNTLID_DYNAMIC, SUBNQN, h.hostnqn).encode()
    cqe, _ = q.execute(fabrics_sqe(FabricsType.CONNECT, qid=0, sqsize=31, kato=0), data=data)
    assert cqe.status == 0 and cqe.result & 0xFFFF == 1  # dword 0 = cntlid
    assert (cqe.sq_id, cqe.sq_head) == (0, 1)
    h.admin, h.cntlid = q, 1
    heads = [h.admin_cmd(AdminOpcode.KEEP_ALIVE, check=False)[0].sq_head for _ in range(40)]
    assert heads == [(2 + i) % 32 for i in range(40)]  # wraps at the queue size


def test_connect_disable_sqflow(target_env: LoopEnv) -> None:
    h = target_env.host()
    q = h.open_queue(0, 32)
    data = ConnectData(h.hostid, NVME_CNTLID_DYNAMIC, SUBNQN, h.hostnqn).encode()
    cqe, _ = q.execute(fabrics_sqe(FabricsType.CONNECT, qid=0, sqsize=31, cattr=1 << 2),
                       data=data)
    assert cqe.status == 0 and cqe.sq_head == 0xFFFF
    h.admin = q
    assert h.admin_cmd(AdminOpcode.KEEP_ALIVE, check=False)[0].sq_head == 0xFFFF


def test_connect_invalid_result_encoding(target_env: LoopEnv) -> None:
    from nvmet_p2p.wire.command import connect_invalid_result
    assert connect_invalid_result(True, 256) == 0x10100  # IATTR 1 (data), IPO 256 subnqn
    assert connect_invalid_result(False, 44) == 44  # IATTR 0 (SQE), IPO 44 sqsize
    h = target_env.host()
    q = h.open_queue(0, 32)
    data = ConnectData(h.hostid, NVME_CNTLID_DYNAMIC, "", h.hostnqn).encode()
    cqe, _ = q.execute(fabrics_sqe(FabricsType.CONNECT, qid=0, sqsize=31), data=data)
    q.close()
    assert (cqe.status, cqe.result & 0xFFFFFFFF) == (0x182 | DNR, 0x10100)
    data = ConnectData(h.hostid, NVME_CNTLID_DYNAMIC, SUBNQN, "").encode()
    q = h.open_queue(0, 32)
    cqe, _ = q.execute(fabrics_sqe(FabricsType.CONNECT, qid=0, sqsize=31), data=data)
    q.close()
    assert (cqe.status, cqe.result & 0xFFFFFFFF) == (0x182 | DNR, 0x10200)


def test_kato_rounding_at_connect(target_env: LoopEnv) -> None:
    h = target_env.connect(kato_ms=1500)
    assert h.get_features(0x0F) == 2000  # kept in whole seconds, rounded up
    ctrl = target_env.target.get_subsys(SUBNQN).ctrls[h.cntlid]
    assert ctrl.kato == 2


# -- registers -------------------------------------------------------------------------

def test_cap_vs(env: LoopEnv) -> None:
    env.port(max_queue_size=256)
    env.add_subsystem(attr_version="2.0")
    h = env.connect()
    cap = h.property_get(PROP_CAP, size=8)
    assert cap & 0xFFFF == 255  # MQES, 0's based, from param_max_queue_size
    assert (cap >> 24) & 0xFF == 15  # TO: 7.5 s
    assert (cap >> 37) & 0xFF == 1  # CSS: NVM command set
    assert (cap >> 48) & 0xF == 0  # MPSMIN 4 KiB
    assert h.property_get(PROP_VS) == 0x020000


def test_vs_default(target_env: LoopEnv) -> None:
    assert target_env.connect().property_get(PROP_VS) == 0x010300


def test_cc_enable_shutdown_transitions(target_env: LoopEnv) -> None:
    h = target_env.connect(enable=False)
    ctrl = target_env.target.get_subsys(SUBNQN).ctrls[h.cntlid]
    assert h.property_get(PROP_CSTS) == 0 and h.property_get(PROP_CC) == 0
    h.property_set(PROP_CC, CC_ENABLE)
    assert h.property_get(PROP_CSTS) == CSTS_RDY and h.property_get(PROP_CC) == CC_ENABLE
    assert ctrl.ready
    h.property_set(PROP_CC, CC_ENABLE | 1 << 14)  # normal shutdown
    assert h.property_get(PROP_CSTS) == CSTS_SHST_CMPLT  # RDY clear, shutdown complete
    assert not ctrl.ready
    assert h.property_get(PROP_CC) == 0  # shutdown clears CC, as nvmet_clear_ctrl()
    # so the kernel never sees SHN fall: SHST stays until the next enable
    h.property_set(PROP_CC, 0)
    assert h.property_get(PROP_CSTS) == CSTS_SHST_CMPLT
    h.property_set(PROP_CC, CC_ENABLE)  # CSTS = RDY, as nvmet_start_ctrl() assigns it
    assert h.property_get(PROP_CSTS) == CSTS_RDY
    h.property_set(PROP_CC, 0)  # disable
    assert h.property_get(PROP_CSTS) == 0 and h.property_get(PROP_CC) == 0
    h.property_set(PROP_CC, CC_ENABLE | 2 << 14)  # abrupt shutdown counts too
    assert h.property_get(PROP_CSTS) & CSTS_SHST_CMPLT


@pytest.mark.parametrize("cc", [1 | 7 << 16 | 4 << 20, 1 | 6 << 16 | 3 << 20,
                                CC_ENABLE | 1 << 7, CC_ENABLE | 1 << 11, CC_ENABLE | 1 << 4])
def test_cc_invalid_configuration_is_fatal(target_env: LoopEnv, cc: int) -> None:
    h = target_env.connect(enable=False)
    h.property_set(PROP_CC, cc)
    assert h.property_get(PROP_CSTS) == CSTS_CFS
    cqe, _ = h.admin_cmd(AdminOpcode.IDENTIFY, cdw10=1, read_len=4096, check=False)
    assert cqe.status == 0x00C | DNR


# -- Identify --------------------------------------------------------------------------

@pytest.mark.parametrize("inline", [4096, 0, 16384])
def test_identify_ctrl_fields(env: LoopEnv, inline: int) -> None:
    env.port(inline_data_size=inline)
    env.add_subsystem(attr_serial="SN-0042", attr_model="p2p model", attr_firmware="fw1.2",
                      attr_qid_max=8)
    h = env.connect()
    ic = h.identify_ctrl()
    assert (ic.sn, ic.mn, ic.fr) == ("SN-0042", "p2p model", "fw1.2")
    assert ic.mdts == 8 and ic.cntlid == h.cntlid and ic.nn == 1024
    assert ic.ioccsz == (64 + inline) // 16 and ic.iorcsz == 1
    sgls = 1 | 1 << 2 | (1 << 20 if inline else 0)
    assert ic.sgls == sgls
    assert ic.msdbd == 1
    assert ic.cntrltype == 1 and ic.subnqn == SUBNQN
    assert (ic.sqes, ic.cqes) == (0x66, 0x44)
    assert ic.aerl == 3 and ic.elpe == 127 and ic.kas == 10
    assert ic.maxcmd == 128
    assert ic.oaes & 1 << 8
    assert ic.oncs & (1 << 2 | 1 << 3) == (1 << 2 | 1 << 3)
    assert ic.vwc & 1
    assert ic.ver == 0x010300


@pytest.mark.parametrize("block_size,shift", [(512, 9), (4096, 12)])
@pytest.mark.parametrize("kind", ["memory", "file"])
def test_identify_ns_fields(env: LoopEnv, block_size: int, shift: int, kind: str) -> None:
    env.add_subsystem(namespaces={3: kind}, block_size=block_size, ns_size=8 << 20)
    h = env.connect()
    ns = h.identify_ns(3)
    n = (8 << 20) // block_size
    assert (ns.nsze, ns.ncap, ns.nuse) == (n, n, n)
    assert ns.nlbaf == 0 and ns.flbas & 0xF == 0
    assert ns.lbaf[0].ds == shift and ns.lbaf[0].ms == 0
    assert ns.dlfeat & 0x7 == 1 and ns.dlfeat & 1 << 3
    assert ns.nmic & 1
    assert ns.nguid != bytes(16)
    assert h.active_ns() == [3]
    data = random.randbytes(2 * block_size)
    h.write(3, n - 2, data, block_size=block_size)
    assert h.read(3, n - 2, 2, block_size=block_size) == data


def test_active_ns_list_start(env: LoopEnv) -> None:
    env.add_subsystem(namespaces={1: "memory", 5: "memory", 9: "memory"}, ns_size=1 << 20)
    h = env.connect()
    assert idf.decode_ns_list(h.identify(idf.Cns.NS_ACTIVE_LIST, 0)) == [1, 5, 9]
    assert idf.decode_ns_list(h.identify(idf.Cns.NS_ACTIVE_LIST, 5)) == [9]
    assert idf.decode_ns_list(h.identify(idf.Cns.NS_ACTIVE_LIST, 9)) == []
    for nsid in (0xFFFFFFFE, 0xFFFFFFFF):
        cqe, _ = h.admin_cmd(AdminOpcode.IDENTIFY, nsid=nsid, cdw10=2, read_len=4096,
                             check=False)
        assert cqe.status == 0x00B | DNR


def _desc(h: LoopHost, nsid: int) -> dict:
    return idf.decode_ns_desc_list(h.identify(idf.Cns.NS_DESC_LIST, nsid))


def test_ns_ids_stable_across_restart(env: LoopEnv, tmp_path) -> None:
    env.add_subsystem(namespaces={1: "memory", 2: "memory"}, ns_size=1 << 20)
    sub = env.root.subsystems[SUBNQN]
    sub.namespaces[2].enable = False
    sub.namespaces[2].device_nguid = "01234567-89ab-cdef-0123-456789abcdef"
    sub.namespaces[2].enable = True
    h = env.connect()
    first = {nsid: _desc(h, nsid) for nsid in (1, 2)}
    for d in first.values():
        assert d["csi"] == 0 and len(d["uuid"]) == 16 and d["nguid"] != bytes(16)
    assert first[2]["nguid"] == bytes.fromhex("0123456789abcdef0123456789abcdef")
    assert first[1]["uuid"] != first[2]["uuid"] and first[1]["nguid"] != first[2]["nguid"]
    assert h.identify_ns(1).nguid == first[1]["nguid"]
    doc = env.root.to_dict()
    # the same configuration restored into a new target: the same IDs
    env2 = LoopEnv(tmp_path / "restart")
    try:
        env2.root.restore(doc)
        h2 = env2.connect()
        assert {nsid: _desc(h2, nsid) for nsid in (1, 2)} == first
    finally:
        assert not env2.close()


# -- logs --------------------------------------------------------------------------------

def test_error_log_entries(target_env: LoopEnv) -> None:
    h = target_env.connect()
    assert lg.decode_error_log(h.get_log_page(lg.LogId.ERROR, 4096)) == []
    bad = Sqe(opcode=IoOpcode.READ, nsid=7)
    cqe, _ = h.io[1].execute(bad, read_len=512)
    cqe2, _ = h.admin_cmd(AdminOpcode.IDENTIFY, cdw10=0x55, read_len=4096, check=False)
    entries = lg.decode_error_log(h.get_log_page(lg.LogId.ERROR, 64 * 128))
    assert len(entries) == 2
    newest, older = entries
    assert (newest.error_count, newest.sqid, newest.cmdid, newest.status) == (
        2, 0, cqe2.cid, 0x002 | DNR)
    assert newest.param_error_location == 40  # CNS lives in CDW10
    assert (older.error_count, older.sqid, older.cmdid, older.status, older.nsid) == (
        1, 1, cqe.cid, 0x00B | DNR, 7)
    assert older.param_error_location == 4  # the NSID field
    assert lg.SmartLog.decode(h.get_log_page(lg.LogId.SMART, 512)).num_err_log_entries == 2


def test_error_log_keeps_newest_128(target_env: LoopEnv) -> None:
    h = target_env.connect()
    for _ in range(130):
        h.admin_cmd(0xC1, check=False)
    entries = lg.decode_error_log(h.get_log_page(lg.LogId.ERROR, 64 * 128))
    assert [e.error_count for e in entries] == list(range(130, 2, -1))


def test_smart_counters(target_env: LoopEnv) -> None:
    h = target_env.connect()
    before = lg.SmartLog.decode(h.get_log_page(lg.LogId.SMART, 512))
    assert (before.host_reads, before.host_writes) == (0, 0)
    assert before.avail_spare == 100 and before.temperature > 273
    h.write(1, 0, bytes(512 * 1000))
    h.write(1, 0, bytes(512))
    h.read(1, 0, 3)
    smart = lg.SmartLog.decode(h.get_log_page(lg.LogId.SMART, 512))
    assert (smart.host_writes, smart.host_reads) == (2, 1)
    # data units: thousands of 512-byte units, rounded up
    assert smart.data_units_written == 2 and smart.data_units_read == 1
    assert smart.critical_warning == 0


def test_firmware_slot_log(env: LoopEnv) -> None:
    env.add_subsystem(attr_firmware="7.7.7")
    h = env.connect()
    fw = lg.FwSlotLog.decode(h.get_log_page(lg.LogId.FW_SLOT, 512))
    assert fw.afi & 0x7 == 1 and fw.frs[0] == "7.7.7"
    assert h.identify_ctrl().frmw & 0xF == 3  # slot 1 read-only, 1 slot


def test_command_effects_log(target_env: LoopEnv) -> None:
    h = target_env.connect()
    assert h.identify_ctrl().lpa & 1 << 1
    eff = lg.CmdEffectsLog.decode(h.get_log_page(lg.LogId.CMD_EFFECTS, 4096))
    for op in (AdminOpcode.IDENTIFY, AdminOpcode.GET_LOG_PAGE, AdminOpcode.SET_FEATURES,
               AdminOpcode.GET_FEATURES, AdminOpcode.KEEP_ALIVE, AdminOpcode.ASYNC_EVENT):
        assert eff.acs[op] & lg.CmdEffects.CSUPP, hex(op)
    assert not eff.acs[AdminOpcode.CREATE_SQ]
    for op in (IoOpcode.WRITE, IoOpcode.WRITE_ZEROES, IoOpcode.DSM):
        assert eff.iocs[op] == lg.CmdEffects.CSUPP | lg.CmdEffects.LBCC
    assert eff.iocs[IoOpcode.READ] == lg.CmdEffects.CSUPP
    assert eff.iocs[IoOpcode.FLUSH] == lg.CmdEffects.CSUPP
    assert not eff.iocs[0x05]


def _log_status(h: LoopHost, lid: int, length: int = 4096) -> int:
    cqe, _ = h.admin_cmd(AdminOpcode.GET_LOG_PAGE, nsid=0xFFFFFFFF, read_len=length,
                         cdw10=lid | (length // 4 - 1) << 16, check=False)
    return cqe.status


def test_supported_log_pages(target_env: LoopEnv) -> None:
    h = target_env.connect()
    page = h.get_log_page(lg.LogId.SUPPORTED, lg.SUPPORTED_LOG_SIZE)
    supported = lg.SupportedLogPages.decode(page).lids
    assert supported == {lid: lg.LidSupport.LSUPP for lid in (0x00, 0x01, 0x02, 0x03, 0x04,
                                                               0x05)}
    # exactly what Get Log Page serves: every listed LID reads, every other one is refused
    for lid in range(256):
        assert _log_status(h, lid) == (0 if lid in supported else 0x002 | DNR), hex(lid)
    # Identify Controller LPA agrees: the effects log (bit 1), LPO/NUMDU (bit 2), nothing
    # that would promise more (bit 0 SMART per namespace, bit 5 LIDs 12h and 13h)
    assert h.identify_ctrl().lpa == 1 << 1 | 1 << 2
    # a part of the page, as any log page
    assert h.get_log_page(lg.LogId.SUPPORTED, 16, lpo=8) == page[8:24]
    assert h.get_log_page(lg.LogId.SUPPORTED, 8, lpo=1024) == bytes(8)


def test_discovery_controller_log_pages(target_env: LoopEnv) -> None:
    d = target_env.connect(NVME_DISC_SUBSYS_NAME, nr_io_queues=0)
    # as the kernel's discovery controller: the discovery log only (not even LID 00h)
    for lid in range(256):
        want = 0 if lid == lg.LogId.DISC else 0x002 | DNR
        assert _log_status(d, lid, lg.DISC_HDR_SIZE) == want, hex(lid)
    assert d.identify_ctrl().lpa == 1 << 2  # no effects log to promise


def test_log_page_offset_and_length(target_env: LoopEnv) -> None:
    h = target_env.connect()
    full = h.get_log_page(lg.LogId.CMD_EFFECTS, 4096)
    assert h.get_log_page(lg.LogId.CMD_EFFECTS, 64, lpo=1024) == full[1024:1088]
    assert h.get_log_page(lg.LogId.CMD_EFFECTS, 8, lpo=4096) == bytes(8)


# -- features ----------------------------------------------------------------------------

def test_features_number_of_queues(env: LoopEnv) -> None:
    env.add_subsystem(attr_qid_max=8)
    h = env.connect()
    assert h.get_features(0x07) == 7 | 7 << 16
    assert h.set_features(0x07, 63 | 63 << 16) == 7 | 7 << 16  # what we grant, 0's based
    for bad in (0xFFFF, 0xFFFF << 16):
        cqe, _ = h.admin_cmd(AdminOpcode.SET_FEATURES, cdw10=0x07, cdw11=bad, check=False)
        assert cqe.status == 0x002 | DNR


def test_features_kato(target_env: LoopEnv) -> None:
    h = target_env.connect()
    assert h.get_features(0x0F) == 0
    h.set_features(0x0F, 3000)
    assert h.get_features(0x0F) == 3000
    h.set_features(0x0F, 2500)
    assert h.get_features(0x0F) == 3000  # whole seconds, rounded up


def test_features_async_event_config(target_env: LoopEnv) -> None:
    h = target_env.connect()
    assert h.get_features(0x0B) == 1 << 8
    assert h.set_features(0x0B, 0) == 0
    assert h.get_features(0x0B) == 0
    for bad in (1 << 31, 1 << 9, 0xFF):
        cqe, _ = h.admin_cmd(AdminOpcode.SET_FEATURES, cdw10=0x0B, cdw11=bad, check=False)
        assert cqe.status == 0x002 | DNR
    # with NS attribute notices off, a namespace change completes no AER
    aer = h.submit_aer()
    sub = target_env.root.subsystems[SUBNQN]
    target_env.add_namespace(sub, 2, size=1 << 20)
    with pytest.raises(TimeoutError):
        h.admin.wait(aer, timeout=0.05)
    h.set_features(0x0B, 1 << 8)
    target_env.add_namespace(sub, 3, size=1 << 20)
    cqe, _ = h.admin.wait(aer)
    assert cqe.result & 0xFFFFFFFF == 0x040002


@pytest.mark.parametrize("kind,vwc", [("memory", 0), ("file", 1)])
def test_features_vwc(env: LoopEnv, kind: str, vwc: int) -> None:
    env.add_subsystem(namespaces={1: kind}, ns_size=1 << 20)
    assert env.connect().get_features(0x06) == vwc


def test_features_save_not_supported(target_env: LoopEnv) -> None:
    h = target_env.connect()
    cqe, _ = h.admin_cmd(AdminOpcode.SET_FEATURES, cdw10=0x0F | 1 << 31, cdw11=1000,
                         check=False)
    assert cqe.status == 0x10D | DNR


def test_abort_does_not_abort(target_env: LoopEnv) -> None:
    cqe, _ = target_env.connect().admin_cmd(AdminOpcode.ABORT, cdw10=5 << 16 | 1)
    assert cqe.status == 0 and cqe.result & 1


# -- keep-alive --------------------------------------------------------------------------

def test_keep_alive_expiry_tears_down_all_queues(target_env: LoopEnv) -> None:
    env = target_env
    h = env.connect(kato_ms=3000, nr_io_queues=3)
    bystander = env.connect(kato_ms=3000)
    ctrl = env.target.get_subsys(SUBNQN).ctrls[h.cntlid]
    aer = h.submit_aer()
    assert env.transport.resources()["queues"] == 6
    env.clock.advance(2.5)
    bystander.keep_alive()
    env.target.tick()
    assert not ctrl.dead
    env.clock.advance(1.0)  # 3.5 s since h was last heard from; bystander at 1 s
    env.target.tick()
    assert ctrl.dead and ctrl.csts & CSTS_CFS
    assert h.cntlid not in env.target.get_subsys(SUBNQN).ctrls
    assert not ctrl.sqs
    assert not h.admin.connected and not any(q.connected for q in h.io.values())
    assert aer.cid not in h.admin.done  # its queue is gone: no CQE to deliver
    assert env.transport.resources()["queues"] == 2
    with pytest.raises(ConnectionError):
        h.keep_alive()
    bystander.write(1, 0, b"k" * 512)
    assert bystander.read(1, 0, 1) == b"k" * 512
    env.target.tick()  # a second tick on a dead controller does nothing
    h.disconnect()


def test_keep_alive_disabled_never_expires(target_env: LoopEnv) -> None:
    h = target_env.connect(kato_ms=0)
    target_env.clock.advance(10_000)
    target_env.target.tick()
    h.keep_alive()


def test_discovery_kato_default(target_env: LoopEnv) -> None:
    d = target_env.connect(NVME_DISC_SUBSYS_NAME, nr_io_queues=0)
    target_env.clock.advance(119)
    target_env.target.tick()
    d.keep_alive()
    target_env.clock.advance(121)
    target_env.target.tick()
    assert not d.admin.connected


def test_kato_timer_restarts_on_enable(target_env: LoopEnv) -> None:
    h = target_env.connect(kato_ms=2000, enable=False)
    target_env.clock.advance(1.5)
    h.property_set(PROP_CC, CC_ENABLE)
    target_env.clock.advance(1.5)
    target_env.target.tick()
    h.keep_alive()  # still alive: the enable reset the timer


# -- namespace disable with I/O in flight -------------------------------------------------

class SlowBackend(MemoryBackend):
    """A memory backend that holds completions until the test releases them."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.held: list[tuple[Completion, int]] = []
        self.closed_with_held = None

    def _hold(self, cb: Completion) -> Completion:
        return lambda status: self.held.append((cb, status))

    def submit_read(self, slba, nlb, buf, cb):
        super().submit_read(slba, nlb, buf, self._hold(cb))

    def submit_write(self, slba, nlb, buf, fua, cb):
        super().submit_write(slba, nlb, buf, fua, self._hold(cb))

    def release(self) -> None:
        held, self.held = self.held, []
        for cb, status in held:
            cb(status)

    def close(self) -> None:
        self.closed_with_held = len(self.held)
        super().close()


def test_ns_disable_completes_inflight_first(target_env: LoopEnv, monkeypatch) -> None:
    env = target_env
    made: list[Backend] = []

    def slow_open(path, *, kind, block_size, size, loop, **kw):
        b = SlowBackend(path, size, block_size)
        made.append(b)
        return b
    monkeypatch.setattr(env.target, "open_backend", slow_open)
    sub = env.root.subsystems[SUBNQN]
    env.add_namespace(sub, 2, size=1 << 20)
    backend = made[0]
    h = env.connect(nr_io_queues=2)
    q1, q2 = h.io[1], h.io[2]
    data = random.randbytes(1024)
    w = q1.submit(Sqe(opcode=IoOpcode.WRITE, nsid=2, cdw10=4, cdw12=1), data=data)
    r = q2.submit(Sqe(opcode=IoOpcode.READ, nsid=2, cdw12=0), read_len=512)
    ns = env.ns(2)
    assert ns.inflight == 2 and backend.held
    sub.namespaces[2].enable = False
    assert env.ns(2) is None and ns.closing and backend.closed_with_held is None
    # new I/O to the disabled namespace: Invalid Namespace, even while old I/O runs
    cqe, _ = q1.execute(Sqe(opcode=IoOpcode.READ, nsid=2), read_len=512)
    assert cqe.status == 0x00B | DNR
    assert 2 not in h.active_ns()
    backend.release()
    wcqe, _ = q1.wait(w)
    rcqe, rdata = q2.wait(r)
    assert wcqe.status == 0 and rcqe.status == 0 and rdata == bytes(512)
    assert ns.inflight == 0 and backend.closed_with_held == 0  # closed after, not before
    h.write(1, 0, data)
    assert h.read(1, 0, 2) == data


def test_ns_disable_inflight_file_backend(env: LoopEnv) -> None:
    env.add_subsystem(namespaces={1: "file"}, ns_size=4 << 20)
    h = env.connect(nr_io_queues=1)
    q = h.io[1]
    data = random.randbytes(1 << 20)
    pending = [q.submit(Sqe(opcode=IoOpcode.WRITE, nsid=1, cdw10=i * 2048, cdw12=2047),
                        data=data) for i in range(2)]
    ns = env.ns(1)
    assert ns.inflight == 2  # file completions come back through the loop, not inline
    env.root.subsystems[SUBNQN].namespaces[1].enable = False
    cqe, _ = q.execute(Sqe(opcode=IoOpcode.FLUSH, nsid=1))
    assert cqe.status == 0x00B | DNR
    for p in pending:
        assert q.wait(p)[0].status == 0
    assert ns.inflight == 0 and ns.backend._closed
    env.root.subsystems[SUBNQN].namespaces[1].enable = True  # same file, data persisted
    assert h.read(1, 2048, 2048) == data


# -- configuration changes under live controllers ------------------------------------------

def test_unlink_subsystem_deletes_its_controllers(target_env: LoopEnv) -> None:
    env = target_env
    h = env.connect(nr_io_queues=2)
    disc = env.connect(NVME_DISC_SUBSYS_NAME, nr_io_queues=0)
    env.port().unlink_subsystem(SUBNQN)  # as nvmet_port_del_ctrls()
    assert not env.target.get_subsys(SUBNQN).ctrls
    assert not h.admin.connected and not any(q.connected for q in h.io.values())
    ctrl = env.target.get_subsys(NVME_DISC_SUBSYS_NAME).ctrls[disc.cntlid]
    assert not ctrl.csts & CSTS_CFS  # a deletion, not a fatal error
    assert SUBNQN not in [e.subnqn for e in disc.discover()]  # discovery lives on
    env.port().link_subsystem(SUBNQN)
    h2 = env.connect()
    h2.write(1, 0, b"u" * 512)
    assert h2.read(1, 0, 1) == b"u" * 512


def test_identify_ctrl_freezes_the_subsystem_identity(env: LoopEnv) -> None:
    cfg = env.add_subsystem(attr_serial="SN-1", attr_ieee_oui=0x001B44)
    other = env.add_subsystem("nqn.2026-11.io.nvmet-p2p:other", attr_serial="SN-O")
    h = env.connect()
    h.property_get(PROP_VS)
    cfg.attr_serial = "SN-2"  # connected, not yet identified: still writable
    cfg.attr_version = "1.4"
    d = env.connect(NVME_DISC_SUBSYS_NAME, nr_io_queues=0)
    d.identify_ctrl()  # identifying the discovery controller fixes nothing configured
    cfg.attr_model = "model 2"
    ic = h.identify_ctrl()
    assert (ic.sn, ic.mn, ic.ieee, ic.ver) == ("SN-2", "model 2", 0x001B44, 0x010400)
    for name, value in (("attr_serial", "SN-3"), ("attr_model", "m3"), ("attr_firmware", "f3"),
                        ("attr_ieee_oui", 0x123456), ("attr_version", "2.0")):
        with pytest.raises(ConfigError, match=f"has been identified by a host, so {name} "
                           "cannot change"):
            setattr(cfg, name, value)
    cfg.attr_allow_any_host = False  # the rest of the subsystem stays configurable
    other.attr_serial = "SN-P"  # and so do subsystems no host identified
    # a second controller identifies the same subsystem the first one did
    cfg.attr_allow_any_host = True
    assert env.connect().identify_ctrl().sn == "SN-2"
    assert h.property_get(PROP_VS) == 0x010400


def test_qid_max_change_forces_reconnect(env: LoopEnv) -> None:
    cfg = env.add_subsystem(attr_qid_max=8)
    bystander_cfg = env.add_subsystem("nqn.2026-11.io.nvmet-p2p:other")
    h = env.connect(nr_io_queues=4)
    bystander = env.connect(bystander_cfg.nqn)
    disc = env.connect(NVME_DISC_SUBSYS_NAME, nr_io_queues=0)
    ctrl = env.target.get_subsys(SUBNQN).ctrls[h.cntlid]
    cfg.attr_qid_max = 2  # as the kernel: every controller of the subsystem goes
    assert ctrl.dead and not env.target.get_subsys(SUBNQN).ctrls
    assert not ctrl.csts & CSTS_CFS  # a deletion, as the kernel's delete_ctrl
    assert not h.admin.connected and not any(q.connected for q in h.io.values())
    with pytest.raises(ConnectionError):
        h.keep_alive()
    bystander.write(1, 0, b"b" * 512)  # other subsystems and discovery are untouched
    assert bystander.read(1, 0, 1) == b"b" * 512
    disc.keep_alive()
    # the host reconnects and gets the new limit
    h2 = env.connect(nr_io_queues=2)
    assert h2.get_features(0x07) == 1 | 1 << 16
    q = h2.open_queue(3, 32)
    cqe = h2.connect_queue(q, SUBNQN, h2.cntlid, check=False)
    assert cqe.status == 0x182 | DNR  # Connect Invalid Parameters, pointing at the QID
    assert cqe.result & 0xFFFFFFFF == connect_invalid_result(False, CONNECT_IPO_SQE_QID)
    q.close()
    # raising it reconnects too, and then more queues are allowed
    cfg.attr_qid_max = 4
    assert not h2.admin.connected
    h3 = env.connect(nr_io_queues=4)
    h3.write(1, 0, b"q" * 512, qid=4)
    assert h3.read(1, 0, 1, qid=4) == b"q" * 512


def test_changed_ns_list_overflow(target_env: LoopEnv) -> None:
    h = target_env.connect()
    ctrl = target_env.target.get_subsys(SUBNQN).ctrls[h.cntlid]
    for nsid in range(1, 1025):
        ctrl.ns_changed(nsid)
    ctrl.ns_changed(5)  # already listed: the full list does not overflow
    page = h.get_log_page(lg.LogId.CHANGED_NS, 4096, rae=True)
    assert lg.decode_changed_ns_list(page) == list(range(1, 1025))
    ctrl.ns_changed(2000)
    ctrl.ns_changed(2001)  # overflow is sticky
    assert lg.decode_changed_ns_list(h.get_log_page(lg.LogId.CHANGED_NS, 4096)) == [0xFFFFFFFF]
    assert lg.decode_changed_ns_list(h.get_log_page(lg.LogId.CHANGED_NS, 4096)) == []
