"""P2P memory providers: where I/O buffers live, how the CPU may touch them, and their bus addresses.

A provider owns one or more CPU mappings ("regions") and hands out contiguous chunks of
them.  Every chunk knows its CPU virtual address (for RDMA MR lookups), its bus address
(what a PCI device puts on the wire to reach it, None when no device can), and a
memoryview of exactly its size.  Providers:

* `SystemMemoryProvider` – anonymous mmap slabs (huge pages when the system has them); the
  fallback pool and the memory the RDMA MRs cover.
* `SysfsBarProvider` – a PCI BAR through sysfs `resourceN` (UC) or `resourceN_wc` (WC, only
  when asked for and when mapping it works).
* `KernelP2pmemProvider` – memory the kernel publishes as p2pmem (`p2pmem/allocate`).
* `VfioBarProvider` / `NvmeCmbProvider` – a BAR of a device our own VFIO driver owns, addressed
  by the controller base address the driver programmed.

The allocator is a buddy allocator over 4 KiB units per region: chunks are naturally aligned
to their rounded size, alloc/free are a few dict/set operations (the data path calls them per
I/O), and frees coalesce.  Choosing a provider is not this module's job (see p2p.py).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from abc import ABC
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

import numpy as np

from nvmet_p2p import logfmt
from nvmet_p2p.errors import P2PError

log = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE
MIN_ORDER = 12  # 4 KiB: the smallest chunk; also the NVMe memory page size we program
MAP_HUGETLB = getattr(mmap, "MAP_HUGETLB", 0x40000)  # Linux value; older Pythons lack the name
HUGE_PAGE_SIZE = 2 << 20


@dataclass(frozen=True)
class AccessRules:
    """How CPU copies into a provider's memory must be done (REFERENCE.md §6)."""

    width: int = 8  # fixed store width in bytes: aligned, fixed-width stores
    block: int | None = None  # whole, ordered block writes of this size (s390 ISM), else None

    def __post_init__(self) -> None:
        if self.width not in (1, 2, 4, 8):
            raise ValueError(f"access width must be 1, 2, 4 or 8 bytes, not {self.width}")
        if self.block is not None and (self.block <= 0 or self.block % self.width):
            raise ValueError(f"access block {self.block} is not a multiple of width {self.width}")


SYSTEM_ACCESS = AccessRules(width=8)


class _Buddy:
    """Buddy allocator over one region of `length` bytes (offsets only, no memory)."""

    __slots__ = ("free", "length", "max_order")

    def __init__(self, length: int) -> None:
        self.length = length
        self.max_order = max(MIN_ORDER, length.bit_length() - 1)
        self.free: list[set[int]] = [set() for _ in range(self.max_order + 1)]
        # Carve a length that is not a power of two into the largest aligned blocks.
        off = 0
        while length - off >= 1 << MIN_ORDER:
            order = min(self.max_order, (off & -off).bit_length() - 1 if off else self.max_order)
            while off + (1 << order) > length:
                order -= 1
            self.free[order].add(off)
            off += 1 << order

    def alloc(self, order: int) -> int | None:
        free = self.free
        for k in range(order, self.max_order + 1):
            if free[k]:
                off = free[k].pop()
                while k > order:  # split, keeping the low half
                    k -= 1
                    free[k].add(off + (1 << k))
                return off
        return None

    def release(self, off: int, order: int) -> None:
        free = self.free
        while order < self.max_order:
            buddy = off ^ (1 << order)
            peers = free[order]
            if buddy not in peers:
                break
            peers.remove(buddy)
            off &= ~(1 << order)
            order += 1
        free[order].add(off)

    def available(self) -> int:
        return sum(len(s) << k for k, s in enumerate(self.free))


def _order_for(size: int) -> int:
    return max(MIN_ORDER, (size - 1).bit_length())


def buffer_address(buf: Any) -> int:
    """CPU virtual address of a writable buffer (mmap, bytearray), without keeping it exported."""
    c = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(c)
    finally:
        del c


