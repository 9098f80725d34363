"""P2P memory providers on the host: allocator, sysfs BAR/p2pmem over synthetic trees, copies."""

from __future__ import annotations

import logging
import random
import shutil
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from nvmet_p2p import cmb
from nvmet_p2p.cmb import (
    AccessRules,
    KernelP2pmemProvider,
    SysfsBarProvider,
    SystemMemoryProvider,
    copy_from,
    copy_into,
    read_p2pmem_info,
)
from nvmet_p2p.errors import P2PError

BDF = "0000:00:0a.0"


@pytest.fixture
def pool():
    p = SystemMemoryProvider(1 << 20, hugepages=False, slab_size=512 << 10)
    yield p
    p.close()


# -- allocator -------------------------------------------------------------------------------


def test_chunks_are_contiguous_aligned_and_disjoint(pool):
    sizes = [4096, 5000, 8192, 65536, 100, 12288]
    chunks = [pool.alloc(s) for s in sizes]
    spans = []
    for c, s in zip(chunks, sizes):
        assert c.size == s and len(c.view) == s
        rounded = max(4096, 1 << (s - 1).bit_length())
        assert c.offset % rounded == 0
        addr, length, _ = pool.regions()[c.region]
        assert c.addr == addr + c.offset and c.offset + s <= length
        spans.append((c.addr, c.addr + rounded))
        c.view[:] = bytes([len(spans)]) * s
    spans.sort()
    assert all(a_end <= b for (_, a_end), (b, _) in pairwise(spans))
    for i, c in enumerate(chunks, 1):
        assert bytes(c.view) == bytes([i]) * c.size  # no overlap clobbered anything


def test_exhaustion_is_counted_and_free_allows_realloc(pool):
    chunks = [pool.alloc(128 << 10) for _ in range(8)]
    assert all(chunks)
    assert pool.alloc(4096) is None
    assert pool.alloc(4096) is None
    cnt = pool.counters()
    assert cnt == {"size": 1 << 20, "available": 0, "allocated": 1 << 20,
                   "alloc_failures": 2, "allocs": 8}
    chunks[3].free()
    again = pool.alloc(100 << 10)
    assert again is not None and again.region == chunks[3].region
    assert again.offset == chunks[3].offset


def test_largest_chunk_is_limited_by_slab(pool):
    assert pool.alloc(1 << 20) is None  # two 512 KiB slabs, not one MiB contiguous
    assert pool.alloc(512 << 10) is not None
    assert pool.counters()["alloc_failures"] == 1


def test_free_coalesces_back_to_whole_regions(pool):
    rng = random.Random(7)
    live = []
    for _ in range(500):
        if live and rng.random() < 0.45:
            live.pop(rng.randrange(len(live))).free()
        else:
            c = pool.alloc(rng.choice([512, 4096, 9000, 32768]))
            if c is not None:
                live.append(c)
    for c in live:
        c.free()
    cnt = pool.counters()
    assert cnt["allocated"] == 0 and cnt["available"] == 1 << 20
    assert pool.alloc(512 << 10) and pool.alloc(512 << 10)


def test_double_free_and_double_close_are_idempotent(pool):
    c = pool.alloc(4096)
    c.free()
    c.free()
    assert pool.counters()["allocated"] == 0
    d = pool.alloc(4096)
    view = d.view
    pool.close()
    pool.close()
    d.free()  # after close: harmless
    with pytest.raises(ValueError):
        view[0]  # revoked at close
    with pytest.raises(P2PError, match="closed"):
        pool.alloc(4096)


def test_freed_chunk_view_is_revoked(pool):
    c = pool.alloc(4096)
    v = c.view
    c.free()
    with pytest.raises(ValueError):
        v[0] = 1


def test_non_power_of_two_region_is_fully_usable():
    p = SystemMemoryProvider(3 * 4096 + 8192, hugepages=False, slab_size=5 * 4096)
    try:
        assert p.counters()["available"] == 5 * 4096
        got = [p.alloc(4096) for _ in range(5)]
        assert all(got) and p.alloc(4096) is None
        assert sorted(c.offset for c in got) == [i * 4096 for i in range(5)]
    finally:
        p.close()


def test_hugepage_fallback_is_recorded():
    p = SystemMemoryProvider(2 << 20, hugepages=True, slab_size=2 << 20)
    try:
        assert p.hugepages or p.hugepages_reason  # either it worked or we know why not
    finally:
        p.close()


def test_region_bus_address_applies_to_chunks(pool):
    pool.set_region_bus_addr(0, 0x10_0000_0000)
    c = pool.alloc(8192)
    assert c.region == 0 and c.bus_addr == 0x10_0000_0000 + c.offset


# -- sysfs BAR -------------------------------------------------------------------------------

BAR_START = 0xFC00_0000
BAR_LEN = 1 << 20


