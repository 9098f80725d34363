"""NVMe over PCIe for a userspace driver: registers, CMB decode, PRPs and queue rings.

Owns the controller register layout (CAP, CC, CSTS, AQA/ASQ/ACQ, CMBLOC/CMBSZ/CMBMSC,
doorbells), the decode of those values, PRP construction, SQE packing, the SQ/CQ ring
logic (tail, head, phase) and the command table of a queue pair (free command ids, what
each busy one carries and since when, which one has outlived the I/O timeout, and
completing them all at once when the controller is reset).  Pure logic over integers and
memoryviews: the same code runs on a bytearray in the unit tests and on an mmap'ed BAR and
DMA memory in the driver (`backends/vfio_nvme.py`).  Register offsets and fields follow NVMe base spec 1.4, §3.1.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nvmet_p2p.wire.limits import NVME_RW_FUA

# Register offsets and bits live in wire.regs (shared with the fabrics properties); the
# names are re-exported here because the driver reads them as `pci.REG_CC` and so on.
from nvmet_p2p.wire.regs import (  # noqa: F401
    CC_CSS_NVM,
    CC_EN,
    CC_IOCQES,
    CC_IOSQES,
    CC_SHN_MASK,
    CC_SHN_NORMAL,
    CMBMSC_CMSE,
    CMBMSC_CRE,
    CMBSTS_CBAI,
    CSTS_CFS,
    CSTS_RDY,
    CSTS_SHST_CMPLT,
    CSTS_SHST_MASK,
    REG_ACQ,
    REG_AQA,
    REG_ASQ,
    REG_CAP,
    REG_CC,
    REG_CMBLOC,
    REG_CMBMSC,
    REG_CMBSTS,
    REG_CMBSZ,
    REG_CSTS,
    REG_DBS,
    REG_INTMS,
    REG_VS,
)

NVME_PAGE_SHIFT = 12  # CC.MPS = 0: the 4 KiB memory page every PRP is built for
NVME_PAGE_SIZE = 1 << NVME_PAGE_SHIFT
SQE_SIZE = 64
CQE_SIZE = 16

# Admin and I/O opcodes used by the driver (spec/command.py has the full tables).
ADMIN_CREATE_SQ = 0x01
ADMIN_DELETE_SQ = 0x00
ADMIN_DELETE_CQ = 0x04
ADMIN_CREATE_CQ = 0x05
ADMIN_IDENTIFY = 0x06
ADMIN_SET_FEATURES = 0x09
IO_FLUSH = 0x00
IO_WRITE = 0x01
IO_READ = 0x02
IO_WRITE_ZEROES = 0x08
IO_DSM = 0x09
FEAT_NUM_QUEUES = 0x07
IO_OPCODE_NAMES = {IO_FLUSH: "Flush", IO_WRITE: "Write", IO_READ: "Read",
                   IO_WRITE_ZEROES: "Write Zeroes", IO_DSM: "Dataset Management"}


# -- CAP -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cap:
    """Controller Capabilities (offset 0x00)."""

    mqes: int  # maximum queue entries, 0's based
    cqr: bool  # contiguous queues required
    to_ms: int  # CC.EN/CSTS.RDY transition deadline (CAP.TO is in 500 ms units)
    dstrd: int  # doorbell stride: 4 << dstrd bytes
    css_nvm: bool
    mpsmin: int  # minimum memory page size: 4 KiB << mpsmin
    mpsmax: int
    cmbs: bool  # CMBLOC/CMBSZ/CMBMSC are implemented

    @classmethod
    def decode(cls, v: int) -> Cap:
        return cls(mqes=v & 0xFFFF, cqr=bool(v >> 16 & 1), to_ms=(v >> 24 & 0xFF) * 500,
                   dstrd=v >> 32 & 0xF, css_nvm=bool(v >> 37 & 1), mpsmin=v >> 48 & 0xF,
                   mpsmax=v >> 52 & 0xF, cmbs=bool(v >> 57 & 1))

    @property
    def doorbell_stride(self) -> int:
        return 4 << self.dstrd


def sq_doorbell(qid: int, dstrd: int) -> int:
    """Offset of SQ `qid`'s tail doorbell."""
    return REG_DBS + (2 * qid) * (4 << dstrd)


def cq_doorbell(qid: int, dstrd: int) -> int:
    """Offset of CQ `qid`'s head doorbell."""
    return REG_DBS + (2 * qid + 1) * (4 << dstrd)