class Chunk:
    """One contiguous allocation from a provider."""

    __slots__ = (
        "_freed",
        "_order",
        "addr",
        "bus_addr",
        "offset",
        "provider",
        "region",
        "size",
        "view",
    )

    def __init__(self, provider: Provider, region: int, offset: int, size: int, order: int,
                 addr: int, bus_addr: int | None, view: memoryview) -> None:
        self.provider = provider
        self.region = region  # index into provider.regions()
        self.offset = offset  # byte offset inside that region
        self.size = size  # bytes asked for; the reservation is rounded up to a power of two
        self.addr = addr
        self.bus_addr = bus_addr
        self.view = view
        self._order = order
        self._freed = False

    def free(self) -> None:
        """Give the chunk back; idempotent, and harmless after the provider closed."""
        if not self._freed:
            self._freed = True
            self.provider._free(self)

    def __repr__(self) -> str:
        bus = "-" if self.bus_addr is None else hex(self.bus_addr)
        return (f"<Chunk {self.provider.name} r{self.region}+{self.offset:#x} "
                f"size={self.size} bus={bus}>")


class _Region:
    __slots__ = ("addr", "buddy", "bus_base", "length", "mm", "view")

    def __init__(self, addr: int, length: int, view: memoryview, bus_base: int | None,
                 mm: mmap.mmap | None) -> None:
        self.addr = addr
        self.length = length
        self.view = view
        self.bus_base = bus_base
        self.buddy = _Buddy(length)
        self.mm = mm  # the mapping to unmap at close, when this provider made it