def make_sysfs(tmp_path: Path, *, wc_file: bool, prefetch: bool = True) -> Path:
    dev = tmp_path / "bus/pci/devices" / BDF
    dev.mkdir(parents=True)
    flags = 0x14220C if prefetch else 0x140204
    lines = [f"0x{0:016x} 0x{0:016x} 0x{0:016x}"] * 6
    lines[2] = f"0x{BAR_START:016x} 0x{BAR_START + BAR_LEN - 1:016x} 0x{flags:016x}"
    (dev / "resource").write_text("\n".join(lines) + "\n")
    (dev / "resource2").write_bytes(b"\0" * BAR_LEN)
    if wc_file:
        (dev / "resource2_wc").write_bytes(b"\0" * BAR_LEN)
    return tmp_path


def test_bar_uc_by_default_even_if_prefetchable(tmp_path):
    root = make_sysfs(tmp_path, wc_file=True)
    with SysfsBarProvider(root, BDF, 2) as p:
        assert p.prefetchable and p.mapping == "uc" and p.wc_reason == "not requested"
        c = p.alloc(4096)
        c.view[:4] = b"abcd"
    # UC maps resource2, not the _wc file
    dev = root / "bus/pci/devices" / BDF
    assert (dev / "resource2").read_bytes()[c.offset:c.offset + 4] == b"abcd"
    assert (dev / "resource2_wc").read_bytes()[:4] == b"\0\0\0\0"


def test_bar_wc_when_asked_and_mappable(tmp_path):
    root = make_sysfs(tmp_path, wc_file=True)
    with SysfsBarProvider(root, BDF, 2, wc=True) as p:
        assert p.mapping == "wc" and p.wc_reason == ""
        p.alloc(4096).view[:2] = b"wc"
    assert (root / "bus/pci/devices" / BDF / "resource2_wc").read_bytes()[:2] == b"wc"


def test_bar_wc_requested_but_missing_falls_back_to_uc(tmp_path, caplog):
    root = make_sysfs(tmp_path, wc_file=False)
    with SysfsBarProvider(root, BDF, 2, wc=True) as p:
        assert p.mapping == "uc"
        assert "resource2_wc does not exist" in p.wc_reason
    assert "write-combining refused" in caplog.text


def test_bar_window_and_bus_offset(tmp_path):
    root = make_sysfs(tmp_path, wc_file=False)
    bus_offset = 0x1_0000_0000 - 0x2000_0000  # CPU = bus + offset, offset not zero
    with SysfsBarProvider(root, BDF, 2, offset=0x4000, size=0x8000, bus_offset=bus_offset) as p:
        assert (p.offset, p.size) == (0x4000, 0x8000)
        assert p.cpu_phys == BAR_START + 0x4000
        assert p.bus_addr == BAR_START + 0x4000 - bus_offset
        c1, c2 = p.alloc(4096), p.alloc(4096)
        assert {c1.bus_addr, c2.bus_addr} == {p.bus_addr + c1.offset, p.bus_addr + c2.offset}
        assert p.bus_addr + 0x8000 > max(c1.bus_addr, c2.bus_addr)
        # A sign error would put the bus address above the CPU address here.
        assert c1.bus_addr < p.cpu_phys + c1.offset
        c1.view[:3] = b"xyz"
    data = (root / "bus/pci/devices" / BDF / "resource2").read_bytes()
    assert data[0x4000 + c1.offset:0x4000 + c1.offset + 3] == b"xyz"


@pytest.mark.parametrize("kw,msg", [({"offset": 0x123}, "page-aligned"),
                                    ({"size": BAR_LEN + 4096}, "exceeds the BAR")])
def test_bar_bad_windows(tmp_path, kw, msg):
    root = make_sysfs(tmp_path, wc_file=False)
    with pytest.raises(P2PError, match=msg):
        SysfsBarProvider(root, BDF, 2, **kw)


def test_bar_unassigned_or_absent(tmp_path):
    root = make_sysfs(tmp_path, wc_file=False)
    with pytest.raises(P2PError, match="BAR 0 is not assigned"):
        SysfsBarProvider(root, BDF, 0)
    with pytest.raises(P2PError, match="cannot read"):
        SysfsBarProvider(root, "0000:00:0b.0", 2)


# -- kernel p2pmem ---------------------------------------------------------------------------


def make_p2pmem(tmp_path: Path, *, published="1", allocate=True, size=1 << 20) -> Path:
    d = tmp_path / "bus/pci/devices" / BDF / "p2pmem"
    d.mkdir(parents=True)
    (d / "size").write_text(f"{size}\n")
    (d / "available").write_text(f"{size - 4096}\n")
    (d / "published").write_text(published + "\n")
    if allocate:
        (d / "allocate").write_bytes(b"\0" * size)
    return tmp_path


