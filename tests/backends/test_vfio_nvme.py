"""The userspace NVMe driver against QEMU's NVMe (1b36:0010, 64 MiB CMB) through VFIO, in the VM.

Also measures: CMB copy-in bandwidth through UC vs WC vs VFIO mappings, and 4 KiB read IOPS
at QD1/QD32.  Figures are printed and written to $NVMET_P2P_FIGURES (default
/tmp/vfio_nvme_figures.json).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import time
from pathlib import Path

import pytest

from nvmet_p2p.cmb import AccessRules, SysfsBarProvider, SystemMemoryProvider, copy_from, copy_into
from nvmet_p2p.errors import P2PError, VMError
from nvmet_p2p.testbed.guest import on_vfio, pci_driver, vfio_nvme_bdf
from tests.support.backend_io import COMPLETION_TIMEOUT_S as DEADLINE_S
from tests.support.backend_io import pattern, run

# tests that need the VM's emulated NVMe, VFIO and IOMMU
vm = pytest.mark.vm

SYS = Path("/sys/bus/pci/devices")
FIGURES: dict = {}


@pytest.fixture(scope="module")
def bdf():
    try:
        return vfio_nvme_bdf()
    except VMError as e:
        pytest.skip(str(e))


def _copy_bw(access: AccessRules, dst, n: int) -> float:
    """Best of three timed copies after a warm-up (TCG translates code on first use)."""
    data = pattern(n, 5)
    copy_into(dst, data[:65536], access)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        copy_into(dst, data, access)
        best = min(best, time.perf_counter() - t)
    return n / best / 1e6


@vm
def test_measure_sysfs_uc_vs_wc_copy_in(bdf):
    """CMB copy-in through resource2 (UC) and resource2_wc (WC), with no driver bound.

    Runs before the driver takes the device: with CONFIG_IO_STRICT_DEVMEM (Debian) sysfs
    BAR mmap is refused (EINVAL) while any driver has the BAR claimed.
    """
    before = pci_driver(bdf)
    if before:
        (SYS / bdf / "driver/unbind").write_text(bdf)
    try:
        n = 1 << 20
        res = {}
        data = pattern(n, 77)
        with SysfsBarProvider("/sys", bdf, 2, size=n) as uc, \
                SysfsBarProvider("/sys", bdf, 2, wc=True, size=n) as wc:
            assert uc.mapping == "uc" and uc.prefetchable
            assert wc.mapping == "wc", wc.wc_reason
            cu, cw = uc.alloc(n), wc.alloc(n)
            assert cu.offset == cw.offset == 0
            res["sysfs_uc_MBps"] = round(_copy_bw(uc.access, cu, n), 2)
            res["sysfs_wc_MBps"] = round(_copy_bw(wc.access, cw, n), 2)
            copy_into(cw, data, wc.access)
            t = time.perf_counter()
            assert copy_from(cu, uc.access) == data  # same BAR bytes through both mappings
            res["sysfs_uc_read_MBps"] = round(n / (time.perf_counter() - t) / 1e6, 2)
        FIGURES["cmb_copy_in"] = res
    finally:
        if before:
            (Path("/sys/bus/pci/drivers") / before / "bind").write_text(bdf)
            assert pci_driver(bdf) == before


@pytest.fixture(scope="module")
def ctrl(bdf):
    from nvmet_p2p.backends.vfio_nvme.backend import VfioNvmeBackend
    with on_vfio(bdf, VfioNvmeBackend) as backend:
        yield backend
        backend.close()  # close() is idempotent: on_vfio closes it again
    out = Path(os.environ.get("NVMET_P2P_FIGURES", "/tmp/vfio_nvme_figures.json"))
    out.write_text(json.dumps(FIGURES, indent=2) + "\n")
    print("\nFIGURES", json.dumps(FIGURES, indent=2))


@vm
def test_identify(ctrl):
    assert ctrl.block_size in (512, 4096)
    assert ctrl.nblocks >= (16 << 20) // ctrl.block_size
    assert "QEMU" in ctrl.id_ctrl.mn
    assert ctrl.cap.cmbs and ctrl.p2p_kinds and ctrl.p2p_client == ctrl.bdf
    FIGURES["ctrl"] = {"mn": ctrl.id_ctrl.mn.strip(), "mdts_kib": ctrl.max_xfer >> 10,
                       "block_size": ctrl.block_size, "nblocks": ctrl.nblocks}


@vm
@pytest.mark.parametrize("slba,nlb", [(0, 1), (7, 8), (100, 33), (1000, 2048 + 3)])
def test_write_read_system_memory(ctrl, slba, nlb):
    n = nlb * ctrl.block_size
    data = pattern(n, slba)
    assert run(ctrl, lambda cb: ctrl.submit_write(slba, nlb, memoryview(data), False, cb)) == 0
    back = bytearray(n)
    assert run(ctrl, lambda cb: ctrl.submit_read(slba, nlb, memoryview(back), cb)) == 0
    assert back == data


@vm
def test_zero_copy_from_a_mapped_provider(ctrl):
    with SystemMemoryProvider(1 << 20, slab_size=1 << 20, name="pool") as pool:
        ctrl.map_provider(pool)
        c = pool.alloc(16384)
        assert c.bus_addr is not None
        c.view[:] = pattern(16384, 99)
        bounced = ctrl.stats["bounced"]
        nlb = 16384 // ctrl.block_size
        assert run(ctrl, lambda cb: ctrl.submit_write(5000, nlb, c.view, True, cb)) == 0
        out = pool.alloc(16384)
        assert run(ctrl, lambda cb: ctrl.submit_read(5000, nlb, out.view, cb)) == 0
        assert ctrl.stats["bounced"] == bounced
        assert bytes(out.view) == bytes(c.view)
        ctrl.unmap_provider(pool)
        assert pool.region_bus_addrs() == [None]


@vm
def test_out_of_range_is_refused(ctrl):
    st = run(ctrl, lambda cb: ctrl.submit_read(ctrl.nblocks - 1, 2, memoryview(bytearray(
        2 * ctrl.block_size)), cb))
    assert st & 0x7FF == 0x080  # LBA out of range


@vm
def test_flush_write_zeroes_discard(ctrl):
    bs = ctrl.block_size
    data = pattern(8 * bs, 3)
    assert run(ctrl, lambda cb: ctrl.submit_write(200, 8, memoryview(data), False, cb)) == 0
    assert run(ctrl, ctrl.submit_flush) == 0
    assert run(ctrl, lambda cb: ctrl.submit_write_zeroes(202, 2, cb)) == 0
    back = bytearray(8 * bs)
    assert run(ctrl, lambda cb: ctrl.submit_read(200, 8, memoryview(back), cb)) == 0
    assert back == data[:2 * bs] + bytes(2 * bs) + data[4 * bs:]
    assert run(ctrl, lambda cb: ctrl.submit_discard([(204, 4)], cb)) == 0


@vm
def test_cmb_is_published(ctrl):
    cmb = ctrl.cmb
    assert cmb is not None, ctrl.cmb_reason
    assert cmb.kind == "nvme-cmb" and cmb.published and cmb.size == 64 << 20
    assert ctrl.cmb_info.wds and ctrl.cmb_info.rds and ctrl.cmb_info.bir == 2
    FIGURES["cmb"] = {"cba": hex(ctrl.cba), "size": cmb.size, "mapping": cmb.mapping}


@vm
def test_p2p_write_from_cmb_and_read_back(ctrl):
    cmb, bs = ctrl.cmb, ctrl.block_size
    if cmb is None:
        pytest.skip(ctrl.cmb_reason)
    n = 64 << 10
    nlb = n // bs
    data = pattern(n, 1234)
    chunk = cmb.alloc(n)
    try:
        assert chunk.bus_addr == ctrl.cba + chunk.offset
        copy_into(chunk, data, cmb.access)
        p2p = ctrl.stats["p2p"]
        assert run(ctrl, lambda cb: ctrl.submit_write_p2p(3000, nlb, chunk, False, cb)) == 0
        assert ctrl.stats["p2p"] == p2p + 1
        back = bytearray(n)
        assert run(ctrl, lambda cb: ctrl.submit_read(3000, nlb, memoryview(back), cb)) == 0
        assert back == data
        # and the other way: media -> CMB, read by the CPU
        other = pattern(n, 4321)
        assert run(ctrl, lambda cb: ctrl.submit_write(3200, nlb, memoryview(other), False,
                                                      cb)) == 0
        copy_into(chunk, bytes(n), cmb.access)
        assert run(ctrl, lambda cb: ctrl.submit_read_p2p(3200, nlb, chunk, cb)) == 0
        assert copy_from(chunk, cmb.access) == other
    finally:
        chunk.free()


@vm
def test_attach_polls_on_the_loop(ctrl):
    async def main():
        loop = asyncio.get_running_loop()
        ctrl.attach(loop)
        try:
            fut = loop.create_future()
            buf = bytearray(ctrl.block_size)
            ctrl.submit_read(0, 1, memoryview(buf), fut.set_result)
            return await asyncio.wait_for(fut, DEADLINE_S)
        finally:
            ctrl.detach()
    assert asyncio.run(main()) == 0


# -- figures ---------------------------------------------------------------------------------


@vm
def test_measure_cmb_copy_in_vfio(ctrl):
    if ctrl.cmb is None:
        pytest.skip(ctrl.cmb_reason)
    n = 1 << 20
    c = ctrl.cmb.alloc(n)
    try:
        FIGURES.setdefault("cmb_copy_in", {})["vfio_uc_MBps"] = round(
            _copy_bw(ctrl.cmb.access, c, n), 2)
    finally:
        c.free()


@vm
@pytest.mark.parametrize("qd", [1, 32])
def test_measure_4k_read_iops(ctrl, qd):
    bs = ctrl.block_size
    nlb = 4096 // bs
    span = min(ctrl.nblocks, (64 << 20) // bs) // nlb
    rng = random.Random(qd)
    with SystemMemoryProvider(qd * 4096, slab_size=qd * 4096, name="bench") as pool:
        ctrl.map_provider(pool)
        bufs = [pool.alloc(4096).view for _ in range(qd)]
        state = {"done": 0, "errors": 0}
        duration = 3.0
        stop = time.monotonic() + duration

        def issue(i):
            def cb(st, i=i):
                state["done"] += 1
                state["errors"] += bool(st)
                if time.monotonic() < stop:
                    issue(i)
            ctrl.submit_read(rng.randrange(span) * nlb, nlb, bufs[i], cb)

        t0 = time.monotonic()
        for i in range(qd):
            issue(i)
        assert ctrl.wait_idle(duration + DEADLINE_S)
        elapsed = time.monotonic() - t0
        ctrl.unmap_provider(pool)
    assert state["errors"] == 0 and state["done"] > 0
    FIGURES[f"read_4k_qd{qd}_iops"] = round(state["done"] / elapsed)


# -- host side: VFIO setup errors say what is wrong ------------------------------------------


def test_vfio_binding_absent_device(tmp_path):
    from nvmet_p2p.backends.vfio_nvme.vfio import VfioBinding
    (tmp_path / "bus/pci/devices").mkdir(parents=True)
    with pytest.raises(P2PError, match="no such PCI device"):
        VfioBinding("0000:00:0a.0", tmp_path)


@pytest.mark.parametrize("cls", ["0x010000", "0x020000", "0x010601"])
def test_vfio_nvme_refuses_a_device_that_is_not_nvme(tmp_path, cls):
    # taking a device from its driver is destructive: a wrong BDF (here a virtio disk,
    # a NIC, a SATA controller) must be refused before anything is unbound
    from nvmet_p2p.backends.vfio_nvme.backend import VfioNvmeBackend
    from nvmet_p2p.errors import BackendError
    dev = tmp_path / "bus/pci/devices/0000:00:0a.0"
    dev.mkdir(parents=True)
    (dev / "class").write_text(cls + "\n")
    (dev / "driver_override").write_text("(null)\n")
    with pytest.raises(BackendError, match="is not an NVMe controller"):
        VfioNvmeBackend("0000:00:0a.0", sysfs_root=str(tmp_path), dev_root=str(tmp_path))
    assert (dev / "driver_override").read_text() == "(null)\n"  # nothing was touched


def test_vfio_container_without_dev_vfio(tmp_path):
    from nvmet_p2p.backends.vfio_nvme.vfio import VfioContainer
    with pytest.raises(P2PError, match="missing"):
        VfioContainer(tmp_path)


def test_vfio_binding_busy_unbind_is_undone(tmp_path):
    from nvmet_p2p.backends.vfio_nvme.vfio import VfioBinding
    bdf = "0000:00:0a.0"
    dev = tmp_path / "bus/pci/devices" / bdf
    drivers = tmp_path / "bus/pci/drivers"
    (drivers / "nvme").mkdir(parents=True)
    (drivers / "vfio-pci").mkdir()
    dev.mkdir(parents=True)
    (dev / "driver").symlink_to(drivers / "nvme")
    (dev / "driver_override").write_text("")
    (drivers / "nvme/unbind").mkdir()  # writing to a directory fails like a busy unbind
    with pytest.raises(P2PError, match="unbind"):
        VfioBinding(bdf, tmp_path)
    assert (dev / "driver_override").read_text() == "\n"  # override undone on failure


def test_vfio_binding_no_iommu_group(tmp_path):
    from nvmet_p2p.backends.vfio_nvme.vfio import VfioBinding
    bdf = "0000:00:0a.0"
    dev = tmp_path / "bus/pci/devices" / bdf
    (tmp_path / "bus/pci/drivers/vfio-pci").mkdir(parents=True)
    dev.mkdir(parents=True)
    (dev / "driver").symlink_to(tmp_path / "bus/pci/drivers/vfio-pci")
    with VfioBinding(bdf, tmp_path) as b:  # already vfio-pci: left as found
        assert b.previous == "vfio-pci"
        with pytest.raises(P2PError, match="intel_iommu=on"):
            b.iommu_group()
    assert (dev / "driver").is_symlink()


@pytest.mark.parametrize("err", [errno.EAGAIN, errno.ENODEV])
def test_device_open_right_after_a_rebind_is_retried(monkeypatch, err):
    # vfio-pci may answer EAGAIN (reset lock) or ENODEV (device not in the group yet) for
    # a moment after a rebind; both are retried within OPEN_RETRY_S, other errors are not
    from types import SimpleNamespace

    from nvmet_p2p.backends.vfio_nvme import vfio
    calls: list[int] = []

    def ioctl(fd, req, arg=0, what=""):
        calls.append(req)
        if req == vfio.VFIO_GROUP_GET_DEVICE_FD and len(calls) < 3:
            raise P2PError(what) from OSError(err, os.strerror(err))
        if req == vfio.VFIO_DEVICE_GET_INFO:
            arg[:] = vfio._DEVICE_INFO.pack(vfio._DEVICE_INFO.size, 0, 9, 5)
        return 42
    monkeypatch.setattr(vfio, "_ioctl", ioctl)
    monkeypatch.setattr(vfio.time, "sleep", lambda s: None)
    dev = vfio.VfioDevice(SimpleNamespace(fd=7), "0000:00:0a.0")
    assert dev.fd == 42 and dev.num_regions == 9
    assert calls.count(vfio.VFIO_GROUP_GET_DEVICE_FD) == 3


def test_device_open_other_errors_are_not_retried(monkeypatch):
    from types import SimpleNamespace

    from nvmet_p2p.backends.vfio_nvme import vfio

    def ioctl(fd, req, arg=0, what=""):
        raise P2PError(what) from OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(vfio, "_ioctl", ioctl)
    with pytest.raises(P2PError):
        vfio.VfioDevice(SimpleNamespace(fd=7), "0000:00:0a.0")
