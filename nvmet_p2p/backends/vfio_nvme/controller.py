"""Bringing the userspace driver's controller up, and down: the backend's controller half.

Reset (function reset, CC.EN = 0), the admin queue, Identify, the I/O queue pair, the
CMB (CMBMSC, a controller base address a peer can use), the IOMMU mappings of the
memory it may reach, and stopping its DMA when it is no longer trusted.  The functions
take the `VfioNvmeBackend` whose state they set up; the backend module owns the data
path, completions, deadlines and teardown, and calls these at open, after a timeout and
at close.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from nvmet_p2p import logfmt
from nvmet_p2p.backends.vfio_nvme import nvme_pci as pci
from nvmet_p2p.cmb import Chunk, NvmeCmbProvider, SystemMemoryProvider, wmb
from nvmet_p2p.errors import BackendError, P2PError
from nvmet_p2p.wire.identify import IdCtrl, IdNs
from nvmet_p2p.wire.limits import NVME_AQ_DEPTH

if TYPE_CHECKING:
    from nvmet_p2p.backends.vfio_nvme.backend import VfioNvmeBackend
    from nvmet_p2p.cmb import Provider

# the backend's logger: one name for everything the driver says about a device
log = logging.getLogger("nvmet_p2p.backends.vfio_nvme.backend")

IOVA_BASE = 0x1000_0000  # our DMA memory; far below typical BAR windows and the MSI range
CMB_CBA_FALLBACK = 0x8000_0000  # controller base address when the BAR's own does not stick
ADMIN_TIMEOUT_S = 10.0  # TCG guests are slow; a healthy controller answers in milliseconds
MAX_XFER = 1 << 20  # per-command cap: one PRP list page per command id covers it


class Regs:
    """32-bit (and one 64-bit) loads and stores on the mmap'ed BAR0."""

    def __init__(self, view: memoryview) -> None:
        self.r32 = view.cast("I")
        self.r64 = view.cast("Q")

    def read32(self, off: int) -> int:
        return self.r32[off >> 2]

    def write32(self, off: int, v: int) -> None:
        self.r32[off >> 2] = v

    def read64(self, off: int) -> int:  # low dword first, as lo_hi_readq
        return self.r32[off >> 2] | self.r32[(off >> 2) + 1] << 32

    def write64_lo_hi(self, off: int, v: int) -> None:
        self.r32[off >> 2] = v & 0xFFFFFFFF
        self.r32[(off >> 2) + 1] = v >> 32

    def write64(self, off: int, v: int) -> None:  # one 8-byte store
        self.r64[off >> 3] = v

    def release(self) -> None:
        self.r32.release()
        self.r64.release()


NVME_CLASS = 0x010802  # PCI class: mass storage, non-volatile memory, NVM Express


def check_nvme_class(sysfs_root: str, bdf: str) -> None:
    """Refuse any function that is not an NVMe controller before unbinding its driver.

    Taking a device away from its driver is destructive: a wrong address could be the
    disk or the network the machine runs on.
    """
    path = os.path.join(sysfs_root, "bus/pci/devices", bdf, "class")
    try:
        with open(path) as f:
            cls = int(f.read().strip(), 16)
    except FileNotFoundError as e:
        raise BackendError(f"no PCI device {bdf} (see lspci -D)") from e
    except (OSError, ValueError) as e:
        raise BackendError(f"cannot read the PCI class of {bdf}: {e}") from e
    if cls != NVME_CLASS:
        raise BackendError(f"{bdf} is not an NVMe controller (PCI class {cls:#08x}, NVMe is "
                           f"{NVME_CLASS:#08x}); refusing to take it from its driver")


def _iova(chunk: Chunk) -> int:
    """The bus address of a chunk of a provider this backend mapped (map_provider set it)."""
    assert chunk.bus_addr is not None
    return chunk.bus_addr


