"""Golden tables for SQEs, CQEs, SGL descriptors and the fabrics commands, both ways.

Golden bytes are written by hand from the spec / kernel struct offsets (never by
calling the encoder), then checked as encode(fields) == bytes and decode(bytes) == fields.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvmet_p2p.wire.command import (
    AdminOpcode,
    ConnectCmd,
    ConnectData,
    Cqe,
    FabricsType,
    IoOpcode,
    PropertyCmd,
    Psdt,
    Sgl,
    SglType,
    Sqe,
    connect_invalid_result,
    fabrics_sqe,
)
from nvmet_p2p.wire.sqe_layout import (
    CONNECT_IPO_DATA_CNTLID,
    CONNECT_IPO_DATA_HOSTNQN,
    CONNECT_IPO_DATA_SUBNQN,
    CONNECT_IPO_SQE_QID,
    CONNECT_IPO_SQE_RECFMT,
    CONNECT_IPO_SQE_SQSIZE,
)
from nvmet_p2p.wire.status import DNR, MORE, Status, status_name
from tests.support.golden import golden

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)

# -- SGL descriptors ----------------------------------------------------------------

SGL_TABLE = [
    # in-capsule data: offset 0x10, 512 bytes, type 0x01 (data block, offset subtype)
    (Sgl(SglType.DATA_BLOCK_OFFSET, 0x10, 0x200, 0),
     ("1000000000000000" "00020000" "000000" "01")),
    # keyed data block: addr, 24-bit length, 32-bit key, type 0x40
    (Sgl(SglType.KEYED_DATA_BLOCK, 0x1122334455667788, 0x100000, 0xAABBCCDD),
     ("8877665544332211" "000010" "ddccbbaa" "40")),
    # keyed, invalidate key: type 0x4F
    (Sgl(SglType.KEYED_DATA_BLOCK_INV, 0xFFFF000012345678, 0xFFFFFF, 0x01020304),
     ("78563412 0000ffff" "ffffff" "04030201" "4f")),
]


@pytest.mark.parametrize("sgl,hx", SGL_TABLE)
def test_sgl_golden(sgl: Sgl, hx: str) -> None:
    raw = bytes.fromhex(hx)
    assert len(raw) == 16
    assert sgl.encode() == raw
    assert Sgl.decode(raw) == sgl


def test_sgl_keyed_flag() -> None:
    assert Sgl(0x40).keyed and Sgl(0x4F).keyed
    assert not Sgl(0x01).keyed and not Sgl(0x00).keyed


@given(t=st.sampled_from([0x00, 0x01, 0x40, 0x4F, 0x5A]), addr=u64, key=u32,
       length=u32)
def test_sgl_roundtrip(t: int, addr: int, key: int, length: int) -> None:
    sgl = Sgl(t, addr, length & 0xFFFFFF, key) if t >> 4 == 4 else Sgl(t, addr, length, 0)
    assert Sgl.decode(sgl.encode()) == sgl


def test_sgl_truncated() -> None:
    with pytest.raises(ValueError):
        Sgl.decode(bytes(15))


# -- SQE / CQE --------------------------------------------------------------------------

READ_SQE = Sqe(opcode=IoOpcode.READ, flags=Psdt.SGL_MPTR_CONTIG << 6, cid=0x1234, nsid=1,
               dptr=bytes.fromhex("8877665544332211" "001000" "ddccbbaa" "40"),
               cdw10=0x10, cdw11=0x1, cdw12=7, cdw15=0xCAFEF00D)
READ_SQE_BYTES = golden(64, {
    0: "02",  # opcode
    1: "40",  # flags: PSDT 01b (SGL, MPTR contiguous)
    2: "3412",  # command id
    4: "01000000",  # nsid
    24: "8877665544332211 001000 ddccbbaa 40".replace(" ", ""),  # keyed SGL, 4 KiB
    40: "10000000",  # cdw10: SLBA low
    44: "01000000",  # cdw11: SLBA high
    48: "07000000",  # cdw12: NLB 0's based
    60: "0df0feca",  # cdw15
})


def test_sqe_golden() -> None:
    assert READ_SQE.encode() == READ_SQE_BYTES
    sqe = Sqe.decode(READ_SQE_BYTES)
    assert sqe == READ_SQE
    assert sqe.raw == READ_SQE_BYTES
    assert sqe.psdt == Psdt.SGL_MPTR_CONTIG and sqe.fuse == 0
    assert sqe.sgl == Sgl(0x40, 0x1122334455667788, 0x1000, 0xAABBCCDD)
    assert sqe.u8(0) == 2 and sqe.u16(2) == 0x1234 and sqe.u32(4) == 1
    assert sqe.u64(40) == 0x1_00000010  # SLBA as the kernel reads it


def test_sqe_all_fields_golden() -> None:
    sqe = Sqe(opcode=0xA5, flags=0x81, cid=0xBEEF, nsid=0xFFFFFFFF, cdw2=0x02020202,
              cdw3=0x03030303, mptr=0x0807060504030201, dptr=bytes(range(0x10, 0x20)),
              cdw10=0x0A, cdw11=0x0B, cdw12=0x0C, cdw13=0x0D, cdw14=0x0E, cdw15=0x0F)
    raw = golden(64, {0: "a581efbe", 4: "ffffffff", 8: "02020202", 12: "03030303",
                      16: "0102030405060708", 24: bytes(range(0x10, 0x20)).hex(),
                      40: "0a000000", 44: "0b000000", 48: "0c000000", 52: "0d000000",
                      56: "0e000000", 60: "0f000000"})
    assert sqe.encode() == raw
    assert Sqe.decode(raw) == sqe
    assert sqe.psdt == 2 and sqe.fuse == 1


@given(opcode=u8, flags=u8, cid=u16, nsid=u32, cdw2=u32, cdw3=u32, mptr=u64,
       dptr=st.binary(min_size=16, max_size=16), cdws=st.lists(u32, min_size=6, max_size=6))
def test_sqe_roundtrip(opcode: int, flags: int, cid: int, nsid: int, cdw2: int, cdw3: int,
                       mptr: int, dptr: bytes, cdws: list[int]) -> None:
    sqe = Sqe(opcode, flags, cid, nsid, cdw2, cdw3, mptr, dptr, *cdws)
    raw = sqe.encode()
    assert len(raw) == 64
    assert Sqe.decode(raw) == sqe
    # a receive buffer larger than the SQE (in-capsule data follows) decodes the same
    assert Sqe.decode(raw + b"\xff" * 100) == sqe


@pytest.mark.parametrize("n", [0, 1, 16, 63])
def test_sqe_truncated(n: int) -> None:
    with pytest.raises(ValueError):
        Sqe.decode(READ_SQE_BYTES[:n])


CQE_TABLE = [
    # Connect Invalid Parameters | DNR, phase 1: status field (0x4182 << 1) | 1 = 0x8305
    (Cqe(result=0x0001_0100, sq_head=5, sq_id=1, cid=0x1234,
         status=Status.CONNECT_INVALID_PARAM | DNR, phase=1),
     ("00010100 00000000" "0500" "0100" "3412" "0583")),
    # success, sq_head 0xFFFF (SQ flow control disabled), 64-bit result
    (Cqe(result=0x1122334455667788, sq_head=0xFFFF, sq_id=0, cid=0, status=0, phase=0),
     ("8877665544332211" "ffff" "0000" "0000" "0000")),
    # LBA out of range (0x080) | More: (0x2080 << 1) = 0x4100, phase 0
    (Cqe(status=Status.LBA_RANGE | MORE, cid=7), "0000000000000000 0000 0000 0700 0041"),
]


@pytest.mark.parametrize("cqe,hx", CQE_TABLE)
def test_cqe_golden(cqe: Cqe, hx: str) -> None:
    raw = bytes.fromhex(hx.replace(" ", ""))
    assert len(raw) == 16
    assert cqe.encode() == raw
    assert Cqe.decode(raw) == cqe
    slots = bytearray(b"\xee" * 48)  # written into the middle slot, neighbours untouched
    cqe.encode_into(memoryview(slots), 16)
    assert slots == b"\xee" * 16 + raw + b"\xee" * 16


@given(result=u64, head=u16, sqid=u16, cid=u16, status=st.integers(0, 0x7FFF),
       phase=st.integers(0, 1))
def test_cqe_roundtrip(result: int, head: int, sqid: int, cid: int, status: int,
                       phase: int) -> None:
    cqe = Cqe(result, head, sqid, cid, status, phase)
    assert Cqe.decode(cqe.encode()) == cqe


def test_cqe_truncated() -> None:
    with pytest.raises(ValueError):
        Cqe.decode(bytes(15))


# -- fabrics: Connect ---------------------------------------------------------------------

ADMIN_CONNECT_SGL = Sgl(SglType.KEYED_DATA_BLOCK, 0xFFFF8880_12345000, 1024, 0x1234)
ADMIN_CONNECT_BYTES = golden(64, {
    0: "7f",  # fabrics opcode
    1: "40",  # PSDT: SGL
    2: "0100",  # command id 1
    4: "01",  # fctype Connect
    24: "005034128088ffff" "000400" "34120000" "40",  # keyed SGL, 1024 bytes
    40: "0000",  # recfmt
    42: "0000",  # qid 0 (admin)
    44: "1f00",  # sqsize 31 (0's based)
    46: "00",  # cattr
    48: "c0d40100",  # kato 120000 ms
})


def test_connect_sqe_golden() -> None:
    sqe = fabrics_sqe(FabricsType.CONNECT, cid=1, sgl=ADMIN_CONNECT_SGL, recfmt=0, qid=0,
                      sqsize=31, cattr=0, kato=120000)
    assert sqe.encode() == ADMIN_CONNECT_BYTES
    got = Sqe.decode(ADMIN_CONNECT_BYTES)
    assert got.opcode == AdminOpcode.FABRICS and got.fctype == FabricsType.CONNECT
    assert got.sgl == ADMIN_CONNECT_SGL
    assert ConnectCmd.from_sqe(got) == ConnectCmd(recfmt=0, qid=0, sqsize=31, cattr=0,
                                                  kato=120000)
    assert not ConnectCmd.from_sqe(got).disable_sqflow


def test_io_connect_sqflow_disable() -> None:
    raw = golden(64, {0: "7f40", 2: "0200", 4: "01", 42: "0300", 44: "7f00", 46: "04"})
    cmd = ConnectCmd.from_sqe(Sqe.decode(raw))
    assert cmd == ConnectCmd(recfmt=0, qid=3, sqsize=127, cattr=4, kato=0)
    assert cmd.disable_sqflow
    # an SQE built from fields (no raw bytes) reads the same: cdw10 = recfmt | qid << 16,
    # cdw11 = sqsize | cattr << 16
    fields_only = Sqe(opcode=0x7F, flags=0x40, cid=2, nsid=1, cdw10=0x00030000,
                      cdw11=0x0004007F)
    assert ConnectCmd.from_sqe(fields_only) == cmd


@given(recfmt=u16, qid=u16, sqsize=u16, cattr=u8, kato=u32, cid=u16)
def test_connect_roundtrip(recfmt: int, qid: int, sqsize: int, cattr: int, kato: int,
                           cid: int) -> None:
    sqe = fabrics_sqe(FabricsType.CONNECT, cid=cid, recfmt=recfmt, qid=qid, sqsize=sqsize,
                      cattr=cattr, kato=kato)
    again = Sqe.decode(sqe.encode())
    assert again.cid == cid
    assert ConnectCmd.from_sqe(again) == ConnectCmd(recfmt, qid, sqsize, cattr, kato)


HOSTID = bytes.fromhex("00112233445566778899aabbccddeeff")
SUBNQN = "nqn.2014-08.org.nvmexpress:uuid:1"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:f00d"
CONNECT_DATA_BYTES = golden(1024, {
    0: HOSTID.hex(),
    16: "ffff",
    256: SUBNQN.encode().hex(),
    512: HOSTNQN.encode().hex(),
})


def test_connect_data_golden() -> None:
    cd = ConnectData(hostid=HOSTID, cntlid=0xFFFF, subnqn=SUBNQN, hostnqn=HOSTNQN)
    assert cd.encode() == CONNECT_DATA_BYTES
    assert ConnectData.decode(CONNECT_DATA_BYTES) == cd


def test_connect_data_io_queue_cntlid() -> None:
    raw = golden(1024, {16: "0700", 256: b"a".hex(), 512: b"b".hex()})
    assert ConnectData.decode(raw) == ConnectData(bytes(16), 7, "a", "b")


def test_connect_data_truncated_and_too_long() -> None:
    with pytest.raises(ValueError):
        ConnectData.decode(CONNECT_DATA_BYTES[:1023])
    with pytest.raises(ValueError):
        ConnectData(subnqn="n" * 256).encode()


nqn_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=223)


@given(hostid=st.binary(min_size=16, max_size=16), cntlid=u16, subnqn=nqn_text,
       hostnqn=nqn_text)
def test_connect_data_roundtrip(hostid: bytes, cntlid: int, subnqn: str, hostnqn: str) -> None:
    cd = ConnectData(hostid, cntlid, subnqn, hostnqn)
    assert ConnectData.decode(cd.encode()) == cd


def test_connect_ipo_offsets_match_layout() -> None:
    # The IPO values must point at the fields in the golden capsules above.
    assert ADMIN_CONNECT_BYTES[CONNECT_IPO_SQE_SQSIZE] == 0x1F
    assert (CONNECT_IPO_SQE_RECFMT, CONNECT_IPO_SQE_QID) == (40, 42)
    assert CONNECT_DATA_BYTES[CONNECT_IPO_DATA_CNTLID] == 0xFF
    assert CONNECT_DATA_BYTES[CONNECT_IPO_DATA_SUBNQN:].startswith(SUBNQN.encode())
    assert CONNECT_DATA_BYTES[CONNECT_IPO_DATA_HOSTNQN:].startswith(HOSTNQN.encode())
    assert connect_invalid_result(True, CONNECT_IPO_DATA_SUBNQN) == 0x0001_0100
    assert connect_invalid_result(False, CONNECT_IPO_SQE_SQSIZE) == 0x0000_002C


# -- fabrics: Property Get / Set -------------------------------------------------------------

def test_property_get_golden() -> None:
    raw = golden(64, {0: "7f40", 2: "0900", 4: "04", 40: "01", 44: "00000000"})
    assert fabrics_sqe(FabricsType.PROPERTY_GET, cid=9, attrib=1, offset=0).encode() == raw
    cmd = PropertyCmd.from_sqe(Sqe.decode(raw))
    assert cmd == PropertyCmd(attrib=1, offset=0, value=0)
    assert cmd.size == 8  # CAP is 8 bytes


def test_property_set_golden() -> None:
    raw = golden(64, {0: "7f40", 2: "0a00", 4: "00", 40: "00", 44: "14000000",
                      48: "0100460000000000"})
    sqe = fabrics_sqe(FabricsType.PROPERTY_SET, cid=10, attrib=0, offset=0x14,
                      value=0x460001)
    assert sqe.encode() == raw
    cmd = PropertyCmd.from_sqe(Sqe.decode(raw))
    assert cmd == PropertyCmd(attrib=0, offset=0x14, value=0x460001)
    assert cmd.size == 4


@given(attrib=u8, offset=u32, value=u64, set_=st.booleans())
def test_property_roundtrip(attrib: int, offset: int, value: int, set_: bool) -> None:
    fctype = FabricsType.PROPERTY_SET if set_ else FabricsType.PROPERTY_GET
    sqe = Sqe.decode(fabrics_sqe(fctype, attrib=attrib, offset=offset, value=value).encode())
    assert PropertyCmd.from_sqe(sqe) == PropertyCmd(attrib, offset, value if set_ else 0)


# -- status codes ------------------------------------------------------------------------------

# (name, value) as the kernel's include/linux/nvme.h defines NVME_SC_*
KERNEL_STATUS = [
    ("INVALID_OPCODE", 0x001), ("INVALID_FIELD", 0x002), ("DATA_XFER_ERROR", 0x004),
    ("INTERNAL", 0x006), ("INVALID_NS", 0x00B), ("CMD_SEQ_ERROR", 0x00C),
    ("SGL_INVALID_DATA", 0x00F), ("SGL_INVALID_TYPE", 0x011), ("SGL_INVALID_OFFSET", 0x016),
    ("LBA_RANGE", 0x080), ("NS_NOT_READY", 0x082), ("QID_INVALID", 0x101),
    ("QUEUE_SIZE", 0x102), ("ASYNC_LIMIT", 0x105), ("INVALID_LOG_PAGE", 0x109),
    ("FEATURE_NOT_SAVEABLE", 0x10D), ("CONNECT_FORMAT", 0x180),
    ("CONNECT_CTRL_BUSY", 0x181), ("CONNECT_INVALID_PARAM", 0x182),
    ("CONNECT_RESTART_DISC", 0x183), ("CONNECT_INVALID_HOST", 0x184),
    ("WRITE_FAULT", 0x280), ("READ_ERROR", 0x281),
]


@pytest.mark.parametrize("name,value", KERNEL_STATUS)
def test_status_values(name: str, value: int) -> None:
    assert Status[name] == value


def test_status_name() -> None:
    assert status_name(Status.INVALID_FIELD | DNR) == "INVALID_FIELD|DNR"
    assert status_name(Status.SUCCESS) == "SUCCESS"
    assert status_name(0x3FF | MORE) == "0x3ff|MORE"
    # CRD bits (12:11) are not part of the status code
    assert status_name(Status.LBA_RANGE | (1 << 11)) == "LBA_RANGE"