class Provider(ABC):
    """A pool of memory with CPU mappings, access rules and (maybe) bus addresses."""

    name: str = ""
    kind: str = ""  # "system" | "sysfs-bar" | "nvme-cmb" | "p2pmem" | "vfio-bar"
    bdf: str | None = None
    bar: int | None = None
    offset: int = 0  # byte offset of the pool inside the BAR
    size: int = 0
    mapping: str = "wb"  # "wb" (system), "uc" or "wc"
    access: AccessRules = SYSTEM_ACCESS
    published: bool = True  # others may use it, as the kernel's pci_p2pmem_publish()
    publish_reason: str = ""  # why not, when not published

    def __init__(self) -> None:
        self._regions: list[_Region] = []
        self._live: dict[int, Chunk] = {}  # id(chunk) -> chunk, to revoke views at close
        self._lock = threading.Lock()
        self._closed = False
        self._allocated = 0
        self._allocs = 0
        self._alloc_failures = 0
        self._available = 0

    # -- for subclasses ----------------------------------------------------------------------

    def _add_region(self, view: memoryview, addr: int, bus_base: int | None = None,
                    mm: mmap.mmap | None = None) -> int:
        r = _Region(addr, len(view), view, bus_base, mm)
        self._regions.append(r)
        self._available += r.buddy.available()
        return len(self._regions) - 1

    def set_region_bus_addr(self, region: int, bus_base: int | None) -> None:
        """Record where a device sees a region (e.g. the IOVA a VFIO container mapped it at).

        Only chunks allocated afterwards carry the new bus address.
        """
        self._regions[region].bus_base = bus_base

    # -- public ------------------------------------------------------------------------------

    def regions(self) -> list[tuple[int, int, memoryview]]:
        """(cpu addr, length, view) of each mapping: what an RDMA MR must cover, registered once."""
        return [(r.addr, r.length, r.view) for r in self._regions]

    def region_bus_addrs(self) -> list[int | None]:
        return [r.bus_base for r in self._regions]

    def dmabuf(self, region: int) -> tuple[int, int] | None:
        """A dma-buf holding region `region`: (fd, byte offset of the region in it), or None.

        An RDMA device registers a region offered this way with ibv_reg_dmabuf_mr instead of
        pinning its CPU mapping (rdma_mr.py); the fd stays the provider's.  Must not raise:
        a provider that fails to export returns None and logs why.  Who offers one:
        `VfioBarProvider` / `NvmeCmbProvider` through VFIO's dma-buf export of BAR regions
        (VFIO_DEVICE_FEATURE_DMA_BUF: the VM's 7.x kernel has it, Debian's 6.1 does not), and
        a BAR's exporting driver in general.  Kernel p2pmem and sysfs `resourceN` mappings
        have no dma-buf, and system memory needs none.
        """
        return None

    def alloc(self, size: int) -> Chunk | None:
        """A contiguous chunk of at least `size` bytes, or None when exhausted (counted)."""
        if size <= 0:
            raise ValueError(f"chunk size must be positive, not {size}")
        order = _order_for(size)
        with self._lock:
            if self._closed:
                raise P2PError(f"{self.name}: provider is closed")
            for idx, r in enumerate(self._regions):
                off = r.buddy.alloc(order)
                if off is not None:
                    break
            else:
                self._alloc_failures += 1
                return None
            self._allocated += 1 << order
            self._available -= 1 << order
            self._allocs += 1
            bus = None if r.bus_base is None else r.bus_base + off
            chunk = Chunk(self, idx, off, size, order, r.addr + off, bus,
                          r.view[off:off + size])
            self._live[id(chunk)] = chunk
            return chunk

    def _free(self, chunk: Chunk) -> None:
        with self._lock:
            if self._live.pop(id(chunk), None) is None:
                return  # provider closed in between: its views are already revoked
            chunk.view.release()
            self._regions[chunk.region].buddy.release(chunk.offset, chunk._order)
            self._allocated -= 1 << chunk._order
            self._available += 1 << chunk._order

    def counters(self) -> dict:
        return {"size": self.size, "available": self._available, "allocated": self._allocated,
                "alloc_failures": self._alloc_failures, "allocs": self._allocs}

    def describe(self) -> dict:
        """Facts for status output and logs."""
        return {"name": self.name, "kind": self.kind, "bdf": self.bdf, "bar": self.bar,
                "offset": self.offset, "size": self.size, "mapping": self.mapping,
                "access": {"width": self.access.width, "block": self.access.block},
                **self.counters()}

    def close(self) -> None:
        """Revoke every chunk view and unmap; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for chunk in self._live.values():
                chunk._freed = True
                _release(chunk.view)
            self._live.clear()
            for r in self._regions:
                _release(r.view)
                if r.mm is not None:
                    try:
                        r.mm.close()
                    except BufferError:
                        # Someone still holds a buffer export (e.g. a numpy array of a chunk);
                        # the mapping goes away when that object does.
                        logfmt.warning(log, "mapping_exported_at_close", provider=self.name,
                                       reason="left to the GC")
        self._close_backing()

    def _close_backing(self) -> None:
        """Release what the subclass opened besides the mappings (fds, VFIO regions)."""

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.kind} size={self.size} {self.mapping}>"


def _release(view: memoryview) -> None:
    try:
        view.release()
    except BufferError:
        logfmt.warning(log, "memoryview_exported_at_close")


# -- system memory ---------------------------------------------------------------------------


class SystemMemoryProvider(Provider):
    """Anonymous, page-aligned host memory in slabs: the fallback pool.

    Huge pages (MAP_HUGETLB) are tried first so an RDMA MR or an IOMMU mapping needs few
    translation entries; when the system has none the slab is mapped with normal pages and
    `hugepages_reason` says why.  Chunks have no bus address until someone maps the regions
    for a device (`set_region_bus_addr`).
    """

    kind = "system"
    mapping = "wb"

    def __init__(self, size: int = 64 << 20, *, hugepages: bool = True,
                 slab_size: int = 16 << 20, name: str = "system") -> None:
        super().__init__()
        if size <= 0 or slab_size <= 0:
            raise ValueError("system memory pool and slab sizes must be positive")
        self.name = name
        self.access = SYSTEM_ACCESS
        self.hugepages = False
        self.hugepages_reason = "not requested" if not hugepages else ""
        total = 0
        try:
            while total < size:
                slab = min(slab_size, size - total)
                slab = -(-slab // PAGE_SIZE) * PAGE_SIZE
                mm = self._map_slab(slab, hugepages)
                self._add_region(memoryview(mm), buffer_address(mm), None, mm)
                total += slab
        except OSError as e:
            self.close()
            raise P2PError(f"{name}: cannot map {size} bytes of system memory: {e}") from e
        self.size = total

    def _map_slab(self, slab: int, hugepages: bool) -> mmap.mmap:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if hugepages and not self.hugepages_reason and slab % HUGE_PAGE_SIZE == 0:
            try:
                mm = mmap.mmap(-1, slab, flags | MAP_HUGETLB)
                self.hugepages = True
                return mm
            except OSError as e:
                self.hugepages_reason = f"MAP_HUGETLB failed ({e.strerror}); using 4 KiB pages"
                logfmt.info(log, "hugepages_refused", provider=self.name,
                            reason=self.hugepages_reason)
        elif hugepages and not self.hugepages_reason:
            self.hugepages_reason = f"slab of {slab} bytes is not a multiple of 2 MiB"
        return mmap.mmap(-1, slab, flags)


# -- PCI BAR through sysfs -------------------------------------------------------------------


def read_bar_resource(sysfs_root: str | os.PathLike, bdf: str, bar: int) -> tuple[int, int, int]:
    """(start, end, flags) of a BAR from sysfs `resource` (CPU physical addresses)."""
    path = Path(sysfs_root) / "bus/pci/devices" / bdf / "resource"
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise P2PError(f"{bdf}: cannot read {path}: {e.strerror or e}") from e
    if bar >= len(lines):
        raise P2PError(f"{bdf}: {path} has no line for BAR {bar}")
    start, end, flags = (int(x, 16) for x in lines[bar].split()[:3])
    if start == 0 and end == 0:
        raise P2PError(f"{bdf}: BAR {bar} is not assigned")
    return start, end, flags


IORESOURCE_PREFETCH = 0x2000


class _MappedFileProvider(Provider):
    """A provider backed by one shared mapping of a file (sysfs resource, p2pmem/allocate)."""

    def _map_file(self, path: Path, length: int, offset: int) -> mmap.mmap:
        fd = os.open(path, os.O_RDWR | os.O_SYNC)
        try:
            return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=offset)
        finally:
            os.close(fd)  # the mapping keeps its own reference


class SysfsBarProvider(_MappedFileProvider):
    """A PCI BAR mapped through sysfs.

    UC (`resourceN`) by default.  WC (`resourceN_wc`) only when `wc=True` is asked for and the
    mapping succeeds; otherwise UC and `wc_reason` says why.  "Prefetchable" is reported but
    never taken as permission to write-combine (REFERENCE.md §6).

    With CONFIG_IO_STRICT_DEVMEM (Debian's default) the kernel refuses the mmap (EINVAL)
    while a driver holds the BAR (nvme, or vfio-pci once it has mapped it): use it for BARs
    no driver claims, and `VfioBarProvider` for devices our own driver owns.

    `bus_offset` is the host bridge's CPU-to-bus offset as the kernel keeps it
    (`resource_entry.offset`): CPU physical = bus + bus_offset, so a chunk's bus address is
    `BAR start (CPU physical, from sysfs) - bus_offset + offset in BAR`.
    """

    kind = "sysfs-bar"

    def __init__(self, sysfs_root: str | os.PathLike, bdf: str, bar: int, *, wc: bool = False,
                 offset: int = 0, size: int | None = None, bus_offset: int = 0,
                 access: AccessRules | None = None, kind: str | None = None) -> None:
        super().__init__()
        self.bdf, self.bar, self.name = bdf, bar, f"{bdf}/bar{bar}"
        if kind is not None:
            self.kind = kind
        self.access = access or AccessRules()
        start, end, flags = read_bar_resource(sysfs_root, bdf, bar)
        bar_len = end - start + 1
        self.prefetchable = bool(flags & IORESOURCE_PREFETCH)
        if offset % PAGE_SIZE or offset < 0 or offset >= bar_len:
            raise P2PError(f"{self.name}: offset {offset:#x} is not a page-aligned offset "
                           f"inside the {bar_len:#x}-byte BAR")
        size = bar_len - offset if size is None else size
        if size <= 0 or offset + size > bar_len:
            raise P2PError(f"{self.name}: window {offset:#x}+{size:#x} exceeds the BAR "
                           f"({bar_len:#x} bytes)")
        self.offset, self.size = offset, size
        self.cpu_phys = start + offset
        self.bus_offset = bus_offset
        self.bus_addr = start - bus_offset + offset
        devdir = Path(sysfs_root) / "bus/pci/devices" / bdf
        mm = None
        self.wc_reason = "not requested"
        if wc:
            wc_path = devdir / f"resource{bar}_wc"
            if not wc_path.exists():
                self.wc_reason = f"{wc_path.name} does not exist (BAR not prefetchable?)"
            else:
                try:
                    mm = self._map_file(wc_path, size, offset)
                    self.wc_reason = ""
                except OSError as e:
                    self.wc_reason = f"mapping {wc_path.name} failed: {e.strerror or e}"
            if mm is None:
                logfmt.warning(log, "wc_refused", provider=self.name, mapping="uc",
                               reason=f"write-combining refused: {self.wc_reason}")
        self.mapping = "wc" if mm is not None else "uc"
        if mm is None:
            try:
                mm = self._map_file(devdir / f"resource{bar}", size, offset)
            except OSError as e:
                raise P2PError(f"{self.name}: cannot map resource{bar}: {e.strerror or e}") from e
        self._add_region(memoryview(mm), buffer_address(mm), self.bus_addr, mm)


# -- kernel p2pmem ---------------------------------------------------------------------------


def p2pmem_exhausted(bdf: str, available: int, size: int) -> str:
    """Why a device's p2pmem cannot be mapped: less than a page of it is free."""
    return (f"{bdf}: p2pmem is exhausted ({available} of {size} bytes available; the rest "
            f"is allocated by its other users)")


class KernelP2pmemProvider(_MappedFileProvider):
    """Memory the kernel publishes as p2pmem for a PCI device.

    Reads `/sys/bus/pci/devices/<bdf>/p2pmem/{size,available,published}` and maps `size`
    bytes of `p2pmem/allocate` once (each mmap of that file allocates from the device's
    genpool; it needs Linux >= 6.2 with CONFIG_PCI_P2PDMA: the test VM's default 7.x kernel,
    not Debian 12's 6.1, where this provider only says why it is unavailable).  The kernel
    does not tell userspace the bus address: chunks have bus_addr None and are meant for
    O_DIRECT to P2P-capable block devices (the bdev backend) and RDMA MRs on kernels whose
    ib_umem supports P2P pages.
    """

    kind = "p2pmem"
    mapping = "uc"  # the kernel maps p2pmem pages uncached (pgprot_device)

    def __init__(self, sysfs_root: str | os.PathLike, bdf: str, *, size: int | None = None,
                 access: AccessRules | None = None) -> None:
        super().__init__()
        self.bdf, self.name = bdf, f"{bdf}/p2pmem"
        self.access = access or AccessRules()
        d = Path(sysfs_root) / "bus/pci/devices" / bdf
        if not d.is_dir():
            raise P2PError(f"{bdf}: no such PCI device under {d.parent}")
        p = d / "p2pmem"
        if not p.is_dir():
            raise P2PError(f"{bdf}: no p2pmem in sysfs (kernel without CONFIG_PCI_P2PDMA, or "
                           f"the device's driver registers no p2pmem)")
        info = read_p2pmem_info(p)
        self.total, self.published = info["size"], info["published"]
        if not self.published:
            raise P2PError(f"{bdf}: p2pmem is not published (the driver keeps it private)")
        avail = info["available"]
        if avail < PAGE_SIZE:
            raise P2PError(p2pmem_exhausted(bdf, avail, self.total))
        want = avail if size is None else size
        want -= want % PAGE_SIZE
        if want <= 0 or want > avail:
            raise P2PError(f"{bdf}: p2pmem has {avail} bytes available, {size} asked for")
        alloc = p / "allocate"
        if not alloc.exists():
            raise P2PError(f"{bdf}: p2pmem/allocate is missing (needs Linux >= 6.2 with "
                           f"CONFIG_PCI_P2PDMA)")
        try:
            mm = self._map_file(alloc, want, 0)
        except OSError as e:
            raise P2PError(f"{bdf}: mapping {want} bytes of p2pmem/allocate failed: "
                           f"{e.strerror or e}") from e
        self.size = want
        self._allocate = str(alloc)
        self._add_region(memoryview(mm), buffer_address(mm), None, mm)

    def alloc(self, size: int) -> Chunk | None:
        """As `Provider.alloc`, but first: is the mapping still there?  Unbinding the
        device's driver does not wait for us; the kernel revokes the mapping, removes the
        p2pmem directory, and any later access raises SIGBUS (docs/p2p-kernel-facts.md).
        So a provider whose `allocate` is gone closes itself and hands out nothing (its
        users decide again); chunks handed out a moment before the unbind are not saved.
        """
        if not self.closed and not os.path.exists(self._allocate):
            logfmt.warning(log, "p2pmem_revoked", provider=self.name,
                           reason="p2pmem/allocate is gone (the device's driver unbound)")
            self.close()
            return None
        return super().alloc(size)


def read_p2pmem_info(p2pmem_dir: str | os.PathLike) -> dict:
    """size, available (bytes) and published (bool) from a sysfs p2pmem directory."""
    p = Path(p2pmem_dir)
    try:
        return {"size": int(p.joinpath("size").read_text().strip(), 0),
                "available": int(p.joinpath("available").read_text().strip(), 0),
                "published": p.joinpath("published").read_text().strip() == "1"}
    except (OSError, ValueError) as e:
        raise P2PError(f"cannot parse {p}: {e}") from e


# -- BARs of devices our VFIO driver owns ----------------------------------------------------


class BarRegion(Protocol):
    """What VfioBarProvider needs from a VFIO device (see vfio.VfioDevice)."""

    bdf: str

    def map_region(self, index: int, offset: int = 0, length: int | None = None,
                   ) -> tuple[mmap.mmap, int]: ...

    def export_dmabuf(self, index: int, offset: int, length: int) -> int:
        """A dma-buf fd of that window of region `index`; raises P2PError saying why not."""


class VfioBarProvider(Provider):
    """A BAR of a device owned by our VFIO driver, mapped through the device fd.

    `bus_base` is the address the *owning* device decodes for the first byte of the window
    (for an NVMe CMB: CMBMSC.CBA plus the CMB's offset); chunks carry `bus_base + offset`.
    VFIO maps BARs uncached; there is no WC mmap through a VFIO device fd on Linux 6.1.

    `dmabuf()` offers the window as a dma-buf exported by vfio-pci (VFIO_DEVICE_FEATURE_DMA_BUF,
    kernels with CONFIG_VFIO_PCI_DMABUF such as the VM's 7.x; not 6.1), exported once on
    first use; `dmabuf_reason` says why there is none.
    """

    kind = "vfio-bar"
    mapping = "uc"

    def __init__(self, device: BarRegion, bar: int, *, offset: int = 0, size: int,
                 bus_base: int | None, access: AccessRules | None = None) -> None:
        super().__init__()
        self.bdf, self.bar = device.bdf, bar
        self.name = f"{device.bdf}/bar{bar}"
        self.offset, self.size = offset, size
        self.access = access or AccessRules()
        self._device = device
        self._dmabuf_fd: int | None = None
        self.dmabuf_reason = "not asked for yet"
        mm, addr = device.map_region(bar, offset, size)
        self._add_region(memoryview(mm), addr, bus_base, mm)

    def dmabuf(self, region: int) -> tuple[int, int] | None:
        if self._dmabuf_fd is None and not self._closed and self.dmabuf_reason:
            try:
                self._dmabuf_fd = self._device.export_dmabuf(self.bar or 0, self.offset,
                                                             self.size)
                self.dmabuf_reason = ""
            except P2PError as e:
                self.dmabuf_reason = str(e)
                logfmt.info(log, "dmabuf_unavailable", provider=self.name, reason=e)
        return None if self._dmabuf_fd is None else (self._dmabuf_fd, 0)

    def _close_backing(self) -> None:
        if self._dmabuf_fd is not None:
            os.close(self._dmabuf_fd)
            self._dmabuf_fd = None


class NvmeCmbProvider(VfioBarProvider):
    """An NVMe Controller Memory Buffer (kind "nvme-cmb"); PRPs point at CBA-based addresses.

    Usable by others (published) only when the controller supports both read and write data
    in the CMB (CMBSZ.WDS and CMBSZ.RDS), as in the kernel.
    """

    kind = "nvme-cmb"

    def __init__(self, device: BarRegion, bar: int, *, offset: int, size: int, bus_base: int,
                 wds: bool, rds: bool, access: AccessRules | None = None) -> None:
        super().__init__(device, bar, offset=offset, size=size, bus_base=bus_base,
                         access=access)
        self.name = f"{device.bdf}/cmb"
        self.published = wds and rds
        self.publish_reason = "" if self.published else (
            "CMB lacks " + " and ".join(n for n, ok in (("WDS", wds), ("RDS", rds)) if not ok))


# -- copies that obey access rules -----------------------------------------------------------

_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _as_view(dst: Chunk | memoryview | bytearray) -> memoryview:
    v = dst.view if isinstance(dst, Chunk) else memoryview(dst)
    return v.cast("B") if v.format != "B" or v.ndim != 1 else v


def _store(dst: memoryview, off: int, src: np.ndarray) -> None:
    """One element-typed store sequence of `src` at `dst[off:]` (the unit tests watch this)."""
    np.frombuffer(dst, dtype=src.dtype, count=len(src), offset=off)[:] = src


def copy_into(dst: Chunk | memoryview | bytearray, data: bytes | bytearray | memoryview,
              access: AccessRules, offset: int = 0) -> None:
    """Copy `data` into `dst[offset:]` with the provider's access rules.

    Stores are numpy element copies of `access.width` bytes at addresses aligned to that
    width; ragged edges are widened with a read-modify-write of whole words.  With
    `access.block` the data goes as whole blocks in ascending order, each block one store
    sequence, a partial last block completed from the current contents first.  Honest limit:
    numpy may turn a contiguous element copy into wider vector stores; those are still
    aligned, in-order, and never narrower than `width`.
    """
    v = _as_view(dst)
    src = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.ndim != 1 \
        or data.format != "B" else data
    n = len(src)
    if offset < 0 or offset + n > len(v):
        raise ValueError(f"copy of {n} bytes at {offset} overruns a {len(v)}-byte buffer")
    if n == 0:
        return
    unit = access.block or access.width
    first = offset - offset % unit
    last = -(-(offset + n) // unit) * unit
    if last > len(v):
        raise ValueError(f"{len(v)}-byte buffer is not a whole number of {unit}-byte units")
    dtype = _DTYPES[access.width]
    if first == offset and last == offset + n:
        staged = np.frombuffer(src, dtype=dtype)
    else:
        buf = bytearray(np.frombuffer(v, dtype=dtype, count=(last - first) // access.width,
                                      offset=first).tobytes())
        buf[offset - first:offset - first + n] = src
        staged = np.frombuffer(buf, dtype=dtype)
    if access.block is None:
        _store(v, first, staged)
        return
    per_block = access.block // access.width
    for i in range(0, len(staged), per_block):
        _store(v, first + i * access.width, staged[i:i + per_block])


def copy_from(view: Chunk | memoryview | bytearray, access: AccessRules, offset: int = 0,
              length: int | None = None) -> bytes:
    """Read `length` bytes at `offset` with aligned loads of `access.width` bytes."""
    v = _as_view(view)
    length = len(v) - offset if length is None else length
    if offset < 0 or length < 0 or offset + length > len(v):
        raise ValueError(f"read of {length} bytes at {offset} overruns a {len(v)}-byte buffer")
    w = access.width
    first = offset - offset % w
    last = min(len(v), -(-(offset + length) // w) * w)
    if (last - first) % w:
        raise ValueError(f"{len(v)}-byte buffer is not a whole number of {w}-byte words")
    words = np.frombuffer(v, dtype=_DTYPES[w], count=(last - first) // w, offset=first).copy()
    return words.tobytes()[offset - first:offset - first + length]


_barrier_lock = threading.Lock()


def wmb() -> None:
    """Order earlier stores to BAR / DMA memory before the doorbell store that follows.

    What this does in Python: it acquires and releases a lock, i.e. pthread_mutex on a futex
    word, which is a LOCK-prefixed read-modify-write on x86.  On x86 a locked instruction
    orders all earlier stores and drains write-combining buffers (Intel SDM vol. 3, 11.3.1),
    and the doorbell itself is an uncached store, which also flushes WC buffers; so on x86
    data written through a WB, UC or WC mapping is visible to the device before the doorbell.
    On weakly ordered CPUs (arm64) a mutex gives only acquire/release ordering between CPUs,
    not `dma_wmb()`/`dsb st` towards devices: this project has not been validated there.
    """
    _barrier_lock.acquire()
    _barrier_lock.release()