def start(b: VfioNvmeBackend, dma_size: int, io_depth: int) -> None:
    """Map the registers and allocate every queue once, then bring the controller up."""
    dev = b._device
    dev.enable()  # memory decoding, so that CAP can be read
    try:
        bar0, _ = dev.map_region(0)
    except P2PError:
        # The MSI-X table may share BAR0 and refuse mmap: registers and the first
        # doorbells fit in two pages at the default stride.
        bar0, _ = dev.map_region(0, 0, 0x2000)
    b._regs = regs = Regs(memoryview(bar0))
    b.cap = cap = pci.Cap.decode(regs.read64(pci.REG_CAP))
    b.vs = regs.read32(pci.REG_VS)
    if not cap.css_nvm or cap.mpsmin > 0:
        raise BackendError(f"{b.bdf}: controller lacks the NVM command set or 4 KiB "
                           f"pages (CAP {regs.read64(pci.REG_CAP):#x})")

    b._dma = SystemMemoryProvider(dma_size, slab_size=dma_size, name=f"{b.bdf}/dma")
    map_provider(b, b._dma)
    b.io_depth = io_depth = min(io_depth, cap.mqes + 1)
    b._table = pci.CommandTable(io_depth, b.io_timeout)
    b._asq_mem = zeroed(b, NVME_AQ_DEPTH * pci.SQE_SIZE)
    b._acq_mem = zeroed(b, NVME_AQ_DEPTH * pci.CQE_SIZE)
    b._sq_mem = zeroed(b, io_depth * pci.SQE_SIZE)
    b._cq_mem = zeroed(b, io_depth * pci.CQE_SIZE)
    b._id_buf = zeroed(b, 4096)
    # One PRP list area per command id, sized for the largest transfer.
    list_pages = pci.prp_list_pages(MAX_XFER)
    b._prp_lists = [zeroed(b, list_pages * pci.NVME_PAGE_SIZE)
                       for _ in range(io_depth)]
    b._bring_up()
    logfmt.info(log, "vfio_nvme_ready", bdf=b.bdf, nsid=b.nsid, nblocks=b.nblocks,
                block_size=b.block_size, mdts_kib=b.max_xfer >> 10, vwc=b.vwc,
                cmb_size=b.cmb.size if b.cmb else None, cmb_reason=b.cmb_reason,
                io_timeout_s=b.io_timeout)


def bring_up(b: VfioNvmeBackend) -> None:
    """Reset the controller and make it serve: at open, and again after a timeout.

    Function-level reset (when VFIO offers one), CC.EN = 0, the admin queue, Identify,
    the I/O queue pair, the CMB.  The queues' memory is reused, zeroed.
    """
    dev, regs, cap = b._device, b._regs, b.cap
    assert regs is not None
    try:
        dev.reset()
    except P2PError as e:  # a controller reset (CC.EN=0) follows anyway
        logfmt.info(log, "vfio_reset_unavailable", bdf=b.bdf,
                    reason=f"{e}; continuing with a controller reset")
    dev.enable()
    disable(b)
    close_rings(b)
    for mem in (b._asq_mem, b._acq_mem, b._sq_mem, b._cq_mem):
        mem.view[:] = bytes(len(mem.view))

    aq_depth, io_depth = NVME_AQ_DEPTH, b.io_depth
    regs.write32(pci.REG_AQA, pci.aqa_value(aq_depth, aq_depth))
    regs.write64_lo_hi(pci.REG_ASQ, _iova(b._asq_mem))
    regs.write64_lo_hi(pci.REG_ACQ, _iova(b._acq_mem))
    regs.write32(pci.REG_CC, pci.cc_value(enable=True))
    wait_csts(b, pci.CSTS_RDY, pci.CSTS_RDY, "enable")
    b._asq = pci.SubmissionRing(0, b._asq_mem.view, aq_depth, doorbell(
        b, pci.sq_doorbell(0, cap.dstrd)))
    b._acq = pci.CompletionRing(0, b._acq_mem.view, aq_depth, doorbell(
        b, pci.cq_doorbell(0, cap.dstrd)))
    identify_ns(b)

    sq, cq = b._sq_mem, b._cq_mem
    admin(b, pci.ADMIN_CREATE_CQ, prp1=_iova(cq), cdw10=(io_depth - 1) << 16 | 1,
                cdw11=1)  # physically contiguous, interrupts off
    admin(b, pci.ADMIN_CREATE_SQ, prp1=_iova(sq), cdw10=(io_depth - 1) << 16 | 1,
                cdw11=1 << 16 | 1)  # CQ 1, physically contiguous
    b._sq = pci.SubmissionRing(1, sq.view, io_depth, doorbell(
        b, pci.sq_doorbell(1, cap.dstrd)))
    b._cq = pci.CompletionRing(1, cq.view, io_depth, doorbell(
        b, pci.cq_doorbell(1, cap.dstrd)))
    if b._want_cmb:
        enable_cmb(b)