def cc_value(enable: bool = True, shutdown: bool = False) -> int:
    """CC for the NVM command set, 4 KiB pages, round robin, 64/16-byte entries."""
    return (CC_EN if enable else 0) | CC_CSS_NVM | CC_IOSQES | CC_IOCQES | (
        CC_SHN_NORMAL if shutdown else 0)


def aqa_value(sq_entries: int, cq_entries: int) -> int:
    return ((cq_entries - 1) << 16) | (sq_entries - 1)


# -- Controller Memory Buffer ----------------------------------------------------------------

_SZU_BYTES = [4 << 10 << (4 * i) for i in range(7)]  # 4K, 64K, 1M, 16M, 256M, 4G, 64G


@dataclass(frozen=True)
class CmbInfo:
    """CMBLOC + CMBSZ decoded; `size` already clipped to what the BAR really holds."""

    bir: int  # BAR indicator: which BAR holds the CMB
    offset: int  # byte offset of the CMB in that BAR
    size: int  # bytes usable
    declared_size: int  # SZ * SZU as the controller states it
    sqs: bool  # submission queues may live in the CMB
    cqs: bool
    lists: bool  # PRP/SGL lists may live in the CMB
    rds: bool  # read data (controller-to-host transfers) may target the CMB
    wds: bool  # write data may come from the CMB
    clipped: bool

    @classmethod
    def decode(cls, cmbloc: int, cmbsz: int, bar_size: int) -> CmbInfo:
        unit = _szu_bytes(cmbsz >> 8 & 0xF)
        declared = (cmbsz >> 12) * unit
        offset = (cmbloc >> 12) * unit
        size = max(0, min(declared, bar_size - offset))
        return cls(bir=cmbloc & 0x7, offset=offset, size=size, declared_size=declared,
                   sqs=bool(cmbsz & 1), cqs=bool(cmbsz & 2), lists=bool(cmbsz & 4),
                   rds=bool(cmbsz & 8), wds=bool(cmbsz & 16), clipped=size < declared)

    @property
    def p2p_capable(self) -> bool:
        """Publishable as p2pmem: the kernel's rule is WDS and RDS both set."""
        return self.wds and self.rds and self.size > 0


def _szu_bytes(szu: int) -> int:
    if szu >= len(_SZU_BYTES):
        raise ValueError(f"CMBSZ.SZU {szu} is reserved")
    return _SZU_BYTES[szu]


def cmbmsc_value(cba: int, *, cre: bool = True, cmse: bool = True) -> int:
    """CMBMSC with Capabilities Registers Enabled and Memory Space Enabled at base `cba`."""
    if cba & 0xFFF:
        raise ValueError(f"CMB controller base address {cba:#x} is not 4 KiB aligned")
    return cba | (CMBMSC_CMSE if cmse else 0) | (CMBMSC_CRE if cre else 0)


# -- PRPs ------------------------------------------------------------------------------------


def prp_pages(addr: int, length: int, page_size: int = NVME_PAGE_SIZE) -> list[int]:
    """Address of each memory page a transfer touches: the first may carry an offset."""
    if length <= 0:
        raise ValueError("a PRP transfer needs a positive length")
    if addr & 3:
        raise ValueError(f"PRP data address {addr:#x} is not dword aligned")
    first_end = (addr | (page_size - 1)) + 1
    pages = [addr]
    p = first_end
    while p < addr + length:
        pages.append(p)
        p += page_size
    return pages


def prp_layout(addr: int, length: int, list_bus: int | None,
               page_size: int = NVME_PAGE_SIZE) -> tuple[int, int, list[int]]:
    """(PRP1, PRP2, PRP list entries) for a physically contiguous transfer at `addr`.

    One or two pages need no list; otherwise PRP2 points at `list_bus` and the entries are
    written there as little-endian u64s.  When more entries are needed than a page holds, the
    last slot of each list page chains to the next page (list pages are contiguous from
    `list_bus`, which must be page aligned).
    """
    pages = prp_pages(addr, length, page_size)
    if len(pages) == 1:
        return pages[0], 0, []
    if len(pages) == 2:
        return pages[0], pages[1], []
    if list_bus is None or list_bus % page_size:
        raise ValueError("a transfer over more than two pages needs a page-aligned PRP list")
    per_page = page_size // 8
    rest = pages[1:]
    entries: list[int] = []
    page_no = 0
    while len(rest) > per_page:
        page_no += 1
        entries.extend(rest[:per_page - 1])
        entries.append(list_bus + page_no * page_size)  # chain pointer
        rest = rest[per_page - 1:]
    entries.extend(rest)
    return pages[0], list_bus, entries


