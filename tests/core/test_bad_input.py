"""The bad-input matrix: every REFERENCE.md §3 row the loop transport can express.

Each case sends one malformed command and asserts the exact completion status,
DNR included (and the IATTR/IPO result of a failed Connect); afterwards the same
host, or a fresh one where the case tears the first down, still does verified I/O.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from nvmet_p2p.host.loop import LoopHost, LoopQueue
from nvmet_p2p.wire import log as lg
from nvmet_p2p.wire.command import (
    AdminOpcode,
    ConnectData,
    Cqe,
    FabricsType,
    IoOpcode,
    Sgl,
    SglType,
    Sqe,
    fabrics_sqe,
)
from nvmet_p2p.wire.limits import NVME_CNTLID_DYNAMIC, NVME_DISC_SUBSYS_NAME
from nvmet_p2p.wire.status import status_name
from tests.support.loop_env import HOSTNQN, SUBNQN, LoopEnv

DNR = 0x4000
NBLOCKS = (16 << 20) // 512
U64 = 1 << 64
INLINE = 4096  # the port's in-capsule data area


def expect(cqe: Cqe, status: int, result: int | None = None) -> None:
    assert cqe.status == status, (f"status {cqe.status:#06x} ({status_name(cqe.status)}), "
                                  f"want {status:#06x} ({status_name(status)})")
    if result is not None:
        assert cqe.result & 0xFFFFFFFF == result, f"result {cqe.result:#x}, want {result:#x}"


def verify_io(host: LoopHost, slba: int = 77) -> None:
    data = random.randbytes(2048)
    host.write(1, slba, data)
    assert host.read(1, slba, 4) == data
    host.write(1, slba, data[:512], inline=True)
    assert host.read(1, slba, 1) == data[:512]


@pytest.fixture
def bad_env(env: LoopEnv) -> LoopEnv:
    env.port(inline_data_size=INLINE)
    env.add_subsystem()
    return env


@pytest.fixture
def host(bad_env: LoopEnv) -> LoopHost:
    return bad_env.connect(hostnqn=HOSTNQN, nr_io_queues=1)


def after(env: LoopEnv, host: LoopHost) -> None:
    """The association survived the bad command (and a second host works too)."""
    verify_io(host)
    other = env.connect(nr_io_queues=1)
    verify_io(other, slba=500)
    other.disconnect()


# -- Connect ---------------------------------------------------------------------

def raw_connect(env: LoopEnv, h: LoopHost, *, qid: int = 0, size: int = 32,
                sqsize: int | None = None, recfmt: int = 0, cntlid: int = NVME_CNTLID_DYNAMIC,
                subnqn: str = SUBNQN, keep: bool = False) -> tuple[Cqe, LoopQueue]:
    q = h.open_queue(qid, size)
    sqe = fabrics_sqe(FabricsType.CONNECT, qid=qid, recfmt=recfmt,
                      sqsize=size - 1 if sqsize is None else sqsize)
    cqe, _ = q.execute(sqe, data=ConnectData(h.hostid, cntlid, subnqn, h.hostnqn).encode())
    if not keep:
        q.close()
    return cqe, q


IATTR_DATA = 1 << 16

CONNECT_CASES: dict[str, tuple[dict, int, int | None]] = {
    # name: (raw_connect arguments, status, Connect result dword 0)
    "recfmt": ({"recfmt": 1}, 0x180 | DNR, None),
    "admin sqsize 0": ({"sqsize": 0}, 0x182 | DNR, 44),
    "admin sqsize too big": ({"size": 64, "sqsize": 32}, 0x182 | DNR, 44),
    "admin sqsize above the queue": ({"size": 16, "sqsize": 20}, 0x182 | DNR, 44),
    "admin cntlid not 0xFFFF": ({"cntlid": 1}, 0x182 | DNR, IATTR_DATA | 16),
    "unknown subsystem": ({"subnqn": "nqn.2026-11.io.nvmet-p2p:nope"}, 0x182 | DNR,
                          IATTR_DATA | 256),
}


@pytest.mark.parametrize("name", list(CONNECT_CASES))
def test_connect_admin_bad_fields(bad_env: LoopEnv, name: str) -> None:
    kwargs, status, result = CONNECT_CASES[name]
    h = bad_env.host()
    cqe, _ = raw_connect(bad_env, h, **kwargs)
    expect(cqe, status, result)
    assert not bad_env.target.controllers()
    after(bad_env, bad_env.connect())


def test_connect_io_bad_fields(bad_env: LoopEnv, host: LoopHost) -> None:
    env = bad_env
    mqes = env.target.mqes(env.port())
    cases = [
        # unknown cntlid on an I/O queue: IPO points at cntlid in the data
        ({"qid": 2, "cntlid": host.cntlid + 7}, 0x182 | DNR, IATTR_DATA | 16),
        ({"qid": 2, "cntlid": NVME_CNTLID_DYNAMIC}, 0x182 | DNR, IATTR_DATA | 16),
        # unknown subsystem on an I/O queue: IPO points at subnqn
        ({"qid": 2, "cntlid": host.cntlid, "subnqn": SUBNQN + "x"}, 0x182 | DNR, IATTR_DATA | 256),
        # sqsize 0 and above CAP.MQES
        ({"qid": 2, "cntlid": host.cntlid, "sqsize": 0}, 0x182 | DNR, 44),
        ({"qid": 2, "cntlid": host.cntlid, "size": mqes + 2, "sqsize": mqes + 1}, 0x182 | DNR, 44),
        # qid above the subsystem's qid_max (128)
        ({"qid": 129, "cntlid": host.cntlid}, 0x182 | DNR, 42),
        # the queue already exists: Command Sequence Error (kernel nvmet_install_queue)
        ({"qid": 1, "cntlid": host.cntlid}, 0x00C | DNR, None),
    ]
    for kwargs, status, result in cases:
        cqe, _ = raw_connect(env, host, **kwargs)
        expect(cqe, status, result)
    # a different host may not attach queues to this controller
    stranger = env.host()
    cqe, _ = raw_connect(env, stranger, qid=2, cntlid=host.cntlid)
    expect(cqe, 0x182 | DNR, IATTR_DATA | 16)
    assert set(host.target.get_subsys(SUBNQN).ctrls[host.cntlid].sqs) == {0, 1}
    after(env, host)


def test_connect_host_not_allowed(env: LoopEnv) -> None:
    allowed = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-4000-8000-000000000001"
    env.add_subsystem(allowed_hosts=(allowed,), allow_any_host=False)
    cqe, _ = raw_connect(env, env.host())
    expect(cqe, 0x184 | DNR, IATTR_DATA | 512)
    assert not env.target.controllers()
    verify_io(env.connect(hostnqn=allowed))


def test_connect_out_of_cntlids(env: LoopEnv) -> None:
    env.add_subsystem(attr_cntlid_min=5, attr_cntlid_max=5)
    first = env.connect()
    assert first.cntlid == 5
    cqe, _ = raw_connect(env, env.host())
    expect(cqe, 0x181 | DNR)
    verify_io(first)
    first.disconnect()
    second = env.connect()  # the ID is free again once its controller is gone
    assert second.cntlid == 5
    verify_io(second)


def test_connect_qid_mismatch_with_queue(bad_env: LoopEnv, host: LoopHost) -> None:
    # the transport learnt qid 2 when the queue was set up (RDMA CM private data)
    q = host.open_queue(2, 32)
    cqe, _ = q.execute(fabrics_sqe(FabricsType.CONNECT, qid=3, sqsize=31),
                       data=ConnectData(host.hostid, host.cntlid, SUBNQN,
                                        host.hostnqn).encode())
    q.close()
    expect(cqe, 0x182 | DNR, 42)
    after(bad_env, host)


# -- state: before Connect, CC.EN = 0, shut down, second Connect -------------------------

@pytest.mark.parametrize("qid", [0, 1])
@pytest.mark.parametrize("opcode", [AdminOpcode.IDENTIFY, IoOpcode.READ, 0x7F])
def test_command_before_connect(bad_env: LoopEnv, qid: int, opcode: int) -> None:
    # REFERENCE.md wins over the kernel here: nvmet_parse_connect_cmd() answers
    # Invalid Opcode, REFERENCE.md §3 says Command Sequence Error.
    h = bad_env.host()
    q = h.open_queue(qid, 32)
    nsid = 0x04 if opcode == 0x7F else 1  # fabrics: Property Get, not Connect
    cqe, _ = q.execute(Sqe(opcode=opcode, nsid=nsid, cdw10=1), read_len=4096)
    q.close()
    expect(cqe, 0x00C | DNR)
    after(bad_env, bad_env.connect())


def test_commands_while_disabled(bad_env: LoopEnv) -> None:
    h = bad_env.host().connect(SUBNQN, enable=False)
    cqe, _ = h.admin_cmd(AdminOpcode.IDENTIFY, cdw10=1, read_len=4096, check=False)
    expect(cqe, 0x00C | DNR)
    cqe, _ = h.admin_cmd(AdminOpcode.KEEP_ALIVE, check=False)
    expect(cqe, 0x00C | DNR)
    # no I/O queue on a disabled controller
    cqe, _ = raw_connect(bad_env, h, qid=1, cntlid=h.cntlid)
    expect(cqe, 0x00C | DNR)
    # properties still work, and enabling makes the controller usable
    assert h.property_get(0x1C) & 1 == 0
    h.enable()
    q = h.open_queue(1, 32)
    h.connect_queue(q, SUBNQN, h.cntlid)
    h.io[1] = q
    verify_io(h)


def test_commands_after_shutdown(bad_env: LoopEnv, host: LoopHost) -> None:
    host.shutdown()
    assert host.property_get(0x1C) & 0xD == 0x8  # SHST complete, RDY clear
    cqe, _ = host.admin_cmd(AdminOpcode.IDENTIFY, cdw10=1, read_len=4096, check=False)
    expect(cqe, 0x00C | DNR)
    cqe, _ = host.io[1].execute(Sqe(opcode=IoOpcode.READ, nsid=1), read_len=512)
    expect(cqe, 0x00C | DNR)
    host.disconnect()
    after(bad_env, bad_env.connect())


@pytest.mark.parametrize("qid", [0, 1])
def test_second_connect_on_live_queue(bad_env: LoopEnv, host: LoopHost, qid: int) -> None:
    q = host.admin if qid == 0 else host.io[1]
    cntlid = NVME_CNTLID_DYNAMIC if qid == 0 else host.cntlid
    cqe, _ = q.execute(fabrics_sqe(FabricsType.CONNECT, qid=qid, sqsize=31),
                       data=ConnectData(host.hostid, cntlid, SUBNQN, host.hostnqn).encode())
    expect(cqe, 0x001 | DNR)
    after(bad_env, host)


# -- namespaces and LBAs -----------------------------------------------------------------

def io(host: LoopHost, opcode: int, nsid: int = 1, slba: int = 0, nlb: int = 1,
       **kw: object) -> Cqe:
    sqe = Sqe(opcode=opcode, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
              cdw12=nlb - 1)
    if opcode == IoOpcode.READ:
        kw.setdefault("read_len", nlb * 512)
    elif opcode == IoOpcode.WRITE:
        kw.setdefault("data", bytes(nlb * 512))
    cqe, _ = host.io[1].execute(sqe, **kw)
    return cqe


@pytest.mark.parametrize("nsid", [0, 9, 0xFFFFFFFF])
@pytest.mark.parametrize("opcode", [IoOpcode.READ, IoOpcode.WRITE, IoOpcode.FLUSH,
                                    IoOpcode.WRITE_ZEROES, 0x05])
def test_bad_nsid(bad_env: LoopEnv, host: LoopHost, nsid: int, opcode: int) -> None:
    expect(io(host, opcode, nsid=nsid), 0x00B | DNR)
    after(bad_env, host)


@pytest.mark.parametrize("cns", [0x00, 0x03])
@pytest.mark.parametrize("nsid", [0, 9, 0xFFFFFFFF])
def test_identify_bad_nsid(bad_env: LoopEnv, host: LoopHost, cns: int, nsid: int) -> None:
    cqe, data = host.admin_cmd(AdminOpcode.IDENTIFY, nsid=nsid, cdw10=cns, read_len=4096,
                               check=False)
    if cns == 0x00 and nsid == 9:
        expect(cqe, 0)  # an inactive NSID identifies as zeroes (kernel behaviour)
        assert data == bytes(4096)
    else:
        expect(cqe, 0x00B | DNR)
    after(bad_env, host)


@pytest.mark.parametrize("slba,nlb", [(NBLOCKS - 1, 2), (NBLOCKS, 1), (U64 - 1, 2),
                                      (U64 - 8, 16), (1 << 63, 1)])
@pytest.mark.parametrize("opcode", [IoOpcode.READ, IoOpcode.WRITE, IoOpcode.WRITE_ZEROES])
def test_lba_out_of_range(bad_env: LoopEnv, host: LoopHost, slba: int, nlb: int,
                          opcode: int) -> None:
    expect(io(host, opcode, slba=slba, nlb=nlb), 0x080 | DNR)
    after(bad_env, host)


def test_dsm_range_out_of_range(bad_env: LoopEnv, host: LoopHost) -> None:
    for slba, nlb in [(NBLOCKS - 1, 2), (U64 - 1, 2)]:
        data = (0).to_bytes(4, "little") + nlb.to_bytes(4, "little") + slba.to_bytes(8, "little")
        sqe = Sqe(opcode=IoOpcode.DSM, nsid=1, cdw10=0, cdw11=1 << 2)
        cqe, _ = host.io[1].execute(sqe, data=data)
        expect(cqe, 0x080 | DNR)
    after(bad_env, host)


# -- opcodes and fields ------------------------------------------------------------------

@pytest.mark.parametrize("opcode", [0x00, 0x01, 0x04, 0x05, 0x10, 0x80, 0xC0, 0xFF])
def test_unknown_admin_opcode(bad_env: LoopEnv, host: LoopHost, opcode: int) -> None:
    cqe, _ = host.admin_cmd(opcode, check=False)
    expect(cqe, 0x001 | DNR)
    after(bad_env, host)


@pytest.mark.parametrize("opcode", [0x04, 0x05, 0x0A, 0x0D, 0x80, 0xFF])
def test_unknown_io_opcode(bad_env: LoopEnv, host: LoopHost, opcode: int) -> None:
    expect(io(host, opcode), 0x001 | DNR)
    after(bad_env, host)


@pytest.mark.parametrize("fctype", [0x02, 0x05, 0x7F])
def test_unknown_fabrics_type(bad_env: LoopEnv, host: LoopHost, fctype: int) -> None:
    cqe, _ = host.admin.execute(fabrics_sqe(fctype))
    expect(cqe, 0x001 | DNR)
    after(bad_env, host)


@pytest.mark.parametrize("cns", [0x04, 0x05, 0x10, 0x13, 0xFF])
def test_bad_cns(bad_env: LoopEnv, host: LoopHost, cns: int) -> None:
    cqe, _ = host.admin_cmd(AdminOpcode.IDENTIFY, nsid=1, cdw10=cns, read_len=4096,
                            check=False)
    expect(cqe, 0x002 | DNR)
    after(bad_env, host)


@pytest.mark.parametrize("fid", [0x00, 0x03, 0x0C, 0x55, 0xFF])
@pytest.mark.parametrize("opcode", [AdminOpcode.GET_FEATURES, AdminOpcode.SET_FEATURES])
def test_bad_fid(bad_env: LoopEnv, host: LoopHost, fid: int, opcode: int) -> None:
    cqe, _ = host.admin_cmd(opcode, cdw10=fid, check=False)
    expect(cqe, 0x002 | DNR)
    after(bad_env, host)


@pytest.mark.parametrize("lid", [0x06, 0x42, 0x70, 0xC0, 0xFF])
def test_bad_lid(bad_env: LoopEnv, host: LoopHost, lid: int) -> None:
    cqe, _ = host.admin_cmd(AdminOpcode.GET_LOG_PAGE, cdw10=lid | 127 << 16, read_len=512,
                            check=False)
    expect(cqe, 0x002 | DNR)
    after(bad_env, host)


def test_bad_property(bad_env: LoopEnv, host: LoopHost) -> None:
    for fctype, fields in [(FabricsType.PROPERTY_GET, {"offset": 0x24}),
                           (FabricsType.PROPERTY_GET, {"attrib": 1, "offset": 0x14}),
                           (FabricsType.PROPERTY_SET, {"offset": 0x1C, "value": 1}),
                           (FabricsType.PROPERTY_SET, {"attrib": 1, "offset": 0x14})]:
        cqe, _ = host.admin.execute(fabrics_sqe(fctype, **fields))
        expect(cqe, 0x002 | DNR)
    after(bad_env, host)


@pytest.mark.parametrize("lpo,length", [(1024 * 3 + 4, 1024), (1 << 40, 1024), (2, 1024),
                                        (1022, 1024), (0, 2 << 20)])
def test_discovery_log_bad_offset(bad_env: LoopEnv, lpo: int, length: int) -> None:
    disc = bad_env.connect(NVME_DISC_SUBSYS_NAME, nr_io_queues=0)
    numd = length // 4 - 1
    cqe, _ = disc.admin_cmd(AdminOpcode.GET_LOG_PAGE, read_len=min(length, 1 << 20),
                            cdw10=lg.LogId.DISC | (numd & 0xFFFF) << 16, cdw11=numd >> 16,
                            cdw12=lpo & 0xFFFFFFFF, cdw13=lpo >> 32, check=False)
    expect(cqe, 0x002 | DNR)
    # the page ends at 3 KiB (header, current discovery, one subsystem): LPO there is fine
    assert disc.get_log_page(lg.LogId.DISC, 1024, lpo=3072) == bytes(1024)
    assert len(disc.discover()) == 2
    after(bad_env, bad_env.connect())


# -- SGLs, data lengths, flags ---------------------------------------------------------

def write_sgl(host: LoopHost, sgl: Sgl, payload: bytes = b"", nlb: int = 1,
              qid: int = 1) -> Cqe:
    q = host.io[qid] if qid else host.admin
    p = q.submit(Sqe(opcode=IoOpcode.WRITE, nsid=1, cdw12=nlb - 1), sgl=sgl, data=payload)
    cqe, _ = q.wait(p)
    return cqe


@pytest.mark.parametrize("offset", [4095, 8192, U64 - 512, INLINE - 511])
def test_inline_offset_invalid(bad_env: LoopEnv, host: LoopHost, offset: int) -> None:
    cqe = write_sgl(host, Sgl(SglType.DATA_BLOCK_OFFSET, offset, 512), bytes(INLINE))
    expect(cqe, 0x016 | DNR)
    after(bad_env, host)


def test_inline_beyond_what_arrived(bad_env: LoopEnv, host: LoopHost) -> None:
    # the descriptor claims 1024 in-capsule bytes, only 512 came with the capsule
    cqe = write_sgl(host, Sgl(SglType.DATA_BLOCK_OFFSET, 0, 1024), bytes(512), nlb=2)
    expect(cqe, 0x016 | DNR)
    after(bad_env, host)


def test_inline_connect_data(bad_env: LoopEnv, host: LoopHost) -> None:
    # admin queues have no in-capsule area (REFERENCE.md §1); I/O queues do
    h = bad_env.host()
    data = ConnectData(h.hostid, NVME_CNTLID_DYNAMIC, SUBNQN, h.hostnqn).encode()
    q = h.open_queue(0, 32)
    cqe, _ = q.execute(fabrics_sqe(FabricsType.CONNECT, qid=0, sqsize=31), data=data,
                       inline=True)
    q.close()
    expect(cqe, 0x016 | DNR)
    assert not bad_env.target.get_subsys(SUBNQN).ctrls.keys() - {host.cntlid}
    q = host.open_queue(2, 32)
    data = ConnectData(host.hostid, host.cntlid, SUBNQN, host.hostnqn).encode()
    cqe, _ = q.execute(fabrics_sqe(FabricsType.CONNECT, qid=2, sqsize=31), data=data,
                       inline=True)
    expect(cqe, 0, host.cntlid)
    host.io[2] = q
    verify_io(host)
    after(bad_env, host)


def test_inline_read_refused(bad_env: LoopEnv, host: LoopHost) -> None:
    q = host.io[1]
    p = q.submit(Sqe(opcode=IoOpcode.READ, nsid=1), sgl=Sgl(SglType.DATA_BLOCK_OFFSET, 0, 512))
    expect(q.wait(p)[0], 0x002 | DNR)  # in-capsule data flows host-to-controller only
    after(bad_env, host)


@pytest.mark.parametrize("sgl_type", [0x10, 0x20, 0x30, 0x50, 0x60, 0xE0, 0xF0])
def test_unknown_sgl_type(bad_env: LoopEnv, host: LoopHost, sgl_type: int) -> None:
    expect(write_sgl(host, Sgl(sgl_type, 0, 512), bytes(512)), 0x011 | DNR)
    after(bad_env, host)


@pytest.mark.parametrize("sgl_type", [0x00, 0x02, 0x41, 0x4E])
def test_bad_sgl_subtype(bad_env: LoopEnv, host: LoopHost, sgl_type: int) -> None:
    expect(write_sgl(host, Sgl(sgl_type, 0, 512, 1), bytes(512)), 0x002 | DNR)
    after(bad_env, host)


@pytest.mark.parametrize("opcode", [IoOpcode.READ, IoOpcode.WRITE])
def test_keyed_length_above_mdts(bad_env: LoopEnv, host: LoopHost, opcode: int) -> None:
    nlb = (1 << 20) // 512 + 1  # one block past MDTS (1 MiB)
    expect(io(host, opcode, nlb=nlb), 0x00F | DNR)
    after(bad_env, host)


@pytest.mark.parametrize("sgl_len", [0, 511, 513, 1024, 4096])
@pytest.mark.parametrize("opcode", [IoOpcode.READ, IoOpcode.WRITE])
def test_nlb_sgl_length_mismatch(bad_env: LoopEnv, host: LoopHost, sgl_len: int,
                                 opcode: int) -> None:
    q = host.io[1]
    buf = bytearray(max(sgl_len, 1))
    sgl = q.expose(buf)
    sgl.length = sgl_len
    p = q.submit(Sqe(opcode=opcode, nsid=1, cdw12=1), sgl=sgl)  # NLB 2 = 1024 bytes
    cqe, _ = q.wait(p)
    q.unexpose(sgl)
    expect(cqe, 0 if sgl_len == 1024 else 0x00F | DNR)
    after(bad_env, host)


def test_inline_length_mismatch(bad_env: LoopEnv, host: LoopHost) -> None:
    expect(write_sgl(host, Sgl(SglType.DATA_BLOCK_OFFSET, 0, 512), bytes(1024), nlb=2),
           0x00F | DNR)
    after(bad_env, host)


def test_keyed_unknown_rkey(bad_env: LoopEnv, host: LoopHost) -> None:
    expect(write_sgl(host, Sgl(SglType.KEYED_DATA_BLOCK, 0, 512, 0xDEAD)), 0x004 | DNR)
    after(bad_env, host)


def raw_flags(q: LoopQueue, sqe: Sqe, flags: int, cid: int = 0x1234) -> Cqe:
    sqe.flags, sqe.cid = flags, cid
    sqe.dptr = Sgl(SglType.KEYED_DATA_BLOCK, 0, 0, 0).encode()
    return q.raw(sqe.encode())


@pytest.mark.parametrize("flags", [0x01, 0x02, 0x03, 0x41, 0x42, 0x00, 0x80, 0xC0, 0x01 | 0x80])
@pytest.mark.parametrize("qid", [0, 1])
def test_fused_and_prp_flags(bad_env: LoopEnv, host: LoopHost, flags: int, qid: int) -> None:
    q = host.admin if qid == 0 else host.io[1]
    sqe = Sqe(opcode=AdminOpcode.KEEP_ALIVE) if qid == 0 else Sqe(opcode=IoOpcode.FLUSH, nsid=1)
    cqe = raw_flags(q, sqe, flags)
    assert cqe.cid == 0x1234
    expect(cqe, 0x002 | DNR)
    after(bad_env, host)


def test_fused_before_connect(bad_env: LoopEnv) -> None:
    # flags are checked first, as nvmet_req_init() does: even before Connect
    q = bad_env.host().open_queue(0, 32)
    expect(raw_flags(q, Sqe(opcode=AdminOpcode.KEEP_ALIVE), 0x01), 0x002 | DNR)
    q.close()


@pytest.mark.parametrize("length", [0, 1, 16, 63])
@pytest.mark.parametrize("qid", [0, 1])
def test_short_capsule(bad_env: LoopEnv, host: LoopHost, length: int, qid: int) -> None:
    # REFERENCE.md §1: a receive shorter than 64 bytes is a fatal queue error: no CQE,
    # the controller goes fatal and all its queues are torn down (nvmet_rdma_error_comp)
    q = host.admin if qid == 0 else host.io[1]
    before = dict(q.done)
    q.conn.submit(bytes(length))
    assert q.done == before, "a short capsule must not get a completion"
    assert not host.admin.connected and not host.io[1].connected
    assert host.cntlid not in bad_env.target.get_subsys(SUBNQN).ctrls
    after_fresh = bad_env.connect()
    verify_io(after_fresh)


def test_short_capsule_before_connect(bad_env: LoopEnv) -> None:
    q = bad_env.host().open_queue(1, 32)
    q.conn.submit(bytes(40))
    assert not q.connected and not q.done
    verify_io(bad_env.connect())


# -- every failure is in the error log ---------------------------------------------------

BAD_COMMANDS: list[tuple[str, Callable[[LoopHost], Cqe], int]] = [
    ("bad nsid", lambda h: io(h, IoOpcode.READ, nsid=0), 0x00B | DNR),
    ("lba range", lambda h: io(h, IoOpcode.READ, slba=NBLOCKS), 0x080 | DNR),
    ("opcode", lambda h: io(h, 0x80), 0x001 | DNR),
    ("sgl type", lambda h: write_sgl(h, Sgl(0x20, 0, 512), bytes(512)), 0x011 | DNR),
]


def test_failures_reach_error_log(bad_env: LoopEnv, host: LoopHost) -> None:
    from nvmet_p2p.wire.log import decode_error_log
    sent = []
    for _name, fn, status in BAD_COMMANDS:
        cqe = fn(host)
        expect(cqe, status)
        sent.append(cqe)
    entries = decode_error_log(host.get_log_page(lg.LogId.ERROR, 64 * 8))
    live = [e for e in entries if e.error_count]
    assert [e.status for e in live[:len(sent)]] == [c.status for c in reversed(sent)]
    assert [e.cmdid for e in live[:len(sent)]] == [c.cid for c in reversed(sent)]
    assert all(e.sqid == 1 for e in live[:len(sent)])
    assert [e.error_count for e in live[:len(sent)]] == list(range(len(sent), 0, -1))
    after(bad_env, host)
