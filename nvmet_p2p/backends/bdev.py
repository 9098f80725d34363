"""The block device backend: a namespace on a whole disk, partition or loop device.

Owns what differs from a file: an exclusive O_DIRECT open, geometry from the
BLKSSZGET / BLKGETSIZE64 ioctls, zeroing with BLKZEROOUT, deallocation that the
kernel guarantees to read back as zeroes, the volatile-write-cache flag from sysfs,
the PCI function behind the device (``p2p_client``) for P2P topology, and P2P-flagged
I/O: an O_DIRECT read or write straight from a chunk of kernel p2pmem, which the block
layer issues as a P2P request (the NVMe device DMAs to or from the BAR, no bounce through
system memory).  The kernel takes P2P pages only for a queue with BLK_FEAT_PCI_P2PDMA,
which only the NVMe PCI driver sets, and refuses (EINVAL) when the provider is not
reachable from the device (pci_p2pdma_map_type()).
I/O itself (worker threads, bounce buffers, status mapping) is the file backend's.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import re
import struct

from nvmet_p2p.backends.file import (
    CompletionLoop,
    FileBackend,
    open_fd,
    pread_full,
)
from nvmet_p2p.cmb import Chunk
from nvmet_p2p.core.backend import Completion
from nvmet_p2p.errors import BackendError

log = logging.getLogger("nvmet_p2p.backend")

BLKSSZGET = 0x1268  # _IO(0x12, 104): logical block size, int
BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t): capacity in bytes
BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero {start, len} in bytes, unmapping if it can

_BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_NVME_CTRL = re.compile(r"^nvme\d+$")

P2P_KINDS = frozenset({"p2pmem"})  # pages the kernel can pin for O_DIRECT (ZONE_DEVICE)
P2P_NEEDS = ("O_DIRECT needs pages the kernel can pin, which only kernel p2pmem has (a BAR "
             "mapped through VFIO or sysfs resource has none)")


def sysfs_block_dir(rdev: int, sysfs: str = "/sys") -> str:
    """The device's directory under /sys/devices, whatever /dev name it was opened by."""
    return os.path.realpath(f"{sysfs}/dev/block/{os.major(rdev)}:{os.minor(rdev)}")


def pci_function_of(block_dir: str) -> str | None:
    """PCI BDF of the function a block device sits under, or None (loop, ram, virtual).

    The deepest BDF in the sysfs path is the endpoint function itself.  An NVMe
    multipath head lives under ``virtual/nvme-subsystem``; its controllers, linked
    from the subsystem directory, lead to the PCI function (the first one is taken).
    """
    parts = block_dir.split(os.sep)
    for part in reversed(parts):
        if _BDF.match(part):
            return part
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].startswith("nvme-subsys"):
            subsys = os.sep.join(parts[:i + 1])
            for entry in sorted(os.listdir(subsys)):
                if _NVME_CTRL.match(entry):
                    ctrl = os.path.realpath(os.path.join(subsys, entry))
                    for part in reversed(ctrl.split(os.sep)):
                        if _BDF.match(part):
                            return part
            break
    return None


def is_nvme_namespace(block_dir: str) -> bool:
    """True for a namespace of the kernel's NVMe driver (or a partition of one), which is
    what the block layer takes P2P pages for; its path has nvme/nvmeN/ or an nvme-subsys."""
    parts = block_dir.split(os.sep)
    return any(p.startswith("nvme-subsys") for p in parts) or any(
        a == "nvme" and _NVME_CTRL.match(b) for a, b in itertools.pairwise(parts))


def p2p_support(block_dir: str, path: str, o_direct: bool) -> tuple[frozenset[str], str]:
    """(provider kinds P2P-flagged I/O can use, what it needs) for a block device."""
    if not o_direct:
        return frozenset(), f"{path} is opened without O_DIRECT, and only O_DIRECT I/O is P2P"
    if not is_nvme_namespace(block_dir):
        return frozenset(), (f"{path} is not an NVMe namespace, and the block layer takes "
                             "P2P pages only for NVMe (BLK_FEAT_PCI_P2PDMA)")
    return P2P_KINDS, P2P_NEEDS


def volatile_write_cache(block_dir: str) -> bool:
    """True unless sysfs says the device writes through; partitions use the disk's queue."""
    for d in (block_dir, os.path.dirname(block_dir)):
        try:
            with open(os.path.join(d, "queue", "write_cache")) as f:
                return f.read().strip() != "write through"
        except OSError:
            continue
    return True  # unknown: claim a cache, so hosts send Flush and we fdatasync