def prp_list_pages(length: int, page_size: int = NVME_PAGE_SIZE) -> int:
    """List pages needed, in the worst case of an unaligned start, for `length` bytes."""
    entries = length // page_size + 1
    if entries <= 1:
        return 0
    per_page = page_size // 8
    pages = 1
    while entries > per_page:
        entries -= per_page - 1
        pages += 1
    return pages


# -- SQEs and CQEs ---------------------------------------------------------------------------

_SQE = struct.Struct("<BBHI8xQQQIIIIII")
_CQE_DW3 = struct.Struct("<I")
_CQE = struct.Struct("<IIHHHH")


def pack_sqe(buf: memoryview | bytearray, off: int, opcode: int, cid: int, nsid: int = 0,
             prp1: int = 0, prp2: int = 0, cdw10: int = 0, cdw11: int = 0, cdw12: int = 0,
             cdw13: int = 0, cdw14: int = 0, cdw15: int = 0) -> None:
    """Write a 64-byte PRP-addressed SQE (PSDT 0, no fusing, no metadata) at `buf[off:]`."""
    _SQE.pack_into(buf, off, opcode, 0, cid, nsid, 0, prp1, prp2, cdw10, cdw11, cdw12, cdw13,
                   cdw14, cdw15)


def rw_cdws(slba: int, nlb: int, fua: bool = False) -> tuple[int, int, int]:
    """CDW10-12 of Read/Write/Write Zeroes (`nlb` is the real count, not 0's based)."""
    if not 1 <= nlb <= 0x10000:
        raise ValueError(f"NLB {nlb} out of range 1..65536")
    return slba & 0xFFFFFFFF, slba >> 32, (nlb - 1) | (NVME_RW_FUA if fua else 0)


@dataclass(frozen=True)
class Completion:
    result: int
    sq_head: int
    sq_id: int
    cid: int
    status: int  # 15-bit status field (SCT << 8 | SC, with DNR/More)


def unpack_cqe(buf: memoryview | bytearray, off: int) -> Completion:
    dw0, _dw1, head, sqid, cid, st = _CQE.unpack_from(buf, off)
    return Completion(dw0, head, sqid, cid, st >> 1)


# -- rings -----------------------------------------------------------------------------------


class SubmissionRing:
    """The host side of an SQ: where the next SQE goes and when the ring is full.

    `ring_doorbell(tail)` is called by `ring()`; the caller orders the SQE stores before it
    (`cmb.wmb()`).  One slot stays empty so that head == tail means empty.
    """

    def __init__(self, qid: int, mem: memoryview, entries: int,
                 ring_doorbell: Callable[[int], None]) -> None:
        if len(mem) < entries * SQE_SIZE:
            raise ValueError(f"SQ {qid}: {len(mem)} bytes do not hold {entries} entries")
        self.qid, self.mem, self.entries = qid, mem, entries
        self.tail = 0
        self.head = 0  # as last reported by a CQE
        self._ring_doorbell = ring_doorbell

    def free_slots(self) -> int:
        return (self.head - self.tail - 1) % self.entries

    def push(self, opcode: int, cid: int, **fields: int) -> None:
        if self.free_slots() == 0:
            raise OverflowError(f"SQ {self.qid} is full")
        pack_sqe(self.mem, self.tail * SQE_SIZE, opcode, cid, **fields)
        self.tail = (self.tail + 1) % self.entries

    def ring(self) -> None:
        self._ring_doorbell(self.tail)


class CompletionRing:
    """The host side of a CQ: phase-tagged entries consumed in order, head doorbell."""

    def __init__(self, qid: int, mem: memoryview, entries: int,
                 ring_doorbell: Callable[[int], None]) -> None:
        if len(mem) < entries * CQE_SIZE:
            raise ValueError(f"CQ {qid}: {len(mem)} bytes do not hold {entries} entries")
        self.qid, self.mem, self.entries = qid, mem, entries
        self.head = 0
        self.phase = 1  # the controller writes phase 1 on its first pass over zeroed memory
        self._ring_doorbell = ring_doorbell
        self._dw3 = mem.cast("B")[:entries * CQE_SIZE].cast("I")  # 32-bit loads of DW3

    def reap(self, limit: int = 1 << 30) -> list[Completion]:
        """Every new completion (up to `limit`); rings the head doorbell once if any."""
        done: list[Completion] = []
        dw3, head, phase = self._dw3, self.head, self.phase
        while len(done) < limit and (dw3[head * 4 + 3] >> 16) & 1 == phase:
            done.append(unpack_cqe(self.mem, head * CQE_SIZE))
            head += 1
            if head == self.entries:
                head, phase = 0, phase ^ 1
        if done:
            self.head, self.phase = head, phase
            self._ring_doorbell(head)
        return done

    def close(self) -> None:
        self._dw3.release()


