"""Identify structures: golden tables both ways, the offsets a Linux host relies on,
truncated input, and Hypothesis round trips."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nvmet_p2p.wire.command import Sqe
from nvmet_p2p.wire.identify import (
    ID_CTRL_LAYOUT,
    ID_NS_LAYOUT,
    LBAF_COUNT,
    POWER_STATE_LAYOUT,
    PSD_COUNT,
    Cns,
    IdCtrl,
    IdentifyCmd,
    IdNs,
    Lbaf,
    PowerState,
    active_ns_list,
    decode_ns_desc_list,
    decode_ns_list,
    ns_desc_list,
)
from tests.support.golden import golden, layout_strategy


def ascii_hex(s: str, width: int, pad: bytes = b" ") -> str:
    return s.encode().ljust(width, pad).hex()


# -- Identify Controller ---------------------------------------------------------------

SUBNQN = "nqn.2024-01.io.example:p2p"

# What the kernel target returns for an RDMA I/O controller, roughly.
ID_CTRL = IdCtrl(
    vid=0, ssvid=0, sn="1f2e3d4c5b6a7980", mn="Linux", fr="6.8.0", rab=6, ieee=0x001414,
    cmic=0x0B, mdts=8, cntlid=1, ver=0x00020000, oaes=0x900, ctratt=1, cntrltype=1,
    fguid=bytes(range(16)), acl=3, aerl=3, frmw=3, lpa=6, elpe=127, npss=0, kas=5,
    sqes=0x66, cqes=0x44, maxcmd=128, nn=1024, oncs=0x0D, vwc=1, awun=0xFFFF, sgls=0x100005,
    subnqn=SUBNQN, ioccsz=(64 + 8192) // 16, iorcsz=1, icdoff=0, fcatt=0, msdbd=1,
    anatt=10, anacap=0x47, anagrpmax=128, nanagrpid=128, mnan=0xFFFFFFFF,
    tnvmcap=(1 << 100) + 5, wctemp=0x157, cctemp=0x175,
    psd=[PowerState(max_power=0x9C4, entry_lat=0x10, exit_lat=0x4)],
)
ID_CTRL_BYTES = golden(4096, {
    4: ascii_hex("1f2e3d4c5b6a7980", 20),  # sn, space padded
    24: ascii_hex("Linux", 40),  # mn
    64: ascii_hex("6.8.0", 8),  # fr
    72: "06",  # rab
    73: "141400",  # ieee, LSB first
    76: "0b",  # cmic
    77: "08",  # mdts
    78: "0100",  # cntlid
    80: "00000200",  # ver 2.0
    92: "00090000",  # oaes
    96: "01000000",  # ctratt
    111: "01",  # cntrltype I/O
    112: bytes(range(16)).hex(),  # fguid
    258: "03",  # acl
    259: "03",  # aerl
    260: "03",  # frmw
    261: "06",  # lpa
    262: "7f",  # elpe
    266: "5701",  # wctemp
    268: "7501",  # cctemp
    280: "050000000000000000000000" "10000000",  # tnvmcap 2^100 + 5: 2^100 is byte 12, 0x10
    320: "0500",  # kas
    342: "0a",  # anatt
    343: "47",  # anacap
    344: "80000000",  # anagrpmax
    348: "80000000",  # nanagrpid
    512: "66",  # sqes
    513: "44",  # cqes
    514: "8000",  # maxcmd
    516: "00040000",  # nn
    520: "0d00",  # oncs
    525: "01",  # vwc
    526: "ffff",  # awun
    536: "05001000",  # sgls: SGL | keyed | offset
    540: "ffffffff",  # mnan
    768: ascii_hex(SUBNQN, 256, b"\0"),  # subnqn, NUL padded
    1792: "04020000",  # ioccsz (64 + 8192) / 16 = 516
    1796: "01000000",  # iorcsz
    1803: "01",  # msdbd
    2048: "c409",  # psd[0].max_power
    2052: "10000000",  # psd[0].entry_lat
    2056: "04000000",  # psd[0].exit_lat
})


def test_id_ctrl_golden() -> None:
    assert ID_CTRL.encode() == ID_CTRL_BYTES
    assert IdCtrl.decode(ID_CTRL_BYTES) == ID_CTRL


# (field, offset, size) that a Linux host reads: checked against bytes, not the table.
HOST_OFFSETS = [
    ("mdts", 77, 1), ("cntlid", 78, 2), ("ver", 80, 4), ("kas", 320, 2), ("sqes", 512, 1),
    ("cqes", 513, 1), ("maxcmd", 514, 2), ("nn", 516, 4), ("oncs", 520, 2), ("vwc", 525, 1),
    ("sgls", 536, 4), ("ioccsz", 1792, 4), ("iorcsz", 1796, 4), ("icdoff", 1800, 2),
    ("msdbd", 1803, 1), ("oacs", 256, 2), ("lpa", 261, 1), ("elpe", 262, 1),
    ("aerl", 259, 1), ("oaes", 92, 4), ("ctratt", 96, 4), ("cntrltype", 111, 1),
    ("cmic", 76, 1), ("anatt", 342, 1), ("anacap", 343, 1), ("anagrpmax", 344, 4),
    ("nanagrpid", 348, 4), ("mnan", 540, 4), ("fuses", 522, 2), ("awupf", 528, 2),
]


@pytest.mark.parametrize("name,offset,size", HOST_OFFSETS)
def test_id_ctrl_host_offsets(name: str, offset: int, size: int) -> None:
    marker = int.from_bytes(bytes(range(0xA1, 0xA1 + size)), "little")
    raw = IdCtrl(**{name: marker}).encode()
    base = IdCtrl().encode()
    assert raw[offset:offset + size] == bytes(range(0xA1, 0xA1 + size))
    assert raw[:offset] == base[:offset] and raw[offset + size:] == base[offset + size:]
    assert ID_CTRL_LAYOUT.offset(name) == offset


def test_id_ctrl_subnqn_at_768() -> None:
    raw = IdCtrl(subnqn="nqn.x").encode()
    assert raw[768:773] == b"nqn.x" and raw[773:1024] == bytes(251)
    assert raw[:768] == IdCtrl().encode()[:768]


def test_id_ctrl_strings_space_padded() -> None:
    raw = IdCtrl(sn="S", mn="M", fr="F").encode()
    assert raw[4:24] == b"S" + b" " * 19
    assert raw[24:64] == b"M" + b" " * 39
    assert raw[64:72] == b"F" + b" " * 7
    # an empty string is all spaces (never NUL: the host prints these fields)
    assert IdCtrl().encode()[4:24] == b" " * 20


def test_id_ctrl_decodes_nul_padded_strings() -> None:
    raw = bytearray(IdCtrl().encode())
    raw[24:64] = b"QEMU NVMe Ctrl".ljust(40, b"\0")
    assert IdCtrl.decode(bytes(raw)).mn == "QEMU NVMe Ctrl"


@pytest.mark.parametrize("kwargs", [
    {"sn": "x" * 21}, {"mn": "é"}, {"fr": "123456789"}, {"subnqn": "n" * 257},
    {"mdts": 256}, {"cntlid": -1}, {"nn": 2**32}, {"fguid": bytes(17)},
    {"psd": [PowerState()] * 33},
])
def test_id_ctrl_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        IdCtrl(**kwargs).encode()


@pytest.mark.parametrize("n", [0, 100, 4095])
def test_id_ctrl_truncated(n: int) -> None:
    with pytest.raises(ValueError):
        IdCtrl.decode(ID_CTRL_BYTES[:n])


def test_id_ctrl_psd_has_32_entries() -> None:
    assert len(IdCtrl().psd) == PSD_COUNT
    raw = IdCtrl(psd=[PowerState()] * 31 + [PowerState(max_power=0x0102)]).encode()
    assert raw[2048 + 31 * 32:2048 + 31 * 32 + 2] == b"\x02\x01"


POWER_STATE_BYTES = golden(32, {0: "c409", 3: "03", 4: "10000000", 8: "04000000",
                                12: "01020304", 16: "0500", 18: "06", 20: "0700", 22: "08"})


def test_power_state_golden() -> None:
    ps = PowerState(max_power=0x9C4, flags=3, entry_lat=0x10, exit_lat=4, read_tput=1,
                    read_lat=2, write_tput=3, write_lat=4, idle_power=5, idle_scale=6,
                    active_power=7, active_work_scale=8)
    raw = IdCtrl(psd=[ps]).encode()
    assert raw[2048:2080] == POWER_STATE_BYTES
    assert IdCtrl.decode(raw).psd[0] == ps


# -- Identify Namespace -------------------------------------------------------------------

NGUID = bytes.fromhex("0123456789abcdef0123456789abcdef")
EUI64 = bytes.fromhex("0011223344556677")

ID_NS = IdNs(nsze=0x200000, ncap=0x200000, nuse=0x1000, nsfeat=0x10, nlbaf=1, flbas=1,
             mc=0, dpc=0, dps=0, nmic=1, rescap=0xFF, fpi=0x80, dlfeat=0x09, nawun=7,
             nawupf=7, nacwu=0, nabsn=1, nabo=2, nabspf=3, noiob=0x100,
             nvmcap=0x40000000, npwg=7, npwa=7, npdg=7, npda=7, nows=0xFF,
             anagrpid=1, nsattr=1, nvmsetid=2, endgid=3, nguid=NGUID, eui64=EUI64,
             lbaf=[Lbaf(ms=0, ds=9, rp=0), Lbaf(ms=8, ds=12, rp=2)])
ID_NS_BYTES = golden(4096, {
    0: "0000200000000000",  # nsze
    8: "0000200000000000",  # ncap
    16: "0010000000000000",  # nuse
    24: "10",  # nsfeat: IO_OPT
    25: "01",  # nlbaf (0's based: 2 formats)
    26: "01",  # flbas: format 1
    30: "01",  # nmic: shared
    31: "ff",  # rescap
    32: "80",  # fpi
    33: "09",  # dlfeat
    34: "0700",  # nawun
    36: "0700",  # nawupf
    40: "0100",  # nabsn
    42: "0200",  # nabo
    44: "0300",  # nabspf
    46: "0001",  # noiob
    48: "00000040000000000000000000000000",  # nvmcap
    64: "0700", 66: "0700", 68: "0700", 70: "0700",  # npwg npwa npdg npda
    72: "ff00",  # nows
    92: "01000000",  # anagrpid
    99: "01",  # nsattr: write protected
    100: "0200",  # nvmsetid
    102: "0300",  # endgid
    104: NGUID.hex(),
    120: EUI64.hex(),
    128: "00000900",  # lbaf[0]: ms 0, ds 9 (512 B), rp 0
    132: "08000c02",  # lbaf[1]: ms 8, ds 12 (4 KiB), rp 2
})


def test_id_ns_golden() -> None:
    assert ID_NS.encode() == ID_NS_BYTES
    ns = IdNs.decode(ID_NS_BYTES)
    assert ns == ID_NS
    assert ns.lba_shift == 12  # FLBAS selects format 1


def test_id_ns_lbaf_padding() -> None:
    assert len(IdNs().lbaf) == LBAF_COUNT
    assert IdNs(lbaf=[Lbaf(ds=9)]) == IdNs(lbaf=[Lbaf(ds=9)] + [Lbaf()] * 63)
    with pytest.raises(ValueError):
        IdNs(lbaf=[Lbaf()] * 65)
    # NVMe 2.0: FLBAS bits 6:5 are the upper bits of the format index
    ns = IdNs(flbas=0x20 | 0x1, lbaf=[Lbaf()] * 17 + [Lbaf(ds=13)])
    assert ns.lba_shift == 13


@pytest.mark.parametrize("n", [0, 127, 4095])
def test_id_ns_truncated(n: int) -> None:
    with pytest.raises(ValueError):
        IdNs.decode(ID_NS_BYTES[:n])


# -- Identify command fields -----------------------------------------------------------------

def test_identify_cmd_from_sqe() -> None:
    raw = golden(64, {0: "06", 4: "01000000", 40: "03000700", 44: "0900000b"})
    cmd = IdentifyCmd.from_sqe(Sqe.decode(raw))
    assert cmd == IdentifyCmd(cns=Cns.NS_DESC_LIST, cntid=7, cnssid=9, csi=0x0B)


def test_cns_values() -> None:
    assert (Cns.NS, Cns.CTRL, Cns.NS_ACTIVE_LIST, Cns.NS_DESC_LIST) == (0, 1, 2, 3)
    assert Cns.NS_CS_INDEP == 8


# -- CNS 02h active NSID list ----------------------------------------------------------------

def test_active_ns_list_golden() -> None:
    raw = golden(4096, {0: "02000000", 4: "05000000", 8: "0a000000"})
    assert active_ns_list([10, 5, 1, 2, 5], start_after=1) == raw
    assert decode_ns_list(raw) == [2, 5, 10]


def test_active_ns_list_limits() -> None:
    assert active_ns_list([1, 2], start_after=2) == bytes(4096)
    assert decode_ns_list(bytes(4096)) == []
    many = active_ns_list(list(range(1, 3000)), start_after=100)
    assert decode_ns_list(many) == list(range(101, 1125))  # exactly 1024, ascending
    assert len(many) == 4096
    with pytest.raises(ValueError):
        active_ns_list([2**32], 0)
    with pytest.raises(ValueError):
        decode_ns_list(bytes(7))


@given(st.sets(st.integers(1, 0xFFFFFFFE), max_size=1100), st.integers(0, 0xFFFFFFFD))
def test_active_ns_list_roundtrip(nsids: set[int], start: int) -> None:
    want = sorted(n for n in nsids if n > start)[:1024]
    assert decode_ns_list(active_ns_list(list(nsids), start)) == want


# -- CNS 03h NS identification descriptors -----------------------------------------------------

UUID = bytes.fromhex("f81d4fae7dec11d0a76500a0c91e6bf6")
DESC_BYTES = golden(4096, {
    0: "01080000" + EUI64.hex(),
    12: "02100000" + NGUID.hex(),
    32: "03100000" + UUID.hex(),
    52: "04010000" "00",
})


def test_ns_desc_list_golden() -> None:
    assert ns_desc_list(eui64=EUI64, nguid=NGUID, uuid=UUID, csi=0) == DESC_BYTES
    assert decode_ns_desc_list(DESC_BYTES) == {"eui64": EUI64, "nguid": NGUID, "uuid": UUID,
                                               "csi": 0}


def test_ns_desc_list_partial() -> None:
    raw = golden(4096, {0: "03100000" + UUID.hex(), 20: "04010000" "02"})
    assert ns_desc_list(uuid=UUID, csi=2) == raw
    assert decode_ns_desc_list(raw) == {"uuid": UUID, "csi": 2}
    assert ns_desc_list() == bytes(4096)
    assert decode_ns_desc_list(bytes(4096)) == {}


def test_ns_desc_list_bad() -> None:
    with pytest.raises(ValueError):
        ns_desc_list(nguid=bytes(8))
    with pytest.raises(ValueError):  # EUI64 descriptor claiming 16 bytes
        decode_ns_desc_list(golden(64, {0: "01100000"}))
    with pytest.raises(ValueError):  # runs past the buffer
        decode_ns_desc_list(bytes.fromhex("02100000") + bytes(8))
    # an unknown type is skipped by its length
    raw = golden(64, {0: "7f020000abcd", 6: "04010000" "02"})
    assert decode_ns_desc_list(raw) == {"csi": 2}


@given(eui64=st.none() | st.binary(min_size=8, max_size=8),
       nguid=st.none() | st.binary(min_size=16, max_size=16),
       uuid=st.none() | st.binary(min_size=16, max_size=16), csi=st.none() | st.integers(0, 255))
def test_ns_desc_list_roundtrip(eui64: bytes | None, nguid: bytes | None, uuid: bytes | None,
                                csi: int | None) -> None:
    kw = {k: v for k, v in {"eui64": eui64, "nguid": nguid, "uuid": uuid, "csi": csi}.items()
          if v is not None}
    raw = ns_desc_list(**kw)
    assert len(raw) == 4096
    assert decode_ns_desc_list(raw) == kw


# -- Hypothesis round trips over whole structures ------------------------------------------------


power_states = st.builds(PowerState, **{f.name: st.integers(0, 2 ** (8 * f.size) - 1)
                                        for f in POWER_STATE_LAYOUT.fields})
lbafs = st.builds(Lbaf, ms=st.integers(0, 0xFFFF), ds=st.integers(0, 255), rp=st.integers(0, 3))


@settings(max_examples=60, deadline=None)
@given(values=layout_strategy(ID_CTRL_LAYOUT), psd=st.lists(power_states, max_size=4))
def test_id_ctrl_roundtrip(values: dict[str, Any], psd: list[PowerState]) -> None:
    ctrl = IdCtrl(**values, psd=psd)
    raw = ctrl.encode()
    assert len(raw) == 4096
    assert IdCtrl.decode(raw) == ctrl


@settings(max_examples=60, deadline=None)
@given(values=layout_strategy(ID_NS_LAYOUT), lbaf=st.lists(lbafs, max_size=64))
def test_id_ns_roundtrip(values: dict[str, Any], lbaf: list[Lbaf]) -> None:
    ns = IdNs(**values, lbaf=lbaf)
    raw = ns.encode()
    assert len(raw) == 4096
    assert IdNs.decode(raw) == ns


def test_dataclass_fields_match_layouts() -> None:
    import dataclasses
    assert [f.name for f in dataclasses.fields(IdCtrl)] == [*ID_CTRL_LAYOUT.names, "psd"]
    assert [f.name for f in dataclasses.fields(IdNs)] == [*ID_NS_LAYOUT.names, "lbaf"]


def test_lists_reassigned_after_construction() -> None:
    ctrl = IdCtrl()
    ctrl.psd = [PowerState(max_power=1)]  # what a caller filling fields one by one does
    assert IdCtrl.decode(ctrl.encode()).psd[0].max_power == 1
    ctrl.psd = [PowerState()] * 33
    with pytest.raises(ValueError):
        ctrl.encode()
    ns = IdNs()
    ns.lbaf = [Lbaf()] * 65
    with pytest.raises(ValueError):
        ns.encode()


DECODERS = [(IdCtrl.decode, 4096), (IdNs.decode, 4096), (decode_ns_desc_list, None),
            (decode_ns_list, None)]


@settings(max_examples=25, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("decode,size", DECODERS)
def test_garbage_decodes_or_raises_value_error(decode: Any, size: int | None,
                                               data: st.DataObject) -> None:
    # bytes from a drawn seed: a 4096-byte draw is too large for Hypothesis to shrink well
    raw = random.Random(data.draw(st.integers(0, 2**32 - 1))).randbytes(4096)
    try:
        decode(raw)
    except ValueError:
        assert size is None  # only the self-describing lists may refuse full-size garbage
    if size is not None:
        cut = data.draw(st.integers(0, size - 1))
        with pytest.raises(ValueError):
            decode(raw[:cut])
