"""Protocol details where we answer as the kernel target does (issue #11), over loop.

Each test sends the command a kernel-target tool or a hostile host sends and checks the
exact status, the data, and the error log entry (drivers/nvme/target/admin-cmd.c,
fabrics-cmd.c; deliberate differences are in docs/protocol-parity.md).
"""

from __future__ import annotations

import pytest

from nvmet_p2p.host.loop import LoopHost
from nvmet_p2p.wire import log as lg
from nvmet_p2p.wire.command import (
    AdminOpcode,
    FabricsType,
    IoOpcode,
    Sgl,
    SglType,
    Sqe,
    fabrics_sqe,
)
from nvmet_p2p.wire.limits import NVMET_MAX_NAMESPACES
from nvmet_p2p.wire.regs import REG_CAP, REG_CC, REG_CSTS, REG_VS
from nvmet_p2p.wire.sqe_layout import IPO_CDW11, IPO_NSID, IPO_PROP_ATTRIB
from tests.support.loop_env import HOSTNQN, SUBNQN, LoopEnv

DNR = 0x4000
INVALID_FIELD = 0x002 | DNR


def newest_error(h: LoopHost) -> lg.ErrorLogEntry:
    entries = lg.decode_error_log(h.get_log_page(lg.LogId.ERROR, 4096))
    assert entries, "no error log entry"
    return entries[0]


@pytest.fixture
def host(env: LoopEnv) -> LoopHost:
    env.port(inline_data_size=4096)
    env.add_subsystem()
    return env.connect(hostnqn=HOSTNQN)


# -- Property Get / Set: ATTRIB sizes 2..7 are reserved ------------------------------------

@pytest.mark.parametrize("attrib", range(2, 8))
@pytest.mark.parametrize("offset", [REG_CAP, REG_VS, REG_CC, REG_CSTS])
def test_property_get_reserved_size_is_invalid_field(host: LoopHost, attrib: int,
                                                     offset: int) -> None:
    cqe, _ = host.admin.execute(fabrics_sqe(FabricsType.PROPERTY_GET, attrib=attrib,
                                            offset=offset))
    assert cqe.status == INVALID_FIELD and cqe.result == 0
    assert newest_error(host).param_error_location == IPO_PROP_ATTRIB


@pytest.mark.parametrize("attrib", range(2, 8))
def test_property_set_reserved_size_is_invalid_field(host: LoopHost, attrib: int) -> None:
    cqe, _ = host.admin.execute(fabrics_sqe(FabricsType.PROPERTY_SET, attrib=attrib,
                                            offset=REG_CC, value=0))
    assert cqe.status == INVALID_FIELD
    assert newest_error(host).param_error_location == IPO_PROP_ATTRIB
    assert host.property_get(REG_CSTS) & 1  # the write did not reset the controller
    assert host.read(1, 0, 1) is not None


def test_property_sizes_4_and_8_still_work(host: LoopHost) -> None:
    assert host.property_get(REG_CAP, size=8) & 0xFFFF == 127  # MQES
    assert host.property_get(REG_VS) >> 16 == 1


# -- Identify CNS 00h ------------------------------------------------------------------------

@pytest.mark.parametrize("nsid", [2, NVMET_MAX_NAMESPACES, NVMET_MAX_NAMESPACES + 1,
                                  0xFFFFFFFE])
def test_identify_ns_inactive_or_above_nn_returns_zeroes(host: LoopHost, nsid: int) -> None:
    # nvmet_execute_identify_ns(): "return an all zeroed buffer if we can't find an active
    # namespace" -- whatever the NSID, NN or not; only the broadcast NSID is refused
    cqe, data = host.admin_cmd(AdminOpcode.IDENTIFY, nsid=nsid, cdw10=0x00, read_len=4096,
                               check=False)
    assert cqe.status == 0 and data == bytes(4096)


def test_identify_ns_broadcast_is_invalid_namespace(host: LoopHost) -> None:
    cqe, _ = host.admin_cmd(AdminOpcode.IDENTIFY, nsid=0xFFFFFFFF, cdw10=0x00, read_len=4096,
                            check=False)
    assert cqe.status == 0x00B | DNR
    assert newest_error(host).param_error_location == IPO_NSID


# -- Get Features 81h: Host Identifier ---------------------------------------------------------

