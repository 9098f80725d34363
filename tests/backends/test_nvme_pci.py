"""NVMe PCIe register decode, PRP construction and ring logic, without hardware."""

from __future__ import annotations

import struct

import pytest

from nvmet_p2p.backends.vfio_nvme import nvme_pci as np_
from nvmet_p2p.backends.vfio_nvme.nvme_pci import (
    Cap,
    CmbInfo,
    CompletionRing,
    SubmissionRing,
    cmbmsc_value,
    cq_doorbell,
    prp_layout,
    prp_list_pages,
    prp_pages,
    rw_cdws,
    sq_doorbell,
)

QEMU_CAP = 0x024018200F0107FF  # measured on QEMU 7.2's nvme with cmb_size_mb=64


def test_cap_decode_golden():
    cap = Cap.decode(QEMU_CAP)
    assert cap == Cap(mqes=0x7FF, cqr=True, to_ms=15 * 500, dstrd=0, css_nvm=True, mpsmin=0,
                      mpsmax=4, cmbs=True)
    assert cap.doorbell_stride == 4
    assert Cap.decode(QEMU_CAP & ~(1 << 57)).cmbs is False
    assert Cap.decode(2 << 32).doorbell_stride == 16


def test_doorbell_offsets():
    assert (sq_doorbell(0, 0), cq_doorbell(0, 0)) == (0x1000, 0x1004)
    assert (sq_doorbell(1, 0), cq_doorbell(1, 0)) == (0x1008, 0x100C)
    assert (sq_doorbell(1, 2), cq_doorbell(1, 2)) == (0x1020, 0x1030)


def test_cc_and_aqa():
    assert np_.cc_value() == 0x460001
    assert np_.cc_value(enable=True, shutdown=True) == 0x464001
    assert np_.aqa_value(32, 32) == 0x001F001F


# CMBLOC/CMBSZ as QEMU 7.2 sets them once CMBMSC.CRE is written (cmb_size_mb=64):
# CMBLOC = CDPCILS|CDPMLS|BIR 2; CMBSZ = WDS|RDS|LISTS|SQS, SZU 2 (1 MiB), SZ 64.
QEMU_CMBLOC = 0x62
QEMU_CMBSZ = (64 << 12) | (2 << 8) | 0x1D


def test_cmb_decode_qemu_golden():
    info = CmbInfo.decode(QEMU_CMBLOC, QEMU_CMBSZ, bar_size=64 << 20)
    assert info == CmbInfo(bir=2, offset=0, size=64 << 20, declared_size=64 << 20, sqs=True,
                           cqs=False, lists=True, rds=True, wds=True, clipped=False)
    assert info.p2p_capable


@pytest.mark.parametrize("szu,unit", [(0, 4 << 10), (1, 64 << 10), (2, 1 << 20), (3, 16 << 20),
                                      (4, 256 << 20), (5, 4 << 30), (6, 64 << 30)])
def test_cmb_szu_scaling(szu, unit):
    info = CmbInfo.decode(0x3 | (2 << 12), (5 << 12) | (szu << 8) | 0x18, bar_size=1 << 40)
    assert (info.bir, info.offset, info.size) == (3, 2 * unit, 5 * unit)


def test_cmb_reserved_szu_rejected():
    with pytest.raises(ValueError, match="reserved"):
        CmbInfo.decode(0, (1 << 12) | (7 << 8), 1 << 20)


def test_cmb_clipped_to_bar_and_flags():
    # declares 128 MiB at 16 MiB into a 64 MiB BAR: 48 MiB usable
    info = CmbInfo.decode((16 << 12) | 2, (128 << 12) | (2 << 8) | 0x08, bar_size=64 << 20)
    assert (info.offset, info.size, info.declared_size, info.clipped) == (
        16 << 20, 48 << 20, 128 << 20, True)
    assert info.rds and not info.wds and not info.p2p_capable
    beyond = CmbInfo.decode((80 << 12) | 2, (8 << 12) | (2 << 8) | 0x18, bar_size=64 << 20)
    assert beyond.size == 0 and not beyond.p2p_capable


def test_cmbmsc_value():
    assert cmbmsc_value(0x8_0000_0000) == 0x8_0000_0003
    assert cmbmsc_value(0x1000, cmse=False) == 0x1001
    with pytest.raises(ValueError):
        cmbmsc_value(0x1234)


# -- PRPs ------------------------------------------------------------------------------------

P = 4096
LIST = 0x7000_0000


@pytest.mark.parametrize("addr,length,prp1,prp2,entries", [
    (0x10000, 512, 0x10000, 0, []),
    (0x10000, 4096, 0x10000, 0, []),
    (0x10200, 3584, 0x10200, 0, []),           # ends exactly at the page boundary
    (0x10200, 3585, 0x10200, 0x11000, []),     # one byte into the next page
    (0x10000, 8192, 0x10000, 0x11000, []),
    (0x10800, 8192, 0x10800, LIST, [0x11000, 0x12000]),  # unaligned 8 KiB spans three pages
    (0x10000, 16384, 0x10000, LIST, [0x11000, 0x12000, 0x13000]),
])
def test_prp_layout_small(addr, length, prp1, prp2, entries):
    assert prp_layout(addr, length, LIST) == (prp1, prp2, entries)