class BdevBackend(FileBackend):
    kind = "bdev"

    def __init__(self, path: str, fd: int, *, block_size: int, nblocks: int,
                 loop: CompletionLoop, o_direct: bool, fallback_reason: str | None,
                 vwc: bool, p2p_client: str | None, logical_block_size: int,
                 p2p_kinds: frozenset[str] = frozenset(), p2p_needs: str = "") -> None:
        super().__init__(path, fd, block_size=block_size, nblocks=nblocks, loop=loop,
                         o_direct=o_direct, fallback_reason=fallback_reason)
        self.vwc = vwc
        self.p2p_client = p2p_client
        self.p2p_kinds, self.p2p_needs = p2p_kinds, p2p_needs
        self.logical_block_size = logical_block_size
        self.p2p_ios = {"read": 0, "write": 0}  # P2P-flagged requests submitted

    def describe(self) -> dict:
        return {**super().describe(), "logical_block_size": self.logical_block_size,
                "p2p_kinds": sorted(self.p2p_kinds), "p2p_ios": dict(self.p2p_ios)}

    # -- P2P-flagged I/O: O_DIRECT from the chunk's own pages, never bounced -------------
    def submit_read_p2p(self, slba: int, nlb: int, chunk: Chunk, cb: Completion) -> None:
        status = self._check(slba, nlb, chunk.view)
        if status:
            self._post(cb, status)
            return
        self.p2p_ios["read"] += 1
        self._submit(pread_full, cb, self._fd, chunk.view, slba * self.block_size)

    def submit_write_p2p(self, slba: int, nlb: int, chunk: Chunk, fua: bool,
                         cb: Completion) -> None:
        status = self._check(slba, nlb, chunk.view)
        if status:
            self._post(cb, status)
            return
        self.p2p_ios["write"] += 1
        # _pwrite, not _write: an EINVAL here is the kernel refusing P2P, not a reason to
        # turn O_DIRECT off for the whole device
        self._submit(self._pwrite, cb, chunk.view, slba * self.block_size, fua)

    def _direct_refused(self, e: OSError, direct: bool, what: str, offset: int,
                        nbytes: int) -> bool:
        refused = super()._direct_refused(e, direct, what, offset, nbytes)
        if refused and self.p2p_kinds:
            # Buffered I/O copies through the page cache: no P2P-flagged request any more.
            # Controllers that chose P2P memory decide again (`Ctrl.p2p_choice`).
            self.p2p_kinds = frozenset()
            self.p2p_needs = (f"{self.path} fell back to buffered I/O ({self.fallback_reason}), "
                              "and only O_DIRECT I/O is P2P")
        return refused

    def _zero_range(self, offset: int, length: int) -> None:
        # the kernel zeroes with Write Zeroes / unmap where the device can, else writes
        fcntl.ioctl(self._fd, BLKZEROOUT, struct.pack("=QQ", offset, length))

    def _discard_fallback(self, offset: int, length: int) -> None:
        # Not BLKDISCARD: a discarded range may read back as anything, and the backend
        # contract says zeroes.  The inherited hole punch unmaps only where the device
        # guarantees zeroes after unmap; elsewhere the kernel zeroes the range.
        self._zero_range(offset, length)


def open_bdev(path: str, rdev: int, *, block_size: int, buffered_io: bool,
              loop: CompletionLoop, sysfs: str = "/sys") -> BdevBackend:
    """Open a block device exclusively (O_EXCL: refused while mounted) as a namespace."""
    fd, o_direct, reason = open_fd(path, os.O_EXCL, buffered_io)
    try:
        lbs = struct.unpack("=i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
        nbytes = struct.unpack("=Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
        if lbs > block_size:
            raise BackendError(f"{path} has a logical block size of {lbs} bytes, larger than "
                               f"block_size {block_size}; set block_size to {lbs}")
        nblocks = nbytes // block_size
        if nblocks == 0:
            raise BackendError(f"{path} has no capacity ({nbytes} bytes); is it a loop "
                               f"device with no backing file?")
        block_dir = sysfs_block_dir(rdev, sysfs)
        vwc = volatile_write_cache(block_dir)
        p2p_client = pci_function_of(block_dir)
        kinds, needs = p2p_support(block_dir, path, o_direct)
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError):
            raise BackendError(f"cannot read the geometry of {path}: {e.strerror}") from e
        raise
    return BdevBackend(path, fd, block_size=block_size, nblocks=nblocks, loop=loop,
                       o_direct=o_direct, fallback_reason=reason, vwc=vwc,
                       p2p_client=p2p_client, logical_block_size=lbs, p2p_kinds=kinds,
                       p2p_needs=needs)