def identify_ns(b: VfioNvmeBackend) -> None:
    """Identify the controller and the namespace; after a reset it must be the same one."""
    b.id_ctrl = IdCtrl.decode(identify(b, cns=1, nsid=0))
    id_ns = IdNs.decode(identify(b, cns=0, nsid=b.nsid))
    if id_ns.nsze == 0:
        raise BackendError(f"{b.bdf}: namespace {b.nsid} does not exist")
    if b.nblocks and (id_ns.nsze, 1 << id_ns.lba_shift) != (b.nblocks,
                                                               b.block_size):
        raise BackendError(f"{b.bdf}: namespace {b.nsid} is now {id_ns.nsze} x "
                           f"{1 << id_ns.lba_shift}-byte blocks, not {b.nblocks} x "
                           f"{b.block_size}")
    b.id_ns = id_ns
    b.block_size = 1 << id_ns.lba_shift
    b.nblocks = id_ns.nsze
    b.vwc = bool(b.id_ctrl.vwc & 1)
    mdts = b.id_ctrl.mdts
    b.max_xfer = min((1 << mdts) * pci.NVME_PAGE_SIZE if mdts else MAX_XFER, MAX_XFER)


def close_rings(b: VfioNvmeBackend) -> None:
    for ring in ("_acq", "_cq"):  # they hold a cast of the CQ memory
        if hasattr(b, ring):
            getattr(b, ring).close()


def zeroed(b: VfioNvmeBackend, size: int) -> Chunk:
    assert b._dma is not None
    c = b._dma.alloc(size)
    if c is None:
        raise BackendError(f"{b.bdf}: DMA pool too small for controller queues")
    c.view[:] = bytes(size)
    return c


def doorbell(b: VfioNvmeBackend, off: int) -> Callable[[int], None]:
    assert b._regs is not None
    r32, idx = b._regs.r32, off >> 2

    def ring(value: int) -> None:
        wmb()  # SQEs (or consumed CQEs) before the doorbell
        r32[idx] = value
    return ring


def wait_csts(b: VfioNvmeBackend, mask: int, want: int, what: str) -> None:
    # Hardware waits are real time, not the injected clock: they sleep for the device.
    regs = b._regs
    assert regs is not None
    deadline = time.monotonic() + max(b.cap.to_ms / 1000, 0.5)
    while True:
        csts = regs.read32(pci.REG_CSTS)
        if csts & mask == want:
            return
        if csts & pci.CSTS_CFS and what != "disable":
            raise BackendError(f"{b.bdf}: controller fatal status during {what}")
        if csts == 0xFFFFFFFF:
            raise BackendError(f"{b.bdf}: controller does not respond (CSTS all ones)")
        if time.monotonic() > deadline:
            raise BackendError(f"{b.bdf}: {what} timed out after {b.cap.to_ms} ms "
                               f"(CSTS {csts:#x})")
        time.sleep(0.001)


def disable(b: VfioNvmeBackend) -> None:
    regs = b._regs
    assert regs is not None
    cc = regs.read32(pci.REG_CC)
    if cc & pci.CC_EN:
        regs.write32(pci.REG_CC, cc & ~pci.CC_EN)
    wait_csts(b, pci.CSTS_RDY, 0, "disable")


def admin(b: VfioNvmeBackend, opcode: int, **fields: int) -> int:
    """Issue one admin command and poll for it; returns CQE dword 0."""
    b._asq.push(opcode, 0, **fields)
    b._asq.ring()
    deadline = time.monotonic() + ADMIN_TIMEOUT_S
    while True:
        done = b._acq.reap()
        if done:
            c = done[0]
            b._asq.head = c.sq_head
            if c.status:
                raise BackendError(f"{b.bdf}: admin opcode {opcode:#x} failed, status "
                                   f"{c.status:#x}")
            return c.result
        if time.monotonic() > deadline:
            raise BackendError(f"{b.bdf}: admin opcode {opcode:#x} timed out")
        time.sleep(0.0002)


def identify(b: VfioNvmeBackend, cns: int, nsid: int) -> bytes:
    admin(b, pci.ADMIN_IDENTIFY, nsid=nsid, prp1=_iova(b._id_buf), cdw10=cns)
    return bytes(b._id_buf.view)


