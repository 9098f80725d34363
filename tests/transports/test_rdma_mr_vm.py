"""What rxe really does when asked to register P2P and dma-buf memory, in the soft-RoCE VM.

Run: python -m nvmet_p2p.testbed.vm pytest -q tests/test_rdma_mr_vm.py

* system memory: ibv_reg_mr succeeds (the fallback pool the transport always has);
* QEMU's NVMe CMB mapped through our VFIO driver: ibv_reg_mr is refused, and the reason
  names the verb, the CMB, rxe0 and the errno;
* a real dma-buf (udmabuf when the kernel has it, else a vgem buffer exported with PRIME):
  ibv_reg_dmabuf_mr is refused by rxe, with that reason.

Each outcome is printed ("RDMA MR OUTCOME ...") so the measured text can be quoted.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
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

pytestmark = pytest.mark.vm

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


def real_dmabuf(size: int) -> tuple[int, str]:
    """(fd, what made it): udmabuf if the kernel has it, else vgem; skip if neither works."""
    why = []
    if Path("/dev/udmabuf").exists():
        try:
            return _udmabuf(size)
        except OSError as e:
            why.append(f"udmabuf: {e}")
    else:
        why.append(f"/dev/udmabuf absent (kernel {os.uname().release} without CONFIG_UDMABUF)")
    try:
        return _vgem_dmabuf(size)
    except (OSError, VMError) as e:
        why.append(f"vgem: {e}")
    pytest.skip("no dma-buf exporter in this VM: " + "; ".join(why))


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


def test_reg_mr_on_the_vfio_mapped_cmb_is_refused(pd, cmb_backend):
    cmb = cmb_backend.cmb
    assert cmb is not None, cmb_backend.cmb_reason
    assert cmb.kind == "nvme-cmb" and cmb.mapping == "uc"
    reg, why = register_provider(pd, cmb, "rxe0")
    outcome(f"VFIO-mapped CMB {cmb.name}", reg, why)
    if reg is not None:
        reg.close()
    # ib_umem_get pins with pin_user_pages(FOLL_LONGTERM): a VFIO BAR mapping is
    # VM_IO|VM_PFNMAP, which GUP refuses with EFAULT.
    assert reg is None
    assert why == f"ibv_reg_mr on nvme-cmb {cmb_backend.bdf}/cmb failed on rxe0: " \
                  f"[Errno {errno.EFAULT}] Bad address"


def test_reg_dmabuf_mr_on_a_real_dmabuf(pd):
    fd, source = real_dmabuf(DMABUF_SIZE)
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
        # rxe (librxe of rdma-core 44, the 6.1 driver) implements no dma-buf MRs: the verb
        # is refused as unsupported, whatever the exporter.
        assert reg is None
        assert why == f"ibv_reg_dmabuf_mr on dma-buf {prov.name} failed on rxe0: " \
                      f"[Errno {errno.EOPNOTSUPP}] Operation not supported"
