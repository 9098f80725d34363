"""VFIO for a userspace PCI driver: driver binding, container, group, device, regions, DMA.

Owns: handing a PCI function to vfio-pci and back to its previous driver (`VfioBinding`),
the type1v2 IOMMU container with its DMA mappings (`VfioContainer`), the IOMMU group
(`VfioGroup`), the device fd with its region mmaps, config space and reset (`VfioDevice`).
ioctls go through `fcntl.ioctl` with struct-packed arguments from <linux/vfio.h>.
Every resource is a context manager with an idempotent `close()`; a parent closes its
children first (container → groups → devices, device → region mappings).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct
import subprocess
import time
from pathlib import Path
from typing import Self

from nvmet_p2p import logfmt
from nvmet_p2p.cmb import buffer_address
from nvmet_p2p.errors import P2PError

log = logging.getLogger(__name__)

# <linux/vfio.h>: _IO(VFIO_TYPE ';', VFIO_BASE 100 + n)
_VFIO = ord(";") << 8 | 100
VFIO_GET_API_VERSION = _VFIO + 0
VFIO_CHECK_EXTENSION = _VFIO + 1
VFIO_SET_IOMMU = _VFIO + 2
VFIO_GROUP_GET_STATUS = _VFIO + 3
VFIO_GROUP_SET_CONTAINER = _VFIO + 4
VFIO_GROUP_UNSET_CONTAINER = _VFIO + 5
VFIO_GROUP_GET_DEVICE_FD = _VFIO + 6
OPEN_RETRY_S = 5.0  # how long a just-rebound device may answer EAGAIN or ENODEV at open
_OPEN_RETRY_ERRNOS = (errno.EAGAIN, errno.ENODEV)
VFIO_DEVICE_GET_INFO = _VFIO + 7
VFIO_DEVICE_GET_REGION_INFO = _VFIO + 8
VFIO_DEVICE_RESET = _VFIO + 11
VFIO_IOMMU_MAP_DMA = _VFIO + 13
VFIO_IOMMU_UNMAP_DMA = _VFIO + 14
VFIO_DEVICE_FEATURE = _VFIO + 17
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_DMA_BUF = 11  # vfio-pci exports BAR ranges as dma-bufs (7.x, not 6.1)

VFIO_API_VERSION = 0
VFIO_TYPE1v2_IOMMU = 3
VFIO_GROUP_FLAGS_VIABLE = 1
VFIO_DEVICE_FLAGS_RESET = 1
VFIO_REGION_INFO_FLAG_READ = 1
VFIO_REGION_INFO_FLAG_WRITE = 2
VFIO_REGION_INFO_FLAG_MMAP = 4
VFIO_DMA_MAP_FLAG_READ = 1
VFIO_DMA_MAP_FLAG_WRITE = 2
VFIO_PCI_CONFIG_REGION_INDEX = 7

_GROUP_STATUS = struct.Struct("=II")  # argsz, flags
_DEVICE_INFO = struct.Struct("=IIII")  # argsz, flags, num_regions, num_irqs
_REGION_INFO = struct.Struct("=IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
_DMA_MAP = struct.Struct("=IIQQQ")  # argsz, flags, vaddr, iova, size
_DMA_UNMAP = struct.Struct("=IIQQ")  # argsz, flags, iova, size
# struct vfio_device_feature {argsz, flags} + struct vfio_device_feature_dma_buf
# {region_index, open_flags, flags, nr_ranges} + one struct vfio_region_dma_range
# {offset, length}
_FEATURE_DMA_BUF = struct.Struct("=II" "IIII" "QQ")

PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_BASE_ADDRESS_0 = 0x10

DRIVER_SETTLE_S = 5.0  # deadline for sysfs bind/unbind to take effect


def _ioctl(fd: int, req: int, arg: int | bytearray = 0, what: str = "") -> int:
    try:
        if isinstance(arg, bytearray):
            return fcntl.ioctl(fd, req, arg, True)
        return fcntl.ioctl(fd, req, arg)
    except OSError as e:
        raise P2PError(f"{what or hex(req)} failed: {e.strerror}") from e


# -- driver binding --------------------------------------------------------------------------


class VfioBinding:
    """Bind a PCI function to vfio-pci for the lifetime of this object, then give it back.

    Uses driver_override + unbind + drivers_probe, as the kernel documents; `close()`
    unbinds from vfio-pci, clears the override and binds the previous driver again (if any).
    """

    def __init__(self, bdf: str, sysfs_root: str | os.PathLike = "/sys") -> None:
        self.bdf = bdf
        self.root = Path(sysfs_root)
        self.dev = self.root / "bus/pci/devices" / bdf
        self.previous: str | None = None
        self._bound = False
        if not self.dev.exists():
            raise P2PError(f"{bdf}: no such PCI device")
        drv = self.dev / "driver"
        self.previous = os.path.basename(os.readlink(drv)) if drv.is_symlink() else None
        if self.previous == "vfio-pci":
            return  # someone else bound it; we leave it as we found it
        if not (self.root / "bus/pci/drivers/vfio-pci").exists():
            subprocess.run(["modprobe", "vfio-pci"], check=False, capture_output=True)
            if not (self.root / "bus/pci/drivers/vfio-pci").exists():
                raise P2PError("vfio-pci driver is not available (modprobe vfio-pci failed)")
        self._write(self.dev / "driver_override", "vfio-pci")
        try:
            if self.previous:
                self._write(drv / "unbind", bdf, busy=True)
            self._write(self.root / "bus/pci/drivers_probe", bdf)
            self._wait_driver("vfio-pci")
        except P2PError:
            self._restore()
            raise
        self._bound = True
        logfmt.info(log, "vfio_bound", bdf=bdf, driver="vfio-pci",
                    previous=self.previous or "unbound")

    def _write(self, path: Path, value: str, busy: bool = False) -> None:
        try:
            path.write_text(value)
        except OSError as e:
            hint = " (device busy: is it mounted or in use?)" if busy and e.errno in (
                errno.EBUSY, errno.EAGAIN) else ""
            raise P2PError(f"{self.bdf}: writing {value!r} to {path} failed: "
                           f"{e.strerror}{hint}") from e

    def _driver(self) -> str | None:
        drv = self.dev / "driver"
        return os.path.basename(os.readlink(drv)) if drv.is_symlink() else None

    def _wait_driver(self, want: str | None) -> None:
        deadline = time.monotonic() + DRIVER_SETTLE_S
        while self._driver() != want:
            if time.monotonic() > deadline:
                raise P2PError(f"{self.bdf}: driver is {self._driver()!r}, expected {want!r}")
            time.sleep(0.05)

    def _restore(self) -> None:
        if self._driver() == "vfio-pci":
            self._write(self.root / "bus/pci/drivers/vfio-pci/unbind", self.bdf)
        self._write(self.dev / "driver_override", "\n")
        if self.previous:
            self._write(self.root / "bus/pci/drivers_probe", self.bdf)
            self._wait_driver(self.previous)

    def close(self) -> None:
        """Give the device back to its previous driver; idempotent."""
        if self._bound:
            self._bound = False
            self._restore()
            logfmt.info(log, "vfio_unbound", bdf=self.bdf, driver=self.previous or "none")

    def iommu_group(self) -> int:
        link = self.dev / "iommu_group"
        if not link.is_symlink():
            raise P2PError(f"{self.bdf}: no IOMMU group (boot with intel_iommu=on, and in QEMU "
                           f"add -device intel-iommu,caching-mode=on)")
        return int(os.path.basename(os.readlink(link)))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- container and group ---------------------------------------------------------------------


class VfioContainer:
    """A type1v2 IOMMU container: the IOVA space the devices in its groups DMA into."""

    def __init__(self, dev_root: str | os.PathLike = "/dev/vfio") -> None:
        self.dev_root = Path(dev_root)
        path = self.dev_root / "vfio"
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise P2PError(f"{path} is missing (load vfio-pci; the kernel needs VFIO)") from e
        except OSError as e:
            raise P2PError(f"cannot open {path}: {e.strerror}") from e
        self.groups: list[VfioGroup] = []
        self._maps: dict[int, int] = {}  # iova -> size
        self._iommu_set = False
        try:
            v = _ioctl(self.fd, VFIO_GET_API_VERSION, what="VFIO_GET_API_VERSION")
            if v != VFIO_API_VERSION:
                raise P2PError(f"VFIO API version {v}, expected {VFIO_API_VERSION}")
            if not _ioctl(self.fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU,
                          what="VFIO_CHECK_EXTENSION"):
                raise P2PError("VFIO type1v2 IOMMU is not supported by this kernel")
        except P2PError:
            self.close()
            raise

    def group(self, group_id: int) -> VfioGroup:
        g = VfioGroup(self, group_id)
        self.groups.append(g)
        if not self._iommu_set:  # the IOMMU model can be set once a group is attached
            _ioctl(self.fd, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU, what="VFIO_SET_IOMMU")
            self._iommu_set = True
        return g

    def map_dma(self, buf: object, iova: int, size: int | None = None) -> None:
        """Map a writable buffer (mmap, bytearray) at `iova` for device reads and writes."""
        vaddr = buffer_address(buf)
        size = len(buf) if size is None else size  # type: ignore[arg-type]
        arg = bytearray(_DMA_MAP.pack(_DMA_MAP.size,
                                      VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                                      vaddr, iova, size))
        _ioctl(self.fd, VFIO_IOMMU_MAP_DMA, arg, what=f"VFIO_IOMMU_MAP_DMA iova {iova:#x}")
        self._maps[iova] = size

    def unmap_dma(self, iova: int) -> None:
        size = self._maps.pop(iova)
        arg = bytearray(_DMA_UNMAP.pack(_DMA_UNMAP.size, 0, iova, size))
        _ioctl(self.fd, VFIO_IOMMU_UNMAP_DMA, arg, what=f"VFIO_IOMMU_UNMAP_DMA iova {iova:#x}")

    def close(self) -> None:
        """Drop DMA mappings, close groups (and their devices), close the fd; idempotent.

        Mappings go first: once the last group leaves the container, the IOMMU domain
        and its mappings are gone and an unmap fails with EINVAL.
        """
        if self.fd >= 0:
            for iova in list(self._maps):
                try:
                    self.unmap_dma(iova)
                except P2PError as e:
                    logfmt.warning(log, "vfio_unmap_failed", iova=hex(iova), reason=e)
        for g in reversed(self.groups):
            g.close()
        self.groups.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VfioGroup:
    def __init__(self, container: VfioContainer, group_id: int) -> None:
        self.container, self.id = container, group_id
        self.devices: list[VfioDevice] = []
        path = container.dev_root / str(group_id)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise P2PError(f"{path} is missing: no device of IOMMU group {group_id} is bound "
                           f"to vfio-pci") from e
        except OSError as e:
            raise P2PError(f"cannot open {path}: {e.strerror} (group in use by another "
                           f"process?)") from e
        try:
            st = bytearray(_GROUP_STATUS.pack(_GROUP_STATUS.size, 0))
            _ioctl(self.fd, VFIO_GROUP_GET_STATUS, st, what="VFIO_GROUP_GET_STATUS")
            if not _GROUP_STATUS.unpack(st)[1] & VFIO_GROUP_FLAGS_VIABLE:
                raise P2PError(f"IOMMU group {group_id} is not viable: bind every device in "
                               f"it to vfio-pci or unbind it")
            _ioctl(self.fd, VFIO_GROUP_SET_CONTAINER,
                   bytearray(struct.pack("=i", container.fd)), what="VFIO_GROUP_SET_CONTAINER")
        except P2PError:
            os.close(self.fd)
            self.fd = -1
            raise

    def device(self, bdf: str) -> VfioDevice:
        d = VfioDevice(self, bdf)
        self.devices.append(d)
        return d

    def close(self) -> None:
        for d in reversed(self.devices):
            d.close()
        self.devices.clear()
        if self.fd >= 0:
            try:
                _ioctl(self.fd, VFIO_GROUP_UNSET_CONTAINER, what="VFIO_GROUP_UNSET_CONTAINER")
            except P2PError as e:
                log.debug("%s", e)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- device ----------------------------------------------------------------------------------


class VfioDevice:
    """A PCI function's VFIO device fd: region info, region mmaps, config space, reset."""

    def __init__(self, group: VfioGroup, bdf: str) -> None:
        self.group, self.bdf = group, bdf
        self._maps: list[mmap.mmap] = []
        deadline = time.monotonic() + OPEN_RETRY_S
        while True:
            try:
                fd = _ioctl(group.fd, VFIO_GROUP_GET_DEVICE_FD, bytearray(bdf.encode() + b"\0"),
                            what=f"VFIO_GROUP_GET_DEVICE_FD {bdf}")
                break
            except P2PError as e:
                # vfio-pci resets the function at open; right after a rebind the device
                # lock may still be held and the reset answers EAGAIN, or the group does
                # not list the device yet (ENODEV, seen in the VM right after a namespace
                # was disabled and enabled again): try again shortly.
                if not isinstance(e.__cause__, OSError) \
                        or e.__cause__.errno not in _OPEN_RETRY_ERRNOS \
                        or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.fd = fd
        info = bytearray(_DEVICE_INFO.pack(_DEVICE_INFO.size, 0, 0, 0))
        _ioctl(fd, VFIO_DEVICE_GET_INFO, info, what="VFIO_DEVICE_GET_INFO")
        _, self.flags, self.num_regions, self.num_irqs = _DEVICE_INFO.unpack(info)

    def region_info(self, index: int) -> tuple[int, int, int]:
        """(flags, size, offset into the device fd) of region `index` (BARs 0-5, config 7)."""
        arg = bytearray(_REGION_INFO.pack(_REGION_INFO.size, 0, index, 0, 0, 0))
        _ioctl(self.fd, VFIO_DEVICE_GET_REGION_INFO, arg, what=f"region info {index}")
        _, flags, _, _, size, offset = _REGION_INFO.unpack(arg)
        return flags, size, offset

    def map_region(self, index: int, offset: int = 0,
                   length: int | None = None) -> tuple[mmap.mmap, int]:
        """mmap (part of) a BAR through the device fd, uncached; returns (mmap, cpu address).

        The mapping is unmapped when the device closes (or earlier by the owner).
        """
        flags, size, fd_off = self.region_info(index)
        if not flags & VFIO_REGION_INFO_FLAG_MMAP:
            raise P2PError(f"{self.bdf}: region {index} cannot be mmap'ed")
        length = size - offset if length is None else length
        if offset % mmap.PAGESIZE or offset + length > size or length <= 0:
            raise P2PError(f"{self.bdf}: window {offset:#x}+{length:#x} does not fit region "
                           f"{index} ({size:#x} bytes)")
        try:
            mm = mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=fd_off + offset)
        except OSError as e:
            raise P2PError(f"{self.bdf}: mmap of region {index} failed: {e.strerror}") from e
        self._maps.append(mm)
        return mm, buffer_address(mm)

    def export_dmabuf(self, index: int, offset: int, length: int) -> int:
        """A dma-buf fd of region `index`'s window [offset, offset + length), for importers
        such as ibv_reg_dmabuf_mr (VFIO_DEVICE_FEATURE_DMA_BUF; ENOTTY before the kernel
        had it)."""
        arg = bytearray(_FEATURE_DMA_BUF.pack(
            _FEATURE_DMA_BUF.size, VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF,
            index, os.O_RDWR | os.O_CLOEXEC, 0, 1, offset, length))
        return _ioctl(self.fd, VFIO_DEVICE_FEATURE, arg,
                      what=f"{self.bdf}: VFIO_DEVICE_FEATURE_DMA_BUF of region {index}")

    def config_read(self, off: int, size: int) -> int:
        _, _, base = self.region_info(VFIO_PCI_CONFIG_REGION_INDEX)
        return int.from_bytes(os.pread(self.fd, size, base + off), "little")

    def config_write(self, off: int, size: int, value: int) -> None:
        _, _, base = self.region_info(VFIO_PCI_CONFIG_REGION_INDEX)
        os.pwrite(self.fd, value.to_bytes(size, "little"), base + off)

    def enable(self) -> None:
        """Memory space decoding and bus mastering on, so the device can DMA."""
        cmd = self.config_read(PCI_COMMAND, 2)
        self.config_write(PCI_COMMAND, 2, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)

    def stop_dma(self) -> None:
        """Bus mastering off: the function can no longer read or write memory.

        The last resort for a device that does not stop on its own terms (an NVMe
        controller that never reports CSTS.RDY = 0); `enable()` turns it back on.
        """
        try:
            cmd = self.config_read(PCI_COMMAND, 2)
            self.config_write(PCI_COMMAND, 2, cmd & ~PCI_COMMAND_MASTER)
        except OSError as e:
            raise P2PError(f"{self.bdf}: cannot turn bus mastering off: {e.strerror}") from e

    def bar_address(self, bar: int) -> int:
        """The BAR's bus address as programmed in config space (64-bit BARs combined)."""
        lo = self.config_read(PCI_BASE_ADDRESS_0 + 4 * bar, 4)
        addr = lo & ~0xF
        if (lo >> 1) & 3 == 2:  # 64-bit memory BAR
            addr |= self.config_read(PCI_BASE_ADDRESS_0 + 4 * bar + 4, 4) << 32
        return addr

    def reset(self) -> bool:
        """Function-level reset if the device supports one; True if it was done."""
        if not self.flags & VFIO_DEVICE_FLAGS_RESET:
            return False
        _ioctl(self.fd, VFIO_DEVICE_RESET, what="VFIO_DEVICE_RESET")
        return True

    def close(self) -> None:
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:
                logfmt.warning(log, "mapping_exported_at_close", bdf=self.bdf,
                               reason="a BAR mapping is still exported")
        self._maps.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_device(bdf: str, sysfs_root: str | os.PathLike = "/sys",
                dev_root: str | os.PathLike = "/dev/vfio",
                ) -> tuple[VfioBinding, VfioContainer, VfioDevice]:
    """Bind `bdf` to vfio-pci and open it in a fresh container; the caller closes all three
    (container first: it closes the group and the device, then the binding)."""
    binding = VfioBinding(bdf, sysfs_root)
    try:
        group_id = binding.iommu_group()
        container = VfioContainer(dev_root)
        try:
            device = container.group(group_id).device(bdf)
        except P2PError:
            container.close()
            raise
    except P2PError:
        binding.close()
        raise
    return binding, container, device
