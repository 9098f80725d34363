"""Log pages: golden tables both ways, Get Log Page fields, slice_log bounds, truncated
input, and Hypothesis round trips."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nvmet_p2p.wire.command import Sqe
from nvmet_p2p.wire.limits import NVME_DISC_SUBSYS_NAME
from nvmet_p2p.wire.log import (
    CHANGED_NS_OVERFLOW,
    DISC_ENTRY_LAYOUT,
    ERROR_ENTRY_LAYOUT,
    MAX_LOG_LEN,
    SMART_LAYOUT,
    Adrfam,
    AnaGroupDesc,
    AnaState,
    CmdEffects,
    CmdEffectsLog,
    DiscEntry,
    DiscLog,
    ErrorLogEntry,
    FwSlotLog,
    GetLogPageCmd,
    LidSupport,
    LogId,
    RdmaCms,
    RdmaPrtype,
    RdmaQptype,
    SmartLog,
    Subtype,
    SupportedLogPages,
    Treq,
    Trtype,
    ana_log,
    changed_ns_list,
    data_units,
    decode_ana_log,
    decode_changed_ns_list,
    decode_disc_log,
    decode_disc_log_header,
    decode_error_log,
    decode_rdma_tsas,
    disc_log,
    error_log,
    rdma_tsas,
    slice_log,
)
from tests.support.golden import golden, layout_strategy


def test_log_ids() -> None:
    assert [LogId.SUPPORTED, LogId.ERROR, LogId.SMART, LogId.FW_SLOT, LogId.CHANGED_NS,
            LogId.CMD_EFFECTS, LogId.ANA, LogId.DISC] == [0x00, 0x01, 0x02, 0x03, 0x04, 0x05,
                                                          0x0C, 0x70]


# -- Get Log Page command fields ------------------------------------------------------------

def test_get_log_page_fields_golden() -> None:
    raw = golden(64, {
        0: "02",  # opcode
        4: "ffffffff",  # nsid
        40: "70",  # lid: discovery
        41: "80",  # lsp 0, rae (bit 15 of cdw10)
        42: "ff00",  # numdl
        44: "0100",  # numdu
        46: "0200",  # lsi
        48: "00040000",  # lpol
        52: "01000000",  # lpou
        59: "02",  # csi (cdw14 bits 31:24)
    })
    cmd = GetLogPageCmd.from_sqe(Sqe.decode(raw))
    assert cmd == GetLogPageCmd(lid=0x70, lsp=0, rae=True, numd=0x100FF, lsi=2,
                                lpo=0x1_0000_0400, csi=2)
    assert cmd.length == 0x10100 * 4


def test_get_log_page_lsp_without_rae() -> None:
    raw = golden(64, {0: "02", 40: "0c01", 42: "ff03"})  # ANA, LSP 1 (RGO), 4 KiB
    cmd = GetLogPageCmd.from_sqe(Sqe.decode(raw))
    assert (cmd.lid, cmd.lsp, cmd.rae, cmd.numd, cmd.length, cmd.lpo) == (
        LogId.ANA, 1, False, 0x3FF, 4096, 0)


@given(lid=st.integers(0, 255), lsp=st.integers(0, 0x7F), rae=st.booleans(),
       numd=st.integers(0, 2**32 - 1), lsi=st.integers(0, 0xFFFF),
       lpo=st.integers(0, 2**64 - 1), csi=st.integers(0, 255))
def test_get_log_page_fields_roundtrip(lid: int, lsp: int, rae: bool, numd: int, lsi: int,
                                       lpo: int, csi: int) -> None:
    sqe = Sqe(opcode=0x02, cdw10=lid | lsp << 8 | rae << 15 | (numd & 0xFFFF) << 16,
              cdw11=numd >> 16 | lsi << 16, cdw12=lpo & 0xFFFFFFFF, cdw13=lpo >> 32,
              cdw14=csi << 24)
    cmd = GetLogPageCmd.from_sqe(Sqe.decode(sqe.encode()))
    assert cmd == GetLogPageCmd(lid, lsp, rae, numd, lsi, lpo, csi)
    assert cmd.length == (numd + 1) * 4


# -- slice_log --------------------------------------------------------------------------------

PAGE = bytes(range(1, 17))  # a 16-byte page

SLICE_TABLE = [
    (0, 16, PAGE),
    (0, 8, PAGE[:8]),
    (4, 8, PAGE[4:12]),
    (12, 8, PAGE[12:] + bytes(4)),  # past the end: zero-filled
    (16, 4, bytes(4)),  # LPO == page size: zeros, as the kernel allows
    (0, 32, PAGE + bytes(16)),
    (2, 4, None),  # not dword aligned
    (20, 4, None),  # past the end
    (2**63, 4, None),  # the unbounded-LPO case
    (0, 0, None),
    (0, -4, None),
    (-4, 4, None),
    (0, MAX_LOG_LEN + 4, None),  # never an unbounded zero fill
]


@pytest.mark.parametrize("lpo,length,want", SLICE_TABLE)
def test_slice_log(lpo: int, length: int, want: bytes | None) -> None:
    assert slice_log(PAGE, lpo, length) == want


def test_slice_log_limit() -> None:
    assert slice_log(PAGE, 0, 64, limit=64) == PAGE + bytes(48)
    assert slice_log(PAGE, 0, 68, limit=64) is None


@given(page=st.binary(max_size=64), lpo=st.integers(-8, 80), length=st.integers(-4, 100))
def test_slice_log_property(page: bytes, lpo: int, length: int) -> None:
    got = slice_log(page, lpo, length)
    if lpo % 4 or lpo < 0 or lpo > len(page) or length <= 0:
        assert got is None
    else:
        assert got is not None and len(got) == length
        assert (page + bytes(length))[lpo:lpo + length] == got


# -- supported log pages -----------------------------------------------------------------------

def test_supported_log_pages_golden() -> None:
    # NVMe base spec, Supported Log Pages: 256 dwords, the one for LID n at byte 4 * n;
    # bit 0 LSUPP, bit 1 IOS, bits 31:16 the LID's own parameters
    raw = golden(1024, {0x00: "01000000", 0x04: "01000000", 0x14: "01000000",
                        0x30: "03000000", 0x1C0: "0100ab00", 0x3FC: "01000000"})
    log = SupportedLogPages({0x00: LidSupport.LSUPP, 0x01: LidSupport.LSUPP,
                             0x05: LidSupport.LSUPP, 0x0C: LidSupport.LSUPP | LidSupport.IOS,
                             0x70: 0xAB << 16 | LidSupport.LSUPP, 0xFF: LidSupport.LSUPP})
    assert log.encode() == raw
    assert SupportedLogPages.decode(raw) == log
    assert SupportedLogPages().encode() == bytes(1024)
    assert SupportedLogPages.decode(bytes(1024)) == SupportedLogPages()
    assert (LidSupport.LSUPP, LidSupport.IOS) == (1, 2)


def test_supported_log_pages_bad() -> None:
    for lids in ({256: LidSupport.LSUPP}, {-1: LidSupport.LSUPP}, {0: 2**32}):
        with pytest.raises(ValueError):
            SupportedLogPages(lids).encode()
    with pytest.raises(ValueError, match="1024 bytes, got 1020"):
        SupportedLogPages.decode(bytes(1020))


@settings(max_examples=30)
@given(st.dictionaries(st.integers(0, 255), st.integers(1, 2**32 - 1), max_size=256))
def test_supported_log_pages_roundtrip(lids: dict[int, int]) -> None:
    log = SupportedLogPages(lids)
    assert SupportedLogPages.decode(log.encode()) == log


# -- error information --------------------------------------------------------------------------

ERROR_ENTRY = ErrorLogEntry(error_count=0x1122, sqid=1, cmdid=0x1234,
                            status_field=(0x4002 << 1), param_error_location=0x28,
                            lba=0x0102030405060708, nsid=5, vs=0xEE, trtype=1,
                            cs=0xAABBCCDD, trtype_spec_info=0x99)
ERROR_ENTRY_BYTES = golden(64, {
    0: "2211000000000000",  # error_count
    8: "0100",  # sqid
    10: "3412",  # cmdid
    12: "0480",  # status field: (Invalid Field | DNR) << 1
    14: "2800",  # parameter error location: byte 40 (cdw10)
    16: "0807060504030201",  # lba
    24: "05000000",  # nsid
    28: "ee",  # vendor specific
    29: "01",  # trtype RDMA
    32: "ddccbbaa00000000",  # command specific
    40: "9900",  # transport type specific
})


def test_error_entry_golden() -> None:
    assert ERROR_ENTRY.encode() == ERROR_ENTRY_BYTES
    assert ErrorLogEntry.decode(ERROR_ENTRY_BYTES) == ERROR_ENTRY
    assert ErrorLogEntry.decode(ERROR_ENTRY_BYTES).status == 0x4002  # Invalid Field | DNR


def test_error_log_page() -> None:
    second = ErrorLogEntry(error_count=0x1121, sqid=0, cmdid=1)
    raw = error_log([ERROR_ENTRY, second], slots=4)
    assert len(raw) == 256
    assert raw[:64] == ERROR_ENTRY_BYTES
    assert raw[64:128] == golden(64, {0: "2111000000000000", 10: "0100"})
    assert raw[128:] == bytes(128)
    assert decode_error_log(raw) == [ERROR_ENTRY, second]
    with pytest.raises(ValueError):
        error_log([second] * 3, slots=2)
    with pytest.raises(ValueError):
        decode_error_log(raw[:100])


@given(layout_strategy(ERROR_ENTRY_LAYOUT))
def test_error_entry_roundtrip(values: dict[str, Any]) -> None:
    e = ErrorLogEntry(**values)
    assert ErrorLogEntry.decode(e.encode()) == e


# -- SMART / health --------------------------------------------------------------------------------

SMART = SmartLog(critical_warning=0x04, temperature=0x0143, avail_spare=100, spare_thresh=10,
                 percent_used=3, endu_grp_crit_warn_sumry=1, data_units_read=0x1234,
                 data_units_written=2**127 + 1, host_reads=7, host_writes=8,
                 ctrl_busy_time=9, power_cycles=10, power_on_hours=11, unsafe_shutdowns=12,
                 media_errors=13, num_err_log_entries=14, warning_temp_time=15,
                 critical_comp_time=16, temp_sensor=[0x0140, 0, 0x0150],
                 thm_temp1_trans_count=17, thm_temp2_trans_count=18,
                 thm_temp1_total_time=19, thm_temp2_total_time=20)


def u128(v: int) -> str:
    return v.to_bytes(16, "little").hex()


SMART_BYTES = golden(512, {
    0: "04",  # critical warning: reliability degraded
    1: "4301",  # temperature 323 K
    3: "64",  # available spare 100 %
    4: "0a",
    5: "03",
    6: "01",
    32: "34120000000000000000000000000000",  # data units read
    48: "01000000000000000000000000000080",  # data units written 2^127 + 1
    64: u128(7), 80: u128(8), 96: u128(9), 112: u128(10), 128: u128(11), 144: u128(12),
    160: u128(13), 176: u128(14),
    192: "0f000000",  # warning temp time
    196: "10000000",
    200: "4001" "0000" "5001",  # temp sensors 1..3
    216: "11000000", 220: "12000000", 224: "13000000", 228: "14000000",
})


def test_smart_golden() -> None:
    assert SMART.encode() == SMART_BYTES
    assert SmartLog.decode(SMART_BYTES) == SMART


def test_data_units() -> None:
    assert data_units(0) == 0
    assert data_units(1) == 1  # rounded up
    assert data_units(512_000) == 1
    assert data_units(512_001) == 2
    assert data_units(10 * 512_000) == 10


@settings(max_examples=50)
@given(layout_strategy(SMART_LAYOUT), st.lists(st.integers(0, 0xFFFF), max_size=8))
def test_smart_roundtrip(values: dict[str, Any], temps: list[int]) -> None:
    s = SmartLog(**values, temp_sensor=temps)
    raw = s.encode()
    assert len(raw) == 512
    assert SmartLog.decode(raw) == s


def test_smart_bad() -> None:
    with pytest.raises(ValueError):
        SmartLog(temperature=0x10000).encode()
    with pytest.raises(ValueError):
        SmartLog(temp_sensor=[0x10000]).encode()
    with pytest.raises(ValueError):
        SmartLog(temp_sensor=[0] * 9)
    with pytest.raises(ValueError):
        SmartLog.decode(SMART_BYTES[:511])


# -- firmware slot ------------------------------------------------------------------------------------

FW_BYTES = golden(512, {
    0: "11",  # afi: slot 1 active, slot 1 next
    8: b"1.0     ".hex(),  # frs1, space padded
    24: b"ABCDEFGH".hex(),  # frs3 (frs2 empty: zeros)
})


def test_fw_slot_golden() -> None:
    fw = FwSlotLog(afi=0x11, frs=["1.0", "", "ABCDEFGH"])
    assert fw.encode() == FW_BYTES
    assert FwSlotLog.decode(FW_BYTES) == fw
    assert len(fw.frs) == 7


def test_fw_slot_bad() -> None:
    with pytest.raises(ValueError):
        FwSlotLog(frs=["123456789"]).encode()
    with pytest.raises(ValueError):
        FwSlotLog(frs=[""] * 8)
    with pytest.raises(ValueError):
        FwSlotLog.decode(FW_BYTES[:64])


@given(afi=st.integers(0, 255), frs=st.lists(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8)
    .map(lambda s: s.rstrip(" ")), max_size=7))
def test_fw_slot_roundtrip(afi: int, frs: list[str]) -> None:
    fw = FwSlotLog(afi, frs)
    assert FwSlotLog.decode(fw.encode()) == fw


# -- changed namespace list ----------------------------------------------------------------------------

def test_changed_ns_golden() -> None:
    raw = golden(4096, {0: "01000000", 4: "07000000", 8: "00010000"})
    assert changed_ns_list([7, 256, 1, 7]) == raw
    assert decode_changed_ns_list(raw) == [1, 7, 256]
    assert changed_ns_list([]) == bytes(4096)


def test_changed_ns_overflow() -> None:
    raw = changed_ns_list(list(range(1, 1026)))
    assert raw == golden(4096, {0: "ffffffff"})
    assert decode_changed_ns_list(raw) == [CHANGED_NS_OVERFLOW]
    exactly = changed_ns_list(list(range(1, 1025)))  # 1024 still fit
    assert decode_changed_ns_list(exactly) == list(range(1, 1025))
    with pytest.raises(ValueError):
        changed_ns_list([2**32])
    with pytest.raises(ValueError):
        decode_changed_ns_list(bytes(5))


@given(st.sets(st.integers(1, 0xFFFFFFFE), max_size=1030))
def test_changed_ns_roundtrip(nsids: set[int]) -> None:
    got = decode_changed_ns_list(changed_ns_list(list(nsids)))
    assert got == (sorted(nsids) if len(nsids) <= 1024 else [CHANGED_NS_OVERFLOW])


# -- command effects -------------------------------------------------------------------------------

def test_effects_golden() -> None:
    acs = [0] * 256
    acs[0x06] = CmdEffects.CSUPP  # identify
    acs[0x09] = CmdEffects.CSUPP | CmdEffects.CCC | CmdEffects.NIC  # set features
    iocs = [0] * 256
    iocs[0x01] = CmdEffects.CSUPP | CmdEffects.LBCC  # write
    iocs[0x02] = CmdEffects.CSUPP  # read
    raw = golden(4096, {24: "01000000", 36: "19000000", 1028: "03000000", 1032: "01000000"})
    log = CmdEffectsLog(acs, iocs)
    assert log.encode() == raw
    assert CmdEffectsLog.decode(raw) == log
    assert (CmdEffects.CSUPP, CmdEffects.LBCC, CmdEffects.NCC, CmdEffects.NIC,
            CmdEffects.CCC) == (1, 2, 4, 8, 16)


def test_effects_bad() -> None:
    with pytest.raises(ValueError):
        CmdEffectsLog(acs=[0] * 257)
    with pytest.raises(ValueError):
        CmdEffectsLog(acs=[2**32]).encode()
    with pytest.raises(ValueError):
        CmdEffectsLog.decode(bytes(2047))


@settings(max_examples=30)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=256),
       st.lists(st.integers(0, 2**32 - 1), max_size=256))
def test_effects_roundtrip(acs: list[int], iocs: list[int]) -> None:
    log = CmdEffectsLog(acs, iocs)
    assert CmdEffectsLog.decode(log.encode()) == log


# -- ANA ----------------------------------------------------------------------------------------------

ANA_GROUPS = [AnaGroupDesc(grpid=1, state=AnaState.OPTIMIZED, chgcnt=3, nsids=[2, 1]),
              AnaGroupDesc(grpid=2, state=AnaState.INACCESSIBLE)]
ANA_BYTES = bytes.fromhex(
    "0500000000000000" "0200" "000000000000"  # chgcnt 5, ngrps 2
    "01000000" "02000000" "0300000000000000" "01" + "00" * 15 +  # group 1, 2 NSIDs
    "01000000" "02000000"  # NSIDs 1, 2 (ascending)
    "02000000" "00000000" "0000000000000000" "03" + "00" * 15)  # group 2, none


def test_ana_golden() -> None:
    assert ana_log(5, ANA_GROUPS) == ANA_BYTES
    chg, groups = decode_ana_log(ANA_BYTES)
    assert chg == 5
    assert groups == [AnaGroupDesc(1, 1, 3, [1, 2]), AnaGroupDesc(2, 3, 0, [])]


def test_ana_rgo_and_truncated() -> None:
    raw = ana_log(5, ANA_GROUPS, rgo=True)
    assert len(raw) == 16 + 32 * 2
    assert decode_ana_log(raw)[1][0].nsids == []
    for n in (0, 15, 40, 50, len(ANA_BYTES) - 1):
        with pytest.raises(ValueError):
            decode_ana_log(ANA_BYTES[:n])


@settings(max_examples=40)
@given(chg=st.integers(0, 2**64 - 1), groups=st.lists(st.builds(
    AnaGroupDesc, grpid=st.integers(1, 2**32 - 1), state=st.sampled_from(list(AnaState)),
    chgcnt=st.integers(0, 2**64 - 1),
    nsids=st.lists(st.integers(1, 2**32 - 1), max_size=8).map(sorted)), max_size=5))
def test_ana_roundtrip(chg: int, groups: list[AnaGroupDesc]) -> None:
    assert decode_ana_log(ana_log(chg, groups)) == (chg, groups)


# -- discovery log ---------------------------------------------------------------------------------

SUBNQN = "nqn.2024-01.io.example:p2p"
RDMA_ENTRY = DiscEntry(trtype=Trtype.RDMA, adrfam=Adrfam.IPV4, subtype=Subtype.NVME,
                       treq=Treq.NOT_SPECIFIED, portid=1, cntlid=0xFFFF, asqsz=32,
                       trsvcid="4420", subnqn=SUBNQN, traddr="192.168.0.10",
                       tsas=rdma_tsas())
REFERRAL_ENTRY = DiscEntry(trtype=Trtype.TCP, adrfam=Adrfam.IPV6, subtype=Subtype.REFERRAL,
                           treq=Treq.NOT_REQUIRED | Treq.DISABLE_SQFLOW, portid=2,
                           trsvcid="8009", subnqn=NVME_DISC_SUBSYS_NAME, traddr="fe80::1")


def disc_entry_bytes(trtype: str, adrfam: str, subtype: str, treq: str, portid: str,
                     trsvcid: str, subnqn: str, traddr: str, tsas: str) -> str:
    return golden(1024, {
        0: trtype + adrfam + subtype + treq,
        4: portid,
        6: "ffff",  # cntlid: dynamic
        8: "2000",  # asqsz 32
        32: trsvcid.encode().hex(),  # NUL padded, as the kernel target writes it
        256: subnqn.encode().hex(),
        512: traddr.encode().hex(),
        768: tsas,
    }).hex()


DISC_BYTES = golden(1024, {
    0: "0700000000000000",  # genctr
    8: "0200000000000000",  # numrec
    16: "0000",  # recfmt
}) + bytes.fromhex(
    disc_entry_bytes("01", "01", "02", "00", "0100", "4420", SUBNQN, "192.168.0.10",
                     "010101" "0000000000" "0000")  # qptype, prtype, cms, rsvd, pkey
    + disc_entry_bytes("03", "02", "01", "06", "0200", "8009", NVME_DISC_SUBSYS_NAME, "fe80::1", ""))


def test_disc_log_golden() -> None:
    assert disc_log(7, [RDMA_ENTRY, REFERRAL_ENTRY]) == DISC_BYTES
    assert decode_disc_log(DISC_BYTES) == DiscLog(7, 2, 0, [RDMA_ENTRY, REFERRAL_ENTRY])
    assert decode_disc_log_header(DISC_BYTES[:1024]) == (7, 2, 0)


def test_disc_log_empty() -> None:
    raw = disc_log(1, [])
    assert raw == golden(1024, {0: "01"})
    assert decode_disc_log(raw) == DiscLog(1, 0, 0, [])


def test_disc_entry_defaults_match_kernel() -> None:
    e = DiscEntry()
    assert (e.cntlid, e.asqsz) == (0xFFFF, 32)
    assert decode_rdma_tsas(rdma_tsas()) == (RdmaQptype.CONNECTED, RdmaPrtype.NOT_SPECIFIED,
                                             RdmaCms.RDMA_CM, 0)
    assert (Trtype.RDMA, Trtype.TCP, Trtype.LOOP) == (1, 3, 254)
    assert (Adrfam.IPV4, Adrfam.IPV6, Adrfam.IB, Adrfam.FC, Adrfam.LOOP) == (1, 2, 3, 4, 254)
    assert (Subtype.REFERRAL, Subtype.NVME, Subtype.CURRENT_DISC) == (1, 2, 3)


def test_disc_entry_space_padded_peer() -> None:
    raw = bytearray(RDMA_ENTRY.encode())
    raw[32:64] = b"4420".ljust(32, b" ")
    raw[512:768] = b"192.168.0.10".ljust(256, b" ")
    assert DiscEntry.decode(bytes(raw)) == RDMA_ENTRY


def test_disc_log_truncated() -> None:
    for n in (0, 17, 1023, 1024, 2047, 3071):
        with pytest.raises(ValueError):
            decode_disc_log(DISC_BYTES[:n])
    with pytest.raises(ValueError):
        DiscEntry.decode(bytes(1023))
    # a header claiming 2^64-1 records is refused without allocating them
    with pytest.raises(ValueError):
        decode_disc_log(golden(1024, {8: "ffffffffffffffff"}))


def test_disc_entry_bad() -> None:
    with pytest.raises(ValueError):
        DiscEntry(trsvcid="x" * 33).encode()
    with pytest.raises(ValueError):
        DiscEntry(traddr="ü").encode()
    with pytest.raises(ValueError):
        DiscEntry(portid=0x10000).encode()


def test_disc_log_slices_like_a_host_reads() -> None:
    # header first, then the whole page: what nvme-cli / the kernel host do
    hdr = slice_log(DISC_BYTES, 0, 1024)
    assert hdr is not None and decode_disc_log_header(hdr) == (7, 2, 0)
    tail = slice_log(DISC_BYTES, 2048, 4096)
    assert tail is not None and DiscEntry.decode(tail) == REFERRAL_ENTRY
    assert tail[1024:] == bytes(3072)


@settings(max_examples=40)
@given(genctr=st.integers(0, 2**64 - 1),
       entries=st.lists(layout_strategy(DISC_ENTRY_LAYOUT).map(lambda v: DiscEntry(**v)),
                        max_size=3))
def test_disc_log_roundtrip(genctr: int, entries: list[DiscEntry]) -> None:
    raw = disc_log(genctr, entries)
    assert len(raw) == 1024 * (1 + len(entries))
    assert decode_disc_log(raw) == DiscLog(genctr, len(entries), 0, entries)


def test_lists_reassigned_after_construction() -> None:
    s = SmartLog()
    s.temp_sensor = [300]
    assert SmartLog.decode(s.encode()).temp_sensor == [300] + [0] * 7
    fw = FwSlotLog()
    fw.frs = ["a"] * 8
    with pytest.raises(ValueError):
        fw.encode()
    eff = CmdEffectsLog()
    eff.acs = [1]
    assert CmdEffectsLog.decode(eff.encode()).acs[:2] == [1, 0]


FIXED_DECODERS = [(ErrorLogEntry.decode, 64), (SmartLog.decode, 512), (FwSlotLog.decode, 512),
                  (CmdEffectsLog.decode, 4096), (DiscEntry.decode, 1024),
                  (decode_disc_log_header, 1024)]


@settings(max_examples=25, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("decode,size", FIXED_DECODERS)
def test_garbage_decodes_and_short_input_raises(decode: Any, size: int,
                                                data: st.DataObject) -> None:
    # bytes from a drawn seed: a size-byte draw is too large for Hypothesis to shrink well
    raw = random.Random(data.draw(st.integers(0, 2**32 - 1))).randbytes(size)
    decode(raw)  # any full-size input decodes
    with pytest.raises(ValueError):
        decode(raw[:data.draw(st.integers(0, size - 1))])


@settings(max_examples=50)
@given(st.binary(max_size=2048))
def test_variable_logs_raise_only_value_error(raw: bytes) -> None:
    for decode in (decode_ana_log, decode_disc_log, decode_error_log, decode_changed_ns_list):
        try:
            decode(raw)
        except ValueError:
            pass