def test_prp_layout_exactly_one_full_list_page():
    # 513 pages: PRP1 + 512 entries = one whole list page, no chaining
    p1, p2, entries = prp_layout(0x100000, 513 * P, LIST)
    assert p1 == 0x100000 and p2 == LIST and len(entries) == 512
    assert entries == [0x100000 + i * P for i in range(1, 513)]


def test_prp_layout_chains_list_pages():
    pages = 1 + 511 + 511 + 3  # PRP1, two chained full pages, a last partial page
    p1, p2, entries = prp_layout(0x200000, pages * P, LIST)
    assert p1 == 0x200000 and p2 == LIST
    assert len(entries) == 512 + 512 + 3
    assert entries[511] == LIST + P and entries[1023] == LIST + 2 * P
    data = [e for i, e in enumerate(entries) if i not in (511, 1023)]
    assert data == [0x200000 + i * P for i in range(1, pages)]
    assert prp_list_pages(pages * P - 1) >= 3


@pytest.mark.parametrize("length", [4096, 8192, 12288, 65536, 1 << 20, 2 << 20, 3 << 20])
def test_prp_list_pages_is_enough(length):
    for off in (0, 0x200, 0xFFC):
        _, _, entries = prp_layout(0x400000 + off, length, LIST)
        assert len(entries) <= prp_list_pages(length) * (P // 8)


def test_prp_rejects_bad_input():
    with pytest.raises(ValueError, match="dword"):
        prp_pages(0x1002, 100)
    with pytest.raises(ValueError, match="positive"):
        prp_pages(0x1000, 0)
    with pytest.raises(ValueError, match="PRP list"):
        prp_layout(0x1000, 3 * P, None)


def test_rw_cdws():
    assert rw_cdws(0x1_2345_6789, 8, fua=True) == (0x2345_6789, 1, 7 | (1 << 30))
    with pytest.raises(ValueError):
        rw_cdws(0, 0)


# -- rings against a tiny simulated controller ----------------------------------------------


def test_sqe_packing_layout():
    buf = bytearray(64)
    np_.pack_sqe(buf, 0, 0x02, 0xBEEF, nsid=1, prp1=0x1000, prp2=0x2000, cdw10=5, cdw12=7)
    assert buf[0] == 0x02 and buf[1] == 0
    assert struct.unpack_from("<HI", buf, 2) == (0xBEEF, 1)
    assert struct.unpack_from("<QQ", buf, 24) == (0x1000, 0x2000)
    assert struct.unpack_from("<I", buf, 40)[0] == 5 and struct.unpack_from("<I", buf, 48)[0] == 7


def test_rings_wrap_with_phase_and_doorbells():
    depth = 4
    sq_mem, cq_mem = bytearray(depth * 64), bytearray(depth * 16)
    sq_db, cq_db = [], []
    sq = SubmissionRing(1, memoryview(sq_mem), depth, sq_db.append)
    cq = CompletionRing(1, memoryview(cq_mem), depth, cq_db.append)
    ctrl = {"sq_head": 0, "cq_tail": 0, "phase": 1}

    def controller_runs(n):  # consumes n SQEs and posts their CQEs
        for _ in range(n):
            cid = struct.unpack_from("<H", sq_mem, ctrl["sq_head"] * 64 + 2)[0]
            ctrl["sq_head"] = (ctrl["sq_head"] + 1) % depth
            struct.pack_into("<IIHHHH", cq_mem, ctrl["cq_tail"] * 16, cid * 10, 0,
                             ctrl["sq_head"], 1, cid, ctrl["phase"] | (0x2 << 1))
            ctrl["cq_tail"] += 1
            if ctrl["cq_tail"] == depth:
                ctrl["cq_tail"], ctrl["phase"] = 0, ctrl["phase"] ^ 1

    assert cq.reap() == [] and cq_db == []
    cid = 0
    for burst in (3, 2, 3, 1):
        for _ in range(burst):
            sq.push(0x02, cid)
            cid += 1
        sq.ring()
        assert sq_db[-1] == sq.tail
        controller_runs(burst)
        done = cq.reap()
        assert [c.cid for c in done] == list(range(cid - burst, cid))
        assert all(c.result == c.cid * 10 and c.status == 2 for c in done)
        sq.head = done[-1].sq_head
        assert cq_db[-1] == cq.head
    assert (cq.head, cq.phase) == (1, 1)  # 9 completions on a 4-deep CQ: wrapped twice


def test_sq_full_keeps_one_slot_free():
    sq = SubmissionRing(1, memoryview(bytearray(4 * 64)), 4, lambda t: None)
    for i in range(3):
        sq.push(0x00, i)
    with pytest.raises(OverflowError):
        sq.push(0x00, 3)
    sq.head = 2
    assert sq.free_slots() == 2


def test_reap_limit():
    mem = bytearray(4 * 16)
    cq = CompletionRing(0, memoryview(mem), 4, lambda h: None)
    for i in range(3):
        struct.pack_into("<IIHHHH", mem, i * 16, 0, 0, 0, 0, i, 1)
    assert [c.cid for c in cq.reap(limit=2)] == [0, 1]
    assert [c.cid for c in cq.reap()] == [2]
