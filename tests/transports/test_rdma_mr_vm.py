"""What rxe really does when asked to register P2P and dma-buf memory, in the soft-RoCE VM.

Run: python -m nvmet_p2p.testbed.vm pytest -q tests/transports/test_rdma_mr_vm.py

* system memory: ibv_reg_mr succeeds (the fallback pool the transport always has);
* QEMU's NVMe CMB owned by our VFIO driver: on a kernel whose vfio-pci exports BARs as
  dma-bufs (the VM's 7.x) the CMB is offered as one and ibv_reg_dmabuf_mr is what rxe
  refuses; without that export (Debian 6.1) ibv_reg_mr on the VFIO mapping is refused; the
  reason names the verb, the CMB, rxe0 and the errno;
* real dma-bufs of system memory (udmabuf, a dma-heap buffer, a vgem buffer exported with
  PRIME, whichever the kernel has): ibv_reg_dmabuf_mr is refused by rxe, with that reason.

A P2P-capable RDMA NIC cannot exist here, so no registration of P2P memory succeeds in
this VM; the success path is covered with fake verbs (tests/transports/test_rdma_mr.py).
Each outcome is printed ("RDMA MR OUTCOME ...") so the measured text can be quoted.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmet_p2p.cmb import Provider, SystemMemoryProvider, buffer_address, copy_from, copy_into
from nvmet_p2p.errors import VMError
from nvmet_p2p.testbed.guest import (
    cmb_nvme_bdf,
    modprobe,
    on_vfio,
    setup_rxe,
)
from nvmet_p2p.transports.rdma_mr import REG_MR, register_provider

pytestmark = [pytest.mark.vm, pytest.mark.without_p2pdma]

SYS = Path("/sys/bus/pci/devices")
DMABUF_SIZE = 1 << 20

# <linux/udmabuf.h>: struct udmabuf_create {u32 memfd; u32 flags; u64 offset; u64 size}
UDMABUF_CREATE = 0x40187542  # _IOW('u', 0x42, struct udmabuf_create)
UDMABUF_FLAGS_CLOEXEC = 0x01
# <drm/drm.h>, <drm/drm_mode.h>
DRM_IOCTL_MODE_CREATE_DUMB = 0xC02064B2  # _IOWR('d', 0xB2, struct drm_mode_create_dumb)
DRM_IOCTL_PRIME_HANDLE_TO_FD = 0xC00C642D  # _IOWR('d', 0x2D, struct drm_prime_handle)
DRM_IOCTL_GEM_CLOSE = 0x40086409  # _IOW('d', 0x09, struct drm_gem_close)
DRM_RDWR = os.O_RDWR  # the PRIME flags are open(2) flags
DRM_CLOEXEC = os.O_CLOEXEC
# <linux/dma-heap.h>: struct dma_heap_allocation_data {u64 len; u32 fd; u32 fd_flags;
# u64 heap_flags}
DMA_HEAP_IOCTL_ALLOC = 0xC0184800  # _IOWR('H', 0x0, struct dma_heap_allocation_data)
DMA_HEAP_SYSTEM = Path("/dev/dma_heap/system")


class CreateDumb(ctypes.Structure):
    _fields_ = [("height", ctypes.c_uint32), ("width", ctypes.c_uint32),
                ("bpp", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("handle", ctypes.c_uint32), ("pitch", ctypes.c_uint32),
                ("size", ctypes.c_uint64)]


class PrimeHandle(ctypes.Structure):
    _fields_ = [("handle", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("fd", ctypes.c_int32)]


class DmabufProvider(Provider):
    """Memory behind a real dma-buf, CPU-mapped through the dma-buf fd, offered as that fd."""

    kind = "dma-buf"
    mapping = "wb"

    def __init__(self, fd: int, size: int, name: str) -> None:
        super().__init__()
        self.name, self.size, self._fd = name, size, fd
        try:
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        self._add_region(memoryview(mm), buffer_address(mm), None, mm)

    def dmabuf(self, region: int) -> tuple[int, int] | None:
        return self._fd, 0

    def _close_backing(self) -> None:
        os.close(self._fd)


def _udmabuf(size: int) -> tuple[int, str]:
    """A dma-buf over a sealed memfd, from /dev/udmabuf (CONFIG_UDMABUF)."""
    memfd = os.memfd_create("nvmet-p2p-udmabuf", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(memfd, size)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)  # udmabuf insists on it
        dev = os.open("/dev/udmabuf", os.O_RDWR)
        try:
            arg = bytearray(memfd.to_bytes(4, "little") +
                            UDMABUF_FLAGS_CLOEXEC.to_bytes(4, "little") +
                            (0).to_bytes(8, "little") + size.to_bytes(8, "little"))
            return fcntl.ioctl(dev, UDMABUF_CREATE, arg), "udmabuf"
        finally:
            os.close(dev)
    finally:
        os.close(memfd)  # the dma-buf holds the memfd's pages


def _vgem_card() -> Path | None:
    for card in sorted(Path("/sys/class/drm").glob("card[0-9]*")):
        if (card / "device").resolve().name == "vgem":
            return Path("/dev/dri") / card.name
    return None


def _vgem_dmabuf(size: int) -> tuple[int, str]:
    """A dma-buf of a vgem dumb buffer (shmem pages), exported with PRIME."""
    card = _vgem_card()
    if card is None:
        modprobe("vgem")
        card = _vgem_card()
    if card is None:
        raise VMError("vgem loaded but no /sys/class/drm/card* belongs to it")
    fd = os.open(card, os.O_RDWR)
    try:
        dumb = CreateDumb(height=size // 4096, width=1024, bpp=32)
        fcntl.ioctl(fd, DRM_IOCTL_MODE_CREATE_DUMB, dumb)
        try:
            prime = PrimeHandle(handle=dumb.handle, flags=DRM_RDWR | DRM_CLOEXEC)
            fcntl.ioctl(fd, DRM_IOCTL_PRIME_HANDLE_TO_FD, prime)
        finally:  # the exported dma-buf keeps the buffer alive on its own
            fcntl.ioctl(fd, DRM_IOCTL_GEM_CLOSE, dumb.handle.to_bytes(8, "little"))
        if dumb.size < size:
            os.close(prime.fd)
            raise VMError(f"vgem made a {dumb.size}-byte buffer, {size} asked for")
        return prime.fd, f"vgem {card.name}"
    finally:
        os.close(fd)


def _heap_dmabuf(size: int) -> tuple[int, str]:
    """A dma-buf from the system dma-heap (CONFIG_DMABUF_HEAPS_SYSTEM)."""
    dev = os.open(DMA_HEAP_SYSTEM, os.O_RDWR)
    try:
        arg = bytearray(struct.pack("=QIIQ", size, 0, os.O_RDWR | os.O_CLOEXEC, 0))
        fcntl.ioctl(dev, DMA_HEAP_IOCTL_ALLOC, arg)
        return struct.unpack("=QIIQ", arg)[1], "dma-heap system"
    finally:
        os.close(dev)


EXPORTERS = {"udmabuf": (_udmabuf, Path("/dev/udmabuf"), "CONFIG_UDMABUF"),
             "dma-heap": (_heap_dmabuf, DMA_HEAP_SYSTEM, "CONFIG_DMABUF_HEAPS_SYSTEM"),
             "vgem": (_vgem_dmabuf, None, "")}


def real_dmabuf(exporter: str, size: int) -> tuple[int, str]:
    """(fd, what made it) from `exporter`; skip, saying why, when this kernel has none."""
    make, dev, config = EXPORTERS[exporter]
    if dev is not None and not dev.exists():
        pytest.skip(f"{dev} absent (kernel {os.uname().release} without {config})")
    try:
        return make(size)
    except (OSError, VMError) as e:
        pytest.skip(f"no dma-buf from {exporter} in this VM: {e}")


def outcome(what: str, reg, why: str) -> None:
    verbs = reg.verbs_used if reg is not None else None
    print(f"\nRDMA MR OUTCOME {what}: registered={reg is not None} verbs={verbs} reason={why!r}")


@pytest.fixture(scope="module")
def pd() -> Iterator:
    from pyverbs.device import Context
    from pyverbs.pd import PD
    try:
        dev = setup_rxe()
    except VMError as e:
        pytest.skip(f"soft-RoCE unavailable: {e}")
    with Context(name=dev) as ctx, PD(ctx) as pd:
        yield pd


@pytest.fixture(scope="module")
def cmb_backend():
    from nvmet_p2p.backends.vfio_nvme.backend import VfioNvmeBackend
    try:
        bdf = cmb_nvme_bdf()
    except VMError as e:
        pytest.skip(str(e))
    if not (SYS / bdf / "iommu_group").exists():
        pytest.skip(f"{bdf} has no IOMMU group (the VM needs intel-iommu)")
    with on_vfio(bdf, VfioNvmeBackend) as backend:
        yield backend


def test_reg_mr_on_system_memory_succeeds(pd):
    with SystemMemoryProvider(8 << 20, hugepages=False, slab_size=4 << 20) as pool:
        reg, why = register_provider(pd, pool, "rxe0")
        outcome("system memory", reg, why)
        assert reg is not None, why
        try:
            assert why == ""
            assert reg.verbs_used == [REG_MR, REG_MR]
            assert len(reg.lkeys) == 2 and all(k > 0 for k in reg.lkeys)
            assert len(set(reg.lkeys)) == 2
            chunk = pool.alloc(4096)
            assert reg.sge_addr(chunk) == chunk.addr
        finally:
            reg.close()


def test_registering_the_vfio_owned_cmb_is_refused(pd, cmb_backend):
    cmb = cmb_backend.cmb
    assert cmb is not None, cmb_backend.cmb_reason
    assert cmb.kind == "nvme-cmb" and cmb.mapping == "uc"
    offered = cmb.dmabuf(0)
    reg, why = register_provider(pd, cmb, "rxe0")
    outcome(f"VFIO-owned CMB {cmb.name} (dma-buf: {offered or cmb.dmabuf_reason})", reg, why)
    if reg is not None:
        reg.close()
    assert reg is None
    where = f"on nvme-cmb {cmb_backend.bdf}/cmb failed on rxe0"
    if offered is None:
        # No VFIO dma-buf export in this kernel (6.1): ibv_reg_mr on the CPU mapping, and
        # ib_umem_get's pin_user_pages(FOLL_LONGTERM) refuses a VM_IO|VM_PFNMAP VFIO BAR
        # mapping with EFAULT.
        assert "VFIO_DEVICE_FEATURE_DMA_BUF" in cmb.dmabuf_reason
        assert why == f"ibv_reg_mr {where}: [Errno {errno.EFAULT}] Bad address"
    else:
        # vfio-pci exported the CMB as a dma-buf; rxe implements no dma-buf MRs.
        assert why == (f"ibv_reg_dmabuf_mr {where}: [Errno {errno.EOPNOTSUPP}] "
                       "Operation not supported")


def test_reg_mr_on_kernel_p2pmem_is_refused(pd):
    from nvmet_p2p.cmb import KernelP2pmemProvider
    from nvmet_p2p.p2p.topology import published_p2pmem
    published = [p for p in published_p2pmem() if p.published and p.allocatable]
    if not published:
        pytest.skip(f"no published p2pmem (kernel {os.uname().release} without "
                    "CONFIG_PCI_P2PDMA)")
    # Any published p2pmem with room will do: the first in bus order may be on vfio-pci
    # for this module, or taken by another user.
    bdf = next((p.bdf for p in published if p.available >= DMABUF_SIZE), None)
    assert bdf is not None, f"every published p2pmem is exhausted: {published}"
    with KernelP2pmemProvider("/sys", bdf, size=DMABUF_SIZE) as prov:
        reg, why = register_provider(pd, prov, "rxe0")
        outcome(f"kernel p2pmem {prov.name}", reg, why)
        if reg is not None:
            reg.close()
    # rxe pins user pages as system memory; ZONE_DEVICE P2P pages are refused
    assert reg is None
    assert why == (f"ibv_reg_mr on p2pmem {bdf}/p2pmem failed on rxe0: [Errno {errno.EFAULT}] "
                   "Bad address")


@pytest.mark.parametrize("exporter", sorted(EXPORTERS))
def test_reg_dmabuf_mr_on_a_real_dmabuf(pd, exporter):
    fd, source = real_dmabuf(exporter, DMABUF_SIZE)
    try:
        prov = DmabufProvider(fd, DMABUF_SIZE, source.replace(" ", ":"))
    except OSError as e:
        pytest.skip(f"cannot mmap the dma-buf from {source}: {e}")
    with prov:
        # The dma-buf is real memory: what the CPU writes through it reads back.
        chunk = prov.alloc(4096)
        copy_into(chunk, b"nvmet-p2p" * 8, prov.access)
        assert copy_from(chunk, prov.access, 0, 72) == b"nvmet-p2p" * 8
        reg, why = register_provider(pd, prov, "rxe0")
        outcome(f"dma-buf from {source}", reg, why)
        if reg is not None:
            reg.close()
        # rxe (librxe of rdma-core 44; the 6.1 and 7.x drivers) implements no dma-buf MRs:
        # the verb is refused as unsupported, whatever the exporter.
        assert reg is None
        assert why == f"ibv_reg_dmabuf_mr on dma-buf {prov.name} failed on rxe0: " \
                      f"[Errno {errno.EOPNOTSUPP}] Operation not supported"