def test_p2pmem_whose_driver_unbound_closes_itself(tmp_path, caplog):
    """The kernel revokes the mapping when the driver unbinds (a later touch is SIGBUS):
    the provider sees p2pmem/allocate gone, closes, and hands out nothing more."""
    root = make_p2pmem(tmp_path)
    p = KernelP2pmemProvider(root, BDF)
    c = p.alloc(4096)
    assert c is not None
    shutil.rmtree(root / "bus/pci/devices" / BDF / "p2pmem")
    with caplog.at_level(logging.WARNING, logger="nvmet_p2p.cmb"):
        assert p.alloc(4096) is None
    assert p.closed
    with pytest.raises(ValueError):  # its views are revoked: no touch reaches the mapping
        c.view[0]
    line = (f'event=p2pmem_revoked provider={BDF}/p2pmem reason="p2pmem/allocate is gone '
            f'(the device\'s driver unbound)"')
    assert [r.getMessage() for r in caplog.records] == [line]
    c.free()  # harmless after the close


def test_p2pmem_parse_and_map(tmp_path):
    root = make_p2pmem(tmp_path)
    info = read_p2pmem_info(root / "bus/pci/devices" / BDF / "p2pmem")
    assert info == {"size": 1 << 20, "available": (1 << 20) - 4096, "published": True}
    with KernelP2pmemProvider(root, BDF) as p:
        assert p.size == (1 << 20) - 4096 and p.kind == "p2pmem"
        c = p.alloc(8192)
        assert c.bus_addr is None
        c.view[:5] = b"hello"
    assert (root / "bus/pci/devices" / BDF / "p2pmem/allocate").read_bytes()[c.offset:][:5] == \
        b"hello"


def test_p2pmem_errors(tmp_path):
    (tmp_path / "bus/pci/devices" / BDF).mkdir(parents=True)
    with pytest.raises(P2PError, match="CONFIG_PCI_P2PDMA"):
        KernelP2pmemProvider(tmp_path, BDF)
    with pytest.raises(P2PError, match="no such PCI device"):
        KernelP2pmemProvider(tmp_path, "0000:01:00.0")


def test_p2pmem_unpublished_or_no_allocate(tmp_path):
    with pytest.raises(P2PError, match="not published"):
        KernelP2pmemProvider(make_p2pmem(tmp_path / "a", published="0"), BDF)
    with pytest.raises(P2PError, match="Linux >= 6.2"):
        KernelP2pmemProvider(make_p2pmem(tmp_path / "b", allocate=False), BDF)


# -- copies under access rules ---------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 2, 4, 8])
@pytest.mark.parametrize("offset,length", [(0, 4096), (0, 4093), (3, 100), (4090, 6), (5, 0)])
def test_fixed_width_copies_produce_identical_bytes(width, offset, length):
    dst = bytearray(b"\xee" * 8192)
    data = bytes(random.Random(length).randrange(256) for _ in range(length))
    copy_into(dst, data, AccessRules(width=width), offset=offset)
    assert dst[offset:offset + length] == data
    assert dst[:offset] == b"\xee" * offset  # ragged edges kept what was there
    assert dst[offset + length:] == b"\xee" * (8192 - offset - length)
    assert copy_from(dst, AccessRules(width=width), offset, length) == data


def test_stores_are_aligned_to_width(monkeypatch):
    seen = []
    real = cmb._store
    monkeypatch.setattr(cmb, "_store", lambda v, off, src: (seen.append((off, src.dtype)),
                                                            real(v, off, src)))
    dst = bytearray(64)
    copy_into(dst, b"abcdefghij", AccessRules(width=4), offset=2)
    assert seen == [(0, np.dtype(np.uint32))]
    assert dst[2:12] == b"abcdefghij" and dst[:2] == b"\0\0" and dst[12:] == bytes(52)


def test_block_mode_writes_whole_ordered_blocks(monkeypatch):
    seen = []
    real = cmb._store
    monkeypatch.setattr(cmb, "_store", lambda v, off, src: (seen.append((off, src.nbytes)),
                                                            real(v, off, src)))
    dst = bytearray(b"\x11" * 16384)
    data = bytes(range(256)) * 37  # 9472 bytes: two blocks and a partial third
    copy_into(dst, data, AccessRules(width=8, block=4096), offset=1000)
    assert seen == [(0, 4096), (4096, 4096), (8192, 4096)]
    assert dst[1000:1000 + len(data)] == data
    assert dst[:1000] == b"\x11" * 1000 and dst[1000 + len(data):] == b"\x11" * (
        16384 - 1000 - len(data))


def test_copy_bounds_and_rules_are_checked():
    with pytest.raises(ValueError, match="overruns"):
        copy_into(bytearray(16), b"x" * 17, AccessRules())
    with pytest.raises(ValueError, match="whole number"):
        copy_into(bytearray(4100), b"x", AccessRules(block=4096), offset=4099)
    with pytest.raises(ValueError):
        AccessRules(width=3)
    with pytest.raises(ValueError):
        AccessRules(width=8, block=100)


def test_copy_into_chunk(pool):
    c = pool.alloc(4096)
    copy_into(c, b"\x5a" * 4096, AccessRules())
    assert bytes(c.view) == b"\x5a" * 4096
    cmb.wmb()  # callable, no effect to observe beyond ordering