def test_get_features_host_id_returns_the_connect_host_id(host: LoopHost) -> None:
    cqe, data = host.admin_cmd(AdminOpcode.GET_FEATURES, cdw10=0x81, cdw11=1, read_len=16,
                               check=False)
    assert cqe.status == 0 and data == host.hostid


def test_get_features_host_id_needs_the_128_bit_flag(host: LoopHost) -> None:
    cqe, _ = host.admin_cmd(AdminOpcode.GET_FEATURES, cdw10=0x81, cdw11=0, read_len=16,
                            check=False)
    assert cqe.status == INVALID_FIELD
    assert newest_error(host).param_error_location == IPO_CDW11


def test_get_features_host_id_on_discovery_is_invalid_field(env: LoopEnv) -> None:
    env.port()
    env.add_subsystem()
    disc = env.connect("nqn.2014-08.org.nvmexpress.discovery", nr_io_queues=0)
    cqe, _ = disc.admin_cmd(AdminOpcode.GET_FEATURES, cdw10=0x81, cdw11=1, check=False)
    assert cqe.status == INVALID_FIELD


# -- a read whose data transfer to the host fails -----------------------------------------------

def test_failed_read_transfer_is_in_the_error_log(host: LoopHost) -> None:
    q = host.io[1]
    # a key the host never registered: the data cannot be written back
    p = q.submit(Sqe(opcode=IoOpcode.READ, nsid=1), sgl=Sgl(SglType.KEYED_DATA_BLOCK, 0, 512,
                                                               0xBAD))
    cqe, _ = q.wait(p)
    assert cqe.status == 0x004 | DNR
    entry = newest_error(host)
    assert (entry.sqid, entry.cmdid, entry.status, entry.nsid) == (1, cqe.cid, 0x004 | DNR, 1)
    assert lg.SmartLog.decode(host.get_log_page(lg.LogId.SMART, 512)).num_err_log_entries == 1
    data = bytes(range(256)) * 2
    host.write(1, 3, data)
    assert host.read(1, 3, 1) == data


# -- controllers a host never enables, or leaves behind ------------------------------------------

def test_per_host_controller_cap(env: LoopEnv) -> None:
    env.port()
    env.add_subsystem()
    env.target.max_ctrls_per_host = 3
    held = [env.connect(hostnqn=HOSTNQN, enable=False) for _ in range(3)]
    refused = env.host(HOSTNQN)
    refused.admin = refused.open_queue(0, 32)
    cqe = refused.connect_queue(refused.admin, SUBNQN, 0xFFFF, 0, check=False)
    assert cqe.status == 0x181 | DNR  # Connect Controller Busy, as when cntlids run out
    other = env.connect()  # another host is not locked out
    other.write(1, 0, bytes(512))
    held[0].disconnect()  # a controller given back makes room again
    env.connect(hostnqn=HOSTNQN)


def test_controller_not_enabled_in_time_is_torn_down(env: LoopEnv) -> None:
    env.port()
    env.add_subsystem()
    idle = env.connect(enable=False)
    ready = env.connect()  # kato 0, enabled: stays
    env.clock.advance(env.target.enable_timeout - 1)
    env.target.tick()
    assert idle.cntlid in env.target.get_subsys(SUBNQN).ctrls
    env.clock.advance(2)
    env.target.tick()
    ctrls = env.target.get_subsys(SUBNQN).ctrls
    assert idle.cntlid not in ctrls and ready.cntlid in ctrls
    assert not idle.admin.connected
    ready.write(1, 0, bytes(512))


def test_enable_deadline_restarts_on_reset_and_can_be_off(env: LoopEnv) -> None:
    env.port()
    env.add_subsystem()
    h = env.connect()
    env.clock.advance(env.target.enable_timeout * 2)
    env.target.tick()
    h.property_set(REG_CC, 0)  # a reset: the deadline counts from here
    env.clock.advance(env.target.enable_timeout - 1)
    env.target.tick()
    assert h.cntlid in env.target.get_subsys(SUBNQN).ctrls
    env.target.enable_timeout = 0  # no deadline
    env.clock.advance(10 * 3600)
    env.target.tick()
    assert h.cntlid in env.target.get_subsys(SUBNQN).ctrls