# -- the commands of a queue pair ------------------------------------------------------------

NVME_IO_TIMEOUT_S = 30.0  # the Linux nvme_core.io_timeout default


class DmaBuffer(Protocol):
    """What a command may hold in DMA memory until it completes (a `cmb.Chunk`)."""

    @property
    def view(self) -> memoryview: ...

    def free(self) -> None: ...


@dataclass(eq=False, slots=True)
class Cmd:
    """One command between submission and completion: whom to tell, what to give back."""

    cb: Callable[[int], None]
    bounce: DmaBuffer | None = None  # freed at completion
    read_into: memoryview | None = None  # a read's bounce data is copied here on success
    nbytes: int = 0
    opcode: int = -1  # set by CommandTable.start, as is `started`
    started: float = 0.0

    def complete(self, status: int, release: bool = True) -> None:
        """Copy a bounced read out, free the bounce buffer, call back with `status`.

        `release=False` keeps the bounce buffer allocated: for a controller whose DMA could
        not be stopped, the memory must not be handed to another command.
        """
        bounce, self.bounce = self.bounce, None
        if bounce is not None and release:
            if self.read_into is not None and not status:
                self.read_into[:self.nbytes] = bounce.view[:self.nbytes]
            bounce.free()
        self.cb(status)


Issue = Callable[[], bool]  # puts a waiting command on the SQ; False: still no room


class CommandTable:
    """The commands of one I/O queue pair, and the submissions waiting for room.

    A busy command id maps to its `Cmd`; `pending` holds (issue, cb) pairs of submissions
    that found no free id (or no bounce memory) yet.  Every command gets the same time
    limit, so the oldest busy command is the first to expire: `busy` keeps submission
    order (dicts keep insertion order, and a reused id goes to the end) and `expired` looks
    at its first entry only, which keeps the check cheap enough for every poll.
    """

    def __init__(self, depth: int, timeout_s: float = NVME_IO_TIMEOUT_S) -> None:
        if not timeout_s > 0:
            raise ValueError(f"I/O timeout must be positive, not {timeout_s}")
        if depth < 2:
            raise ValueError(f"a queue of {depth} entries holds no command")
        self.depth, self.timeout_s = depth, timeout_s
        self.busy: dict[int, Cmd] = {}
        self.pending: deque[tuple[Issue, Callable[[int], None]]] = deque()
        self._free = list(range(depth - 1))  # one SQ slot stays empty

    def __len__(self) -> int:
        return len(self.busy) + len(self.pending)

    def has_free(self) -> bool:
        return bool(self._free)

    def start(self, cmd: Cmd, opcode: int, now: float) -> int | None:
        """A free command id for `cmd`, its clock started; None when every id is busy."""
        if not self._free:
            return None
        cid = self._free.pop()
        cmd.opcode, cmd.started = opcode, now
        self.busy[cid] = cmd
        return cid

    def finish(self, cid: int) -> Cmd | None:
        """The command a completion names, its id free again; None if `cid` is not busy."""
        cmd = self.busy.pop(cid, None)
        if cmd is not None:
            self._free.append(cid)
        return cmd

    def expired(self, now: float) -> tuple[int, Cmd] | None:
        """(cid, command) of the oldest busy command if it is past its deadline."""
        oldest = next(iter(self.busy.items()), None)
        if oldest is not None and now - oldest[1].started >= self.timeout_s:
            return oldest
        return None

    def fail_all(self, status: int, release: bool = True) -> int:
        """Complete every busy and every pending command with `status`; returns how many.

        Only for a controller that can no longer DMA (see `Cmd.complete` for `release`).
        The table is emptied first, so a callback that submits again finds it empty.
        """
        busy, pending = list(self.busy.values()), list(self.pending)
        self.busy.clear()
        self.pending.clear()
        self._free = list(range(self.depth - 1))
        for cmd in busy:
            cmd.complete(status, release)
        for _issue, cb in pending:
            cb(status)
        return len(busy) + len(pending)