def enable_cmb(b: VfioNvmeBackend) -> None:
    regs, dev = b._regs, b._device
    assert regs is not None
    if b.cmb is not None:
        # After a reset: the same CMB at the same bus address, since peers hold chunks.
        if not set_cba(b, b.cba, b._cba_store):
            raise BackendError(f"{b.bdf}: the CMB did not take its base address "
                               f"{b.cba:#x} again")
        return
    if not b.cap.cmbs:
        b.cmb_reason = "controller has no CMB (CAP.CMBS clear)"
        return
    regs.write32(pci.REG_CMBMSC, pci.CMBMSC_CRE)  # makes CMBLOC/CMBSZ readable
    cmbloc, cmbsz = regs.read32(pci.REG_CMBLOC), regs.read32(pci.REG_CMBSZ)
    if not cmbsz:
        b.cmb_reason = "CMBSZ reads 0 after CMBMSC.CRE"
        return
    bir = cmbloc & 7
    _, bar_size, _ = dev.region_info(bir)
    info = pci.CmbInfo.decode(cmbloc, cmbsz, bar_size)
    b.cmb_info = info
    if info.size == 0:
        b.cmb_reason = f"CMB at offset {info.offset:#x} lies outside BAR {bir}"
        return
    # The BAR's own bus address is what a peer (the RDMA NIC) uses, so make the
    # controller decode the same; keep it clear of our IOVAs.
    cba, store = pick_cba(b, dev.bar_address(bir) + info.offset, info.size), regs.write64
    if not set_cba(b, cba, store):
        # A 64-bit store may be split or refused; a CBA below 4 GiB needs one dword.
        cba, store = pick_cba(b, CMB_CBA_FALLBACK, info.size), regs.write64_lo_hi
        if not set_cba(b, cba, store):
            b.cmb_reason = "controller did not accept a CMB base address"
            return
    b.cba, b._cba_store = cba, store
    b.cmb = NvmeCmbProvider(dev, bir, offset=info.offset, size=info.size, bus_base=cba,
                               wds=info.wds, rds=info.rds)
    b.cmb_reason = b.cmb.publish_reason or ""
    logfmt.info(log, "cmb_enabled", bdf=b.bdf, size_mib=info.size >> 20, bar=bir,
                offset=hex(info.offset), cba=hex(cba), wds=info.wds, rds=info.rds,
                clipped=info.clipped)


def set_cba(b: VfioNvmeBackend, cba: int, store: Callable[[int, int], None]) -> bool:
    """Program CMBMSC with base `cba` through `store`; True if the controller took it."""
    regs = b._regs
    assert regs is not None
    store(pci.REG_CMBMSC, pci.cmbmsc_value(cba))
    return (regs.read64(pci.REG_CMBMSC) & ~0xFFF == cba
            and not regs.read32(pci.REG_CMBSTS) & pci.CMBSTS_CBAI)


def pick_cba(b: VfioNvmeBackend, want: int, size: int) -> int:
    iova_end = b._iova_next + (1 << 30)  # room for later map_provider calls
    if want & 0xFFF or (want < iova_end and want + size > IOVA_BASE):
        return CMB_CBA_FALLBACK
    return want


def map_provider(b: VfioNvmeBackend, provider: Provider) -> None:
    """IOMMU-map every region of a system-memory provider and give its chunks IOVAs.

    Buffers from such a provider are used in place (no bounce).
    """
    assert b._container is not None
    iovas = []
    for idx, (_addr, length, view) in enumerate(provider.regions()):
        iova = b._iova_next
        try:
            b._container.map_dma(view, iova, length)
        except P2PError as e:
            raise BackendError(f"{b.bdf}: cannot map {provider.name}: {e}") from e
        provider.set_region_bus_addr(idx, iova)
        iovas.append(iova)
        b._iova_next += -(-length // (2 << 20)) * (2 << 20)
    b._mapped.append((provider, iovas))


def unmap_provider(b: VfioNvmeBackend, provider: Provider) -> None:
    """Undo `map_provider` (before the provider closes, or its addresses could be reused)."""
    assert b._container is not None
    for i, (p, iovas) in enumerate(b._mapped):
        if p is provider:
            for idx, iova in enumerate(iovas):
                b._container.unmap_dma(iova)
                provider.set_region_bus_addr(idx, None)
            del b._mapped[i]
            return


def stop_dma(b: VfioNvmeBackend) -> bool:
    """Make sure the controller no longer touches our memory; False if that is not sure.

    CC.EN = 0 answered by CSTS.RDY = 0 within CAP.TO is the controller's word that it
    stopped; one that does not get there loses bus mastering, which stops any DMA.
    """
    try:
        disable(b)
        return True
    except BackendError as e:
        logfmt.error(log, "vfio_disable_failed", bdf=b.bdf,
                     reason=f"{e}; turning bus mastering off")
    try:
        b._device.stop_dma()
        return True
    except P2PError as e:
        logfmt.error(log, "vfio_stop_dma_failed", bdf=b.bdf,
                     reason=f"{e}; its bounce buffers stay allocated until close")
        return False
