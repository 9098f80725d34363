"""The userspace NVMe driver backend: a PCIe NVMe controller owned through VFIO.

Owns one controller for the lifetime of a namespace: binding it to vfio-pci, reset,
admin queue, Identify, one I/O queue pair, Read/Write/Flush/Write Zeroes/DSM with PRPs,
completion polling, the CMB (enabled through CMBMSC, published as `NvmeCmbProvider`),
clean shutdown and giving the device back to its kernel driver.

Data path: no syscalls per I/O.  A submission packs an SQE into the DMA-mapped SQ and
writes the tail doorbell; completions are found by polling the CQ's phase bits.  System
buffers are used in place when they lie in memory this controller has mapped
(`map_provider`), otherwise they bounce through an IOVA-mapped pool.  P2P-flagged
requests (`submit_read_p2p` / `submit_write_p2p`) put a chunk's bus address in the PRPs,
so the controller moves data between its CMB (or another BAR it can reach) and the media
itself.

Completions: nothing interrupts us.  Call `poll()` (returns the number reaped), or
`attach(loop)` once: an adaptive poller then runs on that asyncio loop while commands are
in flight (call_soon while completions keep coming, backing off with call_later up to
`POLL_MAX_DELAY_S` when they do not) and stops when the queue is idle.  Callbacks run
inside `poll()`, on the loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nvmet_p2p import nvme_pci as pci
from nvmet_p2p.backends.base import Backend, Completion
from nvmet_p2p.cmb import (
    Chunk,
    NvmeCmbProvider,
    Provider,
    SystemMemoryProvider,
    buffer_address,
    wmb,
)
from nvmet_p2p.errors import BackendError, P2PError
from nvmet_p2p.spec.identify import IdCtrl, IdNs
from nvmet_p2p.spec.status import DNR, Status
from nvmet_p2p.vfio import VfioBinding, VfioContainer, open_device

log = logging.getLogger(__name__)

NVME_AQ_DEPTH = 32  # admin commands are issued one at a time; 32 as the kernel uses
NVME_IO_DEPTH = 128  # I/O SQ/CQ entries: QD32 plus headroom, one slot stays empty
IOVA_BASE = 0x1000_0000  # our DMA memory; far below typical BAR windows and the MSI range
CMB_CBA_FALLBACK = 0x8000_0000  # controller base address when the BAR's own does not stick
ADMIN_TIMEOUT_S = 10.0  # TCG guests are slow; a healthy controller answers in milliseconds
POLL_MAX_DELAY_S = 0.001  # idle back-off cap of the attached poller
DRAIN_TIMEOUT_S = 5.0  # how long close() waits for in-flight I/O before shutting down


@dataclass
class _Cmd:
    cb: Completion
    bounce: Chunk | None = None
    read_into: memoryview | None = None  # copy bounce -> caller buffer on completion
    nbytes: int = 0


class _Regs:
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


class _BusRange(Protocol):
    """What a P2P request needs of its buffer: a Chunk, or a _SubChunk of an MDTS split."""

    @property
    def bus_addr(self) -> int | None: ...

    @property
    def size(self) -> int: ...


def _iova(chunk: Chunk) -> int:
    """The bus address of a chunk of a provider this backend mapped (map_provider set it)."""
    assert chunk.bus_addr is not None
    return chunk.bus_addr


class VfioNvmeBackend(Backend):
    """Namespace `nsid` of the PCIe NVMe controller at `bdf`, driven from userspace."""

    kind = "vfio-nvme"
    accepts_p2p = True

    def __init__(self, bdf: str, nsid: int = 1, *, sysfs_root: str = "/sys",
                 dev_root: str = "/dev/vfio", dma_size: int = 32 << 20,
                 io_depth: int = NVME_IO_DEPTH, enable_cmb: bool = True) -> None:
        self.bdf, self.nsid, self.p2p_client = bdf, nsid, bdf
        self.cmb: NvmeCmbProvider | None = None
        self.cmb_reason = "not probed"
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poll_handle: asyncio.Handle | None = None
        self._poll_delay = 0.0
        self._pending: deque[Callable[[], bool]] = deque()
        self._cmds: dict[int, _Cmd] = {}
        self._iova_next = IOVA_BASE
        self._mapped: list[tuple[Provider, list[int]]] = []
        self.stats = {"submitted": 0, "completed": 0, "bounced": 0, "p2p": 0, "errors": 0}
        self._binding: VfioBinding | None = None
        self._container: VfioContainer | None = None
        self._regs: _Regs | None = None
        self._dma: SystemMemoryProvider | None = None
        check_nvme_class(sysfs_root, bdf)
        try:
            self._binding, self._container, self._device = open_device(bdf, sysfs_root,
                                                                       dev_root)
            self._start(dma_size, io_depth, enable_cmb)
        except Exception:
            self._teardown(shutdown=False)
            raise

    # -- bring-up ----------------------------------------------------------------------------

    def _start(self, dma_size: int, io_depth: int, enable_cmb: bool) -> None:
        dev = self._device
        try:
            dev.reset()
        except P2PError as e:  # a controller reset (CC.EN=0) follows anyway
            log.info("%s: %s; continuing with a controller reset", self.bdf, e)
        dev.enable()
        try:
            bar0, _ = dev.map_region(0)
        except P2PError:
            # The MSI-X table may share BAR0 and refuse mmap: registers and the first
            # doorbells fit in two pages at the default stride.
            bar0, _ = dev.map_region(0, 0, 0x2000)
        self._regs = regs = _Regs(memoryview(bar0))
        self.cap = cap = pci.Cap.decode(regs.read64(pci.REG_CAP))
        self.vs = regs.read32(pci.REG_VS)
        if not cap.css_nvm or cap.mpsmin > 0:
            raise BackendError(f"{self.bdf}: controller lacks the NVM command set or 4 KiB "
                               f"pages (CAP {regs.read64(pci.REG_CAP):#x})")
        self._disable()

        self._dma = SystemMemoryProvider(dma_size, slab_size=dma_size, name=f"{self.bdf}/dma")
        self.map_provider(self._dma)
        aq_depth = NVME_AQ_DEPTH
        self.io_depth = io_depth = min(io_depth, cap.mqes + 1)
        asq, acq = self._zeroed(aq_depth * pci.SQE_SIZE), self._zeroed(aq_depth * pci.CQE_SIZE)
        self._id_buf = self._zeroed(4096)
        regs.write32(pci.REG_AQA, pci.aqa_value(aq_depth, aq_depth))
        regs.write64_lo_hi(pci.REG_ASQ, _iova(asq))
        regs.write64_lo_hi(pci.REG_ACQ, _iova(acq))
        regs.write32(pci.REG_CC, pci.cc_value(enable=True))
        self._wait_csts(pci.CSTS_RDY, pci.CSTS_RDY, "enable")
        self._asq = pci.SubmissionRing(0, asq.view, aq_depth, self._doorbell(
            pci.sq_doorbell(0, cap.dstrd)))
        self._acq = pci.CompletionRing(0, acq.view, aq_depth, self._doorbell(
            pci.cq_doorbell(0, cap.dstrd)))

        self.id_ctrl = IdCtrl.decode(self._identify(cns=1, nsid=0))
        self.id_ns = IdNs.decode(self._identify(cns=0, nsid=self.nsid))
        if self.id_ns.nsze == 0:
            raise BackendError(f"{self.bdf}: namespace {self.nsid} does not exist")
        self.block_size = 1 << self.id_ns.lba_shift
        self.nblocks = self.id_ns.nsze
        self.vwc = bool(self.id_ctrl.vwc & 1)
        page = pci.NVME_PAGE_SIZE
        self.max_xfer = (1 << self.id_ctrl.mdts) * page if self.id_ctrl.mdts else 1 << 20
        self.max_xfer = min(self.max_xfer, 1 << 20)

        sq, cq = self._zeroed(io_depth * pci.SQE_SIZE), self._zeroed(io_depth * pci.CQE_SIZE)
        self._admin(pci.ADMIN_CREATE_CQ, prp1=_iova(cq), cdw10=(io_depth - 1) << 16 | 1,
                    cdw11=1)  # physically contiguous, interrupts off
        self._admin(pci.ADMIN_CREATE_SQ, prp1=_iova(sq), cdw10=(io_depth - 1) << 16 | 1,
                    cdw11=1 << 16 | 1)  # CQ 1, physically contiguous
        self._sq = pci.SubmissionRing(1, sq.view, io_depth, self._doorbell(
            pci.sq_doorbell(1, cap.dstrd)))
        self._cq = pci.CompletionRing(1, cq.view, io_depth, self._doorbell(
            pci.cq_doorbell(1, cap.dstrd)))
        # One PRP list area per command slot, sized for the largest transfer.
        list_pages = max(1, pci.prp_list_pages(self.max_xfer))
        self._prp_lists = [self._zeroed(list_pages * page) for _ in range(io_depth)]
        self._free_cids = list(range(io_depth - 1))  # one SQ slot stays empty
        self._dsm_buf = self._zeroed(4096)
        if enable_cmb:
            self._enable_cmb()
        log.info("%s: ns %d, %d x %d-byte blocks, mdts %d KiB, vwc %s, CMB %s", self.bdf,
                 self.nsid, self.nblocks, self.block_size, self.max_xfer >> 10, self.vwc,
                 self.cmb.size if self.cmb else self.cmb_reason)

    def _zeroed(self, size: int) -> Chunk:
        assert self._dma is not None
        c = self._dma.alloc(size)
        if c is None:
            raise BackendError(f"{self.bdf}: DMA pool too small for controller queues")
        c.view[:] = bytes(size)
        return c

    def _doorbell(self, off: int) -> Callable[[int], None]:
        assert self._regs is not None
        r32, idx = self._regs.r32, off >> 2

        def ring(value: int) -> None:
            wmb()  # SQEs (or consumed CQEs) before the doorbell
            r32[idx] = value
        return ring

    def _wait_csts(self, mask: int, want: int, what: str) -> None:
        regs = self._regs
        assert regs is not None
        deadline = time.monotonic() + max(self.cap.to_ms / 1000, 0.5)
        while True:
            csts = regs.read32(pci.REG_CSTS)
            if csts & mask == want:
                return
            if csts & pci.CSTS_CFS and what != "disable":
                raise BackendError(f"{self.bdf}: controller fatal status during {what}")
            if csts == 0xFFFFFFFF:
                raise BackendError(f"{self.bdf}: controller does not respond (CSTS all ones)")
            if time.monotonic() > deadline:
                raise BackendError(f"{self.bdf}: {what} timed out after {self.cap.to_ms} ms "
                                   f"(CSTS {csts:#x})")
            time.sleep(0.001)

    def _disable(self) -> None:
        regs = self._regs
        assert regs is not None
        cc = regs.read32(pci.REG_CC)
        if cc & pci.CC_EN:
            regs.write32(pci.REG_CC, cc & ~pci.CC_EN)
        self._wait_csts(pci.CSTS_RDY, 0, "disable")

    def _admin(self, opcode: int, **fields: int) -> int:
        """Issue one admin command and poll for it; returns CQE dword 0."""
        self._asq.push(opcode, 0, **fields)
        self._asq.ring()
        deadline = time.monotonic() + ADMIN_TIMEOUT_S
        while True:
            done = self._acq.reap()
            if done:
                c = done[0]
                self._asq.head = c.sq_head
                if c.status:
                    raise BackendError(f"{self.bdf}: admin opcode {opcode:#x} failed, status "
                                       f"{c.status:#x}")
                return c.result
            if time.monotonic() > deadline:
                raise BackendError(f"{self.bdf}: admin opcode {opcode:#x} timed out")
            time.sleep(0.0002)

    def _identify(self, cns: int, nsid: int) -> bytes:
        self._admin(pci.ADMIN_IDENTIFY, nsid=nsid, prp1=_iova(self._id_buf), cdw10=cns)
        return bytes(self._id_buf.view)

    def _enable_cmb(self) -> None:
        regs, dev = self._regs, self._device
        assert regs is not None
        if not self.cap.cmbs:
            self.cmb_reason = "controller has no CMB (CAP.CMBS clear)"
            return
        regs.write32(pci.REG_CMBMSC, pci.CMBMSC_CRE)  # makes CMBLOC/CMBSZ readable
        cmbloc, cmbsz = regs.read32(pci.REG_CMBLOC), regs.read32(pci.REG_CMBSZ)
        if not cmbsz:
            self.cmb_reason = "CMBSZ reads 0 after CMBMSC.CRE"
            return
        bir = cmbloc & 7
        _, bar_size, _ = dev.region_info(bir)
        info = pci.CmbInfo.decode(cmbloc, cmbsz, bar_size)
        self.cmb_info = info
        if info.size == 0:
            self.cmb_reason = f"CMB at offset {info.offset:#x} lies outside BAR {bir}"
            return
        # The BAR's own bus address is what a peer (the RDMA NIC) uses, so make the
        # controller decode the same; keep it clear of our IOVAs.
        cba = self._pick_cba(dev.bar_address(bir) + info.offset, info.size)
        regs.write64(pci.REG_CMBMSC, pci.cmbmsc_value(cba))
        if regs.read64(pci.REG_CMBMSC) & ~0xFFF != cba or regs.read32(pci.REG_CMBSTS) & 1:
            # A 64-bit store may be split or refused; a CBA below 4 GiB needs one dword.
            cba = self._pick_cba(CMB_CBA_FALLBACK, info.size)
            regs.write64_lo_hi(pci.REG_CMBMSC, pci.cmbmsc_value(cba))
            if regs.read64(pci.REG_CMBMSC) & ~0xFFF != cba:
                self.cmb_reason = "controller did not accept a CMB base address"
                return
        self.cba = cba
        self.cmb = NvmeCmbProvider(dev, bir, offset=info.offset, size=info.size, bus_base=cba,
                                   wds=info.wds, rds=info.rds)
        self.cmb_reason = self.cmb.publish_reason or ""
        log.info("%s: CMB %d MiB in BAR %d at %#x (CBA %#x), WDS %s RDS %s%s", self.bdf,
                 info.size >> 20, bir, info.offset, cba, info.wds, info.rds,
                 " (clipped to the BAR)" if info.clipped else "")

    def _pick_cba(self, want: int, size: int) -> int:
        iova_end = self._iova_next + (1 << 30)  # room for later map_provider calls
        if want & 0xFFF or (want < iova_end and want + size > IOVA_BASE):
            return CMB_CBA_FALLBACK
        return want

    # -- memory the controller can reach -----------------------------------------------------

    def map_provider(self, provider: Provider) -> None:
        """IOMMU-map every region of a system-memory provider and give its chunks IOVAs.

        Buffers from such a provider are used in place (no bounce).
        """
        assert self._container is not None
        iovas = []
        for idx, (_addr, length, view) in enumerate(provider.regions()):
            iova = self._iova_next
            try:
                self._container.map_dma(view, iova, length)
            except P2PError as e:
                raise BackendError(f"{self.bdf}: cannot map {provider.name}: {e}") from e
            provider.set_region_bus_addr(idx, iova)
            iovas.append(iova)
            self._iova_next += -(-length // (2 << 20)) * (2 << 20)
        self._mapped.append((provider, iovas))

    def unmap_provider(self, provider: Provider) -> None:
        """Undo `map_provider` (before the provider closes, or its addresses could be reused)."""
        assert self._container is not None
        for i, (p, iovas) in enumerate(self._mapped):
            if p is provider:
                for idx, iova in enumerate(iovas):
                    self._container.unmap_dma(iova)
                    provider.set_region_bus_addr(idx, None)
                del self._mapped[i]
                return

    def _iova_of(self, buf: memoryview, nbytes: int) -> int | None:
        if buf.readonly:
            return None
        try:
            addr = buffer_address(buf)
        except (TypeError, ValueError):
            return None
        for provider, iovas in self._mapped:
            for (raddr, length, _), iova in zip(provider.regions(), iovas):
                if raddr <= addr and addr + nbytes <= raddr + length:
                    return iova + addr - raddr
        return None

    # -- data path ---------------------------------------------------------------------------

    def _issue(self, opcode: int, cmd: _Cmd, slba: int = 0, nlb: int = 0, fua: bool = False,
               bus: int | None = None, nbytes: int = 0, **extra: int) -> bool:
        """Put one command on the SQ; False when no slot is free (the caller queues it)."""
        if not self._free_cids:
            return False
        cid = self._free_cids.pop()
        fields = dict(extra)
        if nlb:
            fields["cdw10"], fields["cdw11"], fields["cdw12"] = pci.rw_cdws(slba, nlb, fua)
        if bus is not None:
            lst = self._prp_lists[cid]
            prp1, prp2, entries = pci.prp_layout(bus, nbytes, lst.bus_addr)
            if entries:
                struct.pack_into(f"<{len(entries)}Q", lst.view, 0, *entries)
            fields["prp1"], fields["prp2"] = prp1, prp2
        self._cmds[cid] = cmd
        self._sq.push(opcode, cid, nsid=self.nsid, **fields)
        self._sq.ring()
        self.stats["submitted"] += 1
        self._arm_poller()
        return True

    def _submit(self, issue: Callable[[], bool]) -> None:
        if self._closed:
            raise BackendError(f"{self.bdf}: backend is closed")
        if self._pending or not issue():
            self._pending.append(issue)
            self._arm_poller()

    def _check_range(self, slba: int, nlb: int, cb: Completion) -> bool:
        if nlb <= 0 or slba < 0 or slba + nlb > self.nblocks:
            cb(Status.LBA_RANGE | DNR)
            return False
        return True

    def _rw(self, opcode: int, slba: int, nlb: int, buf: memoryview | None, fua: bool,
            cb: Completion, chunk: _BusRange | None = None) -> None:
        if not self._check_range(slba, nlb, cb):
            return
        nbytes = nlb * self.block_size
        per_cmd = self.max_xfer // self.block_size
        if nlb > per_cmd:  # split at MDTS, complete once with the first error
            parts = [(s, min(per_cmd, slba + nlb - s)) for s in range(slba, slba + nlb, per_cmd)]
            join = _Join(len(parts), cb)
            for s, n in parts:
                off = (s - slba) * self.block_size
                sub_buf = None if buf is None else buf[off:off + n * self.block_size]
                sub_chunk = None if chunk is None else _SubChunk(chunk, off)
                self._rw(opcode, s, n, sub_buf, fua, join.part, sub_chunk)
            return
        if chunk is not None:
            if chunk.bus_addr is None or chunk.size < nbytes:
                cb(Status.INVALID_FIELD | DNR)
                return
            self.stats["p2p"] += 1
            self._submit(lambda: self._issue(opcode, _Cmd(cb), slba, nlb, fua, chunk.bus_addr,
                                             nbytes))
            return
        assert buf is not None
        if len(buf) < nbytes:
            cb(Status.SGL_INVALID_DATA | DNR)
            return
        self._submit(lambda: self._issue_sys(opcode, slba, nlb, buf, fua, cb, nbytes))

    def _issue_sys(self, opcode: int, slba: int, nlb: int, buf: memoryview, fua: bool,
                   cb: Completion, nbytes: int) -> bool:
        if not self._free_cids:
            return False
        bus = self._iova_of(buf, nbytes)
        if bus is not None and bus & 3 == 0:
            return self._issue(opcode, _Cmd(cb), slba, nlb, fua, bus, nbytes)
        assert self._dma is not None
        bounce = self._dma.alloc(nbytes)
        if bounce is None:
            return False  # retried after completions return bounce memory
        self.stats["bounced"] += 1
        if opcode == pci.IO_WRITE:
            bounce.view[:nbytes] = buf[:nbytes]
            cmd = _Cmd(cb, bounce)
        else:
            cmd = _Cmd(cb, bounce, buf, nbytes)
        return self._issue(opcode, cmd, slba, nlb, fua, bounce.bus_addr, nbytes)

    def submit_read(self, slba: int, nlb: int, buf: memoryview, cb: Completion) -> None:
        self._rw(pci.IO_READ, slba, nlb, buf, False, cb)

    def submit_write(self, slba: int, nlb: int, buf: memoryview, fua: bool,
                     cb: Completion) -> None:
        self._rw(pci.IO_WRITE, slba, nlb, buf, fua, cb)

    def submit_read_p2p(self, slba: int, nlb: int, chunk: Chunk, cb: Completion) -> None:
        """Read from the media straight into `chunk` (PRPs carry its bus address)."""
        self._rw(pci.IO_READ, slba, nlb, None, False, cb, chunk)

    def submit_write_p2p(self, slba: int, nlb: int, chunk: Chunk, fua: bool,
                         cb: Completion) -> None:
        """Write `chunk` (already filled, e.g. by the RDMA NIC) to the media."""
        self._rw(pci.IO_WRITE, slba, nlb, None, fua, cb, chunk)

    def submit_flush(self, cb: Completion) -> None:
        self._submit(lambda: self._issue(pci.IO_FLUSH, _Cmd(cb)))

    def submit_write_zeroes(self, slba: int, nlb: int, cb: Completion) -> None:
        if not self._check_range(slba, nlb, cb):
            return
        per_cmd = 0x10000
        parts = [(s, min(per_cmd, slba + nlb - s)) for s in range(slba, slba + nlb, per_cmd)]
        join = _Join(len(parts), cb)
        for s, n in parts:
            def issue(s: int = s, n: int = n) -> bool:
                return self._issue(pci.IO_WRITE_ZEROES, _Cmd(join.part), s, n)
            self._submit(issue)

    def submit_discard(self, ranges: list[tuple[int, int]], cb: Completion) -> None:
        if not ranges or len(ranges) > 256:
            cb(Status.INVALID_FIELD | DNR)
            return
        for slba, nlb in ranges:
            if nlb <= 0 or slba < 0 or slba + nlb > self.nblocks or nlb > 0xFFFFFFFF:
                cb(Status.LBA_RANGE | DNR)
                return
        payload = b"".join(pci_dsm_range(s, n) for s, n in ranges)

        def issue() -> bool:
            assert self._dma is not None
            if not self._free_cids:
                return False
            buf = self._dma.alloc(len(payload))
            if buf is None:
                return False
            buf.view[:] = payload
            return self._issue(pci.IO_DSM, _Cmd(cb, buf), bus=buf.bus_addr, nbytes=len(payload),
                               cdw10=len(ranges) - 1, cdw11=pci.DSM_ATTR_DEALLOCATE)
        self._submit(issue)

    # -- completions -------------------------------------------------------------------------

    def poll(self, limit: int = 1 << 30) -> int:
        """Reap completions, run their callbacks, submit what waited; returns the count."""
        if self._closed:
            return 0
        done = self._cq.reap(limit)
        for c in done:
            self._sq.head = c.sq_head
            cmd = self._cmds.pop(c.cid)
            self._free_cids.append(c.cid)
            self.stats["completed"] += 1
            if c.status:
                self.stats["errors"] += 1
            if cmd.bounce is not None:
                if cmd.read_into is not None and not c.status:
                    cmd.read_into[:cmd.nbytes] = cmd.bounce.view[:cmd.nbytes]
                cmd.bounce.free()
            cmd.cb(c.status)
        while self._pending and self._pending[0]():
            self._pending.popleft()
        return len(done)

    @property
    def inflight(self) -> int:
        return len(self._cmds) + len(self._pending)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Poll on `loop` whenever commands are in flight (see the module docstring)."""
        self._loop = loop
        self._arm_poller()

    def detach(self) -> None:
        if self._poll_handle is not None:
            self._poll_handle.cancel()
            self._poll_handle = None
        self._loop = None

    def _arm_poller(self) -> None:
        if self._loop is not None and self._poll_handle is None and self.inflight:
            self._poll_delay = 0.0
            self._poll_handle = self._loop.call_soon(self._poll_tick)

    def _poll_tick(self) -> None:
        self._poll_handle = None
        if self._loop is None or self._closed:
            return
        if self.poll():
            self._poll_delay = 0.0
        else:
            self._poll_delay = min(POLL_MAX_DELAY_S, self._poll_delay * 2 or 0.00002)
        if self.inflight:
            self._poll_handle = (self._loop.call_soon(self._poll_tick) if not self._poll_delay
                                 else self._loop.call_later(self._poll_delay, self._poll_tick))

    def wait_idle(self, timeout: float) -> bool:
        """Poll until nothing is in flight or `timeout` passes; True when idle."""
        deadline = time.monotonic() + timeout
        while self.inflight:
            if not self.poll() and time.monotonic() > deadline:
                return False
        return True

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Drain, delete the I/O queues, shut the controller down, give the device back."""
        if self._closed:
            return
        if self._regs is not None and hasattr(self, "_cq") and not self.wait_idle(
                DRAIN_TIMEOUT_S):
            log.warning("%s: %d commands still in flight at close; dropped", self.bdf,
                        self.inflight)
        self._teardown(shutdown=True)

    def _teardown(self, shutdown: bool) -> None:
        self._closed = True
        self.detach()
        self._pending.clear()
        self._cmds.clear()
        regs = self._regs
        if regs is not None and shutdown:
            try:
                if hasattr(self, "_sq"):
                    self._admin(pci.ADMIN_DELETE_SQ, cdw10=1)
                    self._admin(pci.ADMIN_DELETE_CQ, cdw10=1)
                cc = regs.read32(pci.REG_CC)
                regs.write32(pci.REG_CC, (cc & ~pci.CC_SHN_MASK) | pci.CC_SHN_NORMAL)
                self._wait_csts(pci.CSTS_SHST_MASK, pci.CSTS_SHST_CMPLT, "shutdown")
            except BackendError as e:
                log.warning("%s: unclean shutdown: %s", self.bdf, e)
        if self.cmb is not None:
            self.cmb.close()
        for ring in ("_acq", "_cq"):
            if hasattr(self, ring):
                getattr(self, ring).close()
        if regs is not None:
            regs.release()
            self._regs = None
        if self._container is not None:
            self._container.close()  # unmaps DMA, closes group and device
        if self._dma is not None:
            self._dma.close()
        if self._binding is not None:
            try:
                self._binding.close()  # back to the kernel nvme driver
            except P2PError as e:
                log.warning("%s", e)

    def describe(self) -> dict:
        d = super().describe()
        d.update(bdf=self.bdf, nsid=self.nsid, cmb=self.cmb.describe() if self.cmb else None,
                 cmb_reason=self.cmb_reason, **self.stats)
        return d


def pci_dsm_range(slba: int, nlb: int) -> bytes:
    """One 16-byte DSM range: context attributes 0, length, starting LBA."""
    return (0).to_bytes(4, "little") + nlb.to_bytes(4, "little") + slba.to_bytes(8, "little")


class _Join:
    """Completes `cb` once after `n` parts, with the first non-zero status."""

    def __init__(self, n: int, cb: Completion) -> None:
        self.left, self.cb, self.status = n, cb, 0

    def part(self, status: int) -> None:
        if status and not self.status:
            self.status = status
        self.left -= 1
        if self.left == 0:
            self.cb(self.status)


class _SubChunk:
    """The tail of a chunk from `off`, for MDTS splits of P2P requests."""

    def __init__(self, chunk: _BusRange, off: int) -> None:
        self.bus_addr = None if chunk.bus_addr is None else chunk.bus_addr + off
        self.size = chunk.size - off
