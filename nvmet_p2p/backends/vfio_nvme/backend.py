"""The userspace NVMe driver backend: a PCIe NVMe controller owned through VFIO.

Owns one controller for the lifetime of a namespace: binding it to vfio-pci, reset,
admin queue, Identify, one I/O queue pair, Read/Write/Flush/Write Zeroes/DSM with PRPs,
completion polling, the CMB (enabled through CMBMSC, published as `NvmeCmbProvider`),
clean shutdown and giving the device back to its kernel driver.
The controller half (reset, admin queue, Identify, queue pair, CMB, IOMMU mappings,
stopping DMA) is `controller`; this module is the namespace backend on top of it: the
data path, completions, deadlines and recovery, and teardown.

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

Timeouts, as the kernel's nvme_timeout() ends up handling them: every I/O command has a
deadline (`io_timeout`, 30 s by default like nvme_core.io_timeout), checked by every
`poll()` (so by the attached poller too) against an injected clock (`target.clock`), after
the CQ has been reaped so that a late completion is not a timeout.  A command past its
deadline, or a completion naming a command that is not in flight, means the controller is
no longer trusted:

1. it is disabled (CC.EN = 0, CSTS.RDY = 0 within CAP.TO; bus mastering off when it does
   not get there), so it can no longer DMA into our buffers;
2. then every command in flight or waiting completes with Command Abort Requested, DNR
   clear (the host retries), bounce buffers go back, and one error names the device, the
   command (opcode, cid) and its age;
3. then the controller is brought up by the code that started it (`_bring_up`: function
   reset, admin queue, Identify, the I/O queue pair, the CMB at the same bus address).
   Submissions made meanwhile wait, and go out once it serves again.

If the bring-up fails the backend is failed: every submission completes at once with
Internal Error + DNR, `describe()` says why, and `close()` still gives the device back.
With a loop attached, steps 1 and 3 run on a thread (they may wait for CAP.TO and the admin
timeouts; the reactor keeps serving other namespaces meanwhile); completions still run on
the loop.  `stats` counts `timeouts`, `resets` (bring-ups that succeeded), `aborted` and
`refused` commands.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import struct
import threading
import time
from collections.abc import Callable
from typing import Protocol

from nvmet_p2p import logfmt
from nvmet_p2p.backends.base import Backend, Completion
from nvmet_p2p.backends.vfio_nvme import controller
from nvmet_p2p.backends.vfio_nvme import nvme_pci as pci
from nvmet_p2p.backends.vfio_nvme.nvme_pci import Cmd
from nvmet_p2p.backends.vfio_nvme.vfio import VfioBinding, VfioContainer, open_device
from nvmet_p2p.cmb import (
    Chunk,
    NvmeCmbProvider,
    Provider,
    SystemMemoryProvider,
    buffer_address,
)
from nvmet_p2p.core.clock import Clock
from nvmet_p2p.errors import BackendError, P2PError
from nvmet_p2p.wire.command import NVME_DSM_RANGE
from nvmet_p2p.wire.identify import IdCtrl, IdNs
from nvmet_p2p.wire.limits import NVME_DSMGMT_AD
from nvmet_p2p.wire.status import DNR, Status, status_name

log = logging.getLogger(__name__)

NVME_IO_DEPTH = 128  # I/O SQ/CQ entries: QD32 plus headroom, one slot stays empty
POLL_MAX_DELAY_S = 0.001  # idle back-off cap of the attached poller
DRAIN_TIMEOUT_S = 5.0  # how long close() waits for in-flight I/O before shutting down

# What the commands caught by a timeout reset complete with: Command Abort Requested, DNR
# clear.  It is what they are (aborted by us, not failed by the media) and what SPDK's
# target reports for bdev I/O aborted by a reset; a Linux host retries any status without
# DNR (nvme_decide_disposition), and this one is not a path error (SCT 3), so multipath does
# not fail the path over for one stuck command.
ABORTED = Status.ABORT_REQ
# Once the controller could not be brought back, nothing sent to it can succeed: Internal
# Error with DNR, as the kernel target reports a failed backing device (blk_to_nvme_status).
FAILED = Status.INTERNAL | DNR


class _State(enum.Enum):
    """Where the controller stands for us, and what each state waits for."""

    LIVE = "live"  # serving: commands go to the SQ; waits for completions and deadlines
    RESETTING = "resetting"  # disabled after a timeout; waits for the bring-up to end
    FAILED = "failed"  # the bring-up failed; waits only for close()


_LIVE = _State.LIVE  # a module global: poll() compares with it on every call


class _BusRange(Protocol):
    """What a P2P request needs of its buffer: a Chunk, or a _SubChunk of an MDTS split."""

    @property
    def bus_addr(self) -> int | None: ...

    @property
    def size(self) -> int: ...


class VfioNvmeBackend(Backend):
    """Namespace `nsid` of the PCIe NVMe controller at `bdf`, driven from userspace.

    `io_timeout` (seconds) is the deadline of every I/O command, measured on `clock`
    (monotonic time unless a test injects one); see the module docstring for what expiry does.
    """

    kind = "vfio-nvme"
    # PRPs carry a bus address, known for BARs our driver or sysfs maps; kernel p2pmem
    # has one too, but the kernel does not tell userspace what it is
    p2p_kinds = frozenset({"nvme-cmb", "vfio-bar", "sysfs-bar"})
    p2p_needs = "its PRPs carry the memory's bus address, which only BARs we map have"
    _binding: VfioBinding | None
    _container: VfioContainer | None
    cba: int  # the CMB's controller base address, once enabled
    _cba_store: Callable[[int, int], None]  # the CMBMSC store the controller accepted it by
    # set up by controller.start() / bring_up(): the controller, its queues and their memory
    cap: pci.Cap
    vs: int
    io_depth: int
    max_xfer: int  # bytes per command: MDTS, capped at MAX_XFER
    id_ctrl: IdCtrl
    id_ns: IdNs
    cmb_info: pci.CmbInfo
    _asq_mem: Chunk
    _acq_mem: Chunk
    _sq_mem: Chunk
    _cq_mem: Chunk
    _id_buf: Chunk
    _prp_lists: list[Chunk]  # one PRP list area per command id
    _asq: pci.SubmissionRing
    _acq: pci.CompletionRing
    _sq: pci.SubmissionRing
    _cq: pci.CompletionRing

    def __init__(self, bdf: str, nsid: int = 1, *, sysfs_root: str = "/sys",
                 dev_root: str = "/dev/vfio", dma_size: int = 32 << 20,
                 io_depth: int = NVME_IO_DEPTH, enable_cmb: bool = True,
                 io_timeout: float = pci.NVME_IO_TIMEOUT_S, clock: Clock | None = None) -> None:
        self.bdf, self.nsid, self.p2p_client, self.path = bdf, nsid, bdf, bdf
        self._init_state(io_depth, io_timeout, clock)
        self._want_cmb = enable_cmb
        controller.check_nvme_class(sysfs_root, bdf)
        try:
            self._binding, self._container, self._device = open_device(bdf, sysfs_root,
                                                                       dev_root)
            self._start(dma_size, io_depth)
        except Exception:
            self._teardown(shutdown=False)
            raise

    def _init_state(self, io_depth: int, io_timeout: float, clock: Clock | None) -> None:
        """Everything but the device: bookkeeping, counters, the clock deadlines run on."""
        if not io_timeout > 0:
            raise BackendError(f"{self.bdf}: io_timeout must be a positive number of seconds, "
                               f"not {io_timeout}")
        self.io_timeout = io_timeout
        # Read on every submission and poll: the bound method, or time.monotonic itself.
        self._now = clock.now if clock is not None else time.monotonic
        self._table = pci.CommandTable(io_depth, io_timeout)
        self._state = _State.LIVE
        self.failed_reason = ""
        self._reset_thread: threading.Thread | None = None
        self._dma_stopped = True  # False while a controller's DMA could not be stopped
        self.cmb: NvmeCmbProvider | None = None
        self.cmb_reason = "not probed"
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poll_handle: asyncio.Handle | None = None
        self._poll_delay = 0.0
        self._iova_next = controller.IOVA_BASE
        self._mapped: list[tuple[Provider, list[int]]] = []
        self.stats = {"submitted": 0, "completed": 0, "bounced": 0, "p2p": 0, "errors": 0,
                      "timeouts": 0, "resets": 0, "aborted": 0, "refused": 0}
        self._binding = None
        self._container = None
        self._regs: controller.Regs | None = None
        self._dma: SystemMemoryProvider | None = None

    # -- bring-up ----------------------------------------------------------------------------

    def _start(self, dma_size: int, io_depth: int) -> None:
        controller.start(self, dma_size, io_depth)

    def _bring_up(self) -> None:
        controller.bring_up(self)

    # -- memory the controller can reach -----------------------------------------------------

    def map_provider(self, provider: Provider) -> None:
        """IOMMU-map every region of a system-memory provider and give its chunks IOVAs.

        Buffers from such a provider are used in place (no bounce).
        """
        controller.map_provider(self, provider)

    def unmap_provider(self, provider: Provider) -> None:
        """Undo `map_provider` (before the provider closes, or its addresses could be reused)."""
        controller.unmap_provider(self, provider)

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

    def _issue(self, opcode: int, cmd: Cmd, slba: int = 0, nlb: int = 0, fua: bool = False,
               bus: int | None = None, nbytes: int = 0, **extra: int) -> bool:
        """Put one command on the SQ; False when no command id is free (the caller queues it)."""
        cid = self._table.start(cmd, opcode, self._now())
        if cid is None:
            return False
        fields = dict(extra)
        if nlb:
            fields["cdw10"], fields["cdw11"], fields["cdw12"] = pci.rw_cdws(slba, nlb, fua)
        if bus is not None:
            lst = self._prp_lists[cid]
            prp1, prp2, entries = pci.prp_layout(bus, nbytes, lst.bus_addr)
            if entries:
                struct.pack_into(f"<{len(entries)}Q", lst.view, 0, *entries)
            fields["prp1"], fields["prp2"] = prp1, prp2
        self._sq.push(opcode, cid, nsid=self.nsid, **fields)
        self._sq.ring()
        self.stats["submitted"] += 1
        self._arm_poller()
        return True

    def _submit(self, issue: pci.Issue, cb: Completion) -> None:
        if self._closed:
            raise BackendError(f"{self.bdf}: backend is closed")
        table = self._table
        if self._state is _LIVE:
            if not table.pending and issue():
                return
        elif self._state is _State.FAILED:
            self.stats["refused"] += 1
            cb(FAILED)
            return
        table.pending.append((issue, cb))  # no room yet, or the controller is being reset
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
            self._submit(lambda: self._issue(opcode, Cmd(cb), slba, nlb, fua, chunk.bus_addr,
                                             nbytes), cb)
            return
        assert buf is not None
        if len(buf) < nbytes:
            cb(Status.SGL_INVALID_DATA | DNR)
            return
        self._submit(lambda: self._issue_sys(opcode, slba, nlb, buf, fua, cb, nbytes), cb)

    def _issue_sys(self, opcode: int, slba: int, nlb: int, buf: memoryview, fua: bool,
                   cb: Completion, nbytes: int) -> bool:
        if not self._table.has_free():
            return False
        bus = self._iova_of(buf, nbytes)
        if bus is not None and bus & 3 == 0:
            return self._issue(opcode, Cmd(cb), slba, nlb, fua, bus, nbytes)
        assert self._dma is not None
        bounce = self._dma.alloc(nbytes)
        if bounce is None:
            return False  # retried after completions return bounce memory
        self.stats["bounced"] += 1
        if opcode == pci.IO_WRITE:
            bounce.view[:nbytes] = buf[:nbytes]
            cmd = Cmd(cb, bounce)
        else:
            cmd = Cmd(cb, bounce, buf, nbytes)
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
        self._submit(lambda: self._issue(pci.IO_FLUSH, Cmd(cb)), cb)

    def submit_write_zeroes(self, slba: int, nlb: int, cb: Completion) -> None:
        if not self._check_range(slba, nlb, cb):
            return
        per_cmd = 0x10000
        parts = [(s, min(per_cmd, slba + nlb - s)) for s in range(slba, slba + nlb, per_cmd)]
        join = _Join(len(parts), cb)
        for s, n in parts:
            def issue(s: int = s, n: int = n) -> bool:
                return self._issue(pci.IO_WRITE_ZEROES, Cmd(join.part), s, n)
            self._submit(issue, join.part)

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
            if not self._table.has_free():
                return False
            buf = self._dma.alloc(len(payload))
            if buf is None:
                return False
            buf.view[:] = payload
            return self._issue(pci.IO_DSM, Cmd(cb, buf), bus=buf.bus_addr, nbytes=len(payload),
                               cdw10=len(ranges) - 1, cdw11=NVME_DSMGMT_AD)
        self._submit(issue, cb)

    # -- completions -------------------------------------------------------------------------

    def poll(self, limit: int = 1 << 30) -> int:
        """Reap completions, run their callbacks, check deadlines, submit what waited.

        Returns the number of commands completed, including those a timeout aborted here.
        """
        if self._state is not _LIVE or self._closed:
            return 0
        table = self._table
        done = self._cq.reap(limit)
        n = len(done)
        if n:
            for i, c in enumerate(done):
                self._sq.head = c.sq_head
                cmd = table.finish(c.cid)
                if cmd is None:
                    return i + self._recover(f"completion for command id {c.cid}, which is "
                                             f"not in flight (status {c.status:#x})")
                self.stats["completed"] += 1
                if c.status:
                    self.stats["errors"] += 1
                cmd.complete(c.status)
            if self._state is not _LIVE or self._closed:  # a callback closed us
                return n
        if table.busy and n < limit:  # a full reap may have left completions in the CQ
            expired = table.expired(self._now())
            if expired is not None:
                return n + self._time_out(*expired)
        pending = table.pending
        while pending and pending[0][0]():
            pending.popleft()
        return n

    @property
    def inflight(self) -> int:
        return len(self._table)

    @property
    def state(self) -> str:
        """"live", "resetting" (after a timeout) or "failed" (see failed_reason)."""
        return self._state.value

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

    # -- timeouts and recovery ---------------------------------------------------------------

    def _time_out(self, cid: int, cmd: Cmd) -> int:
        self.stats["timeouts"] += 1
        name = pci.IO_OPCODE_NAMES.get(cmd.opcode, "I/O command")
        age = self._now() - cmd.started
        return self._recover(f"{name} (opcode {cmd.opcode:#04x}, cid {cid}) timed out after "
                             f"{age:.1f} s (io_timeout {self.io_timeout:g} s)")

    def _recover(self, reason: str) -> int:
        """The controller is not trusted any more: stop its DMA, abort everything, reset it.

        Returns the number of commands completed before returning (none when the reset runs
        on a thread: they complete on the loop once the controller is disabled).
        """
        table = self._table
        logfmt.error(log, "vfio_nvme_reset", bdf=self.bdf, reason=reason,
                     inflight=len(table.busy), waiting=len(table.pending),
                     status=status_name(ABORTED),
                     action="disable the controller, complete those commands (the host "
                            "retries), reset it")
        self._state = _State.RESETTING
        loop = self._loop
        if loop is None:
            aborted = self.stats["aborted"]
            self._reset(lambda fn: fn())
            return self.stats["aborted"] - aborted

        def post(fn: Callable[[], None]) -> None:
            try:
                loop.call_soon_threadsafe(fn)
            except RuntimeError:  # the loop is closed: close() finishes the job
                log.debug("%s: loop closed during a reset", self.bdf)

        self._reset_thread = threading.Thread(target=self._reset, args=(post,), daemon=True,
                                              name=f"nvme-reset {self.bdf}")
        self._reset_thread.start()
        return 0

    def _reset(self, post: Callable[[Callable[[], None]], None]) -> None:
        """Stop DMA, have the commands aborted, bring the controller up, report back.

        `post(fn)` runs `fn` on the loop's thread (at once when no loop is attached), in
        order.  This may run on the reset thread: it touches only the controller, which
        the loop leaves alone while the state is RESETTING.
        """
        self._dma_stopped = self._stop_dma()
        post(self._abort_all)
        if self._closed:  # a callback closed the backend
            return
        try:
            self._bring_up()
        except Exception as e:  # noqa: BLE001  a reset that does not report back hangs waiters
            post(functools.partial(self._reset_failed, str(e) or type(e).__name__))
            return
        post(self._reset_done)

    def _stop_dma(self) -> bool:
        return controller.stop_dma(self)

    def _abort_all(self) -> None:
        if not self._closed:
            self.stats["aborted"] += self._table.fail_all(ABORTED, release=self._dma_stopped)

    def _reset_done(self) -> None:
        self._reset_thread = None
        if self._closed:
            return
        self._state = _State.LIVE
        self.stats["resets"] += 1
        logfmt.warning(log, "vfio_nvme_serving_again", bdf=self.bdf,
                       resets=self.stats["resets"], waited=len(self._table.pending))
        self.poll()  # sends what waited
        self._arm_poller()

    def _reset_failed(self, why: str) -> None:
        self._reset_thread = None
        if self._closed:
            return
        self._state = _State.FAILED
        self.failed_reason = f"controller reset after an I/O error failed: {why}"
        logfmt.error(log, "vfio_nvme_failed", bdf=self.bdf, reason=self.failed_reason,
                     status=status_name(FAILED),
                     action="the namespace is failed: every command completes at once with "
                            "that status until it is disabled")
        self.stats["refused"] += self._table.fail_all(FAILED)  # those that waited for the reset

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Drain, delete the I/O queues, shut the controller down, give the device back."""
        if self._closed:
            return
        if self._reset_thread is not None:
            self._reset_thread.join()  # bounded: every wait of a reset has a deadline
        if self._state is _State.RESETTING:  # the aborts the reset posted have not run yet
            self._abort_all()
        elif self._state is _State.LIVE and self._regs is not None and hasattr(
                self, "_cq") and not self.wait_idle(DRAIN_TIMEOUT_S):
            logfmt.warning(log, "vfio_nvme_dropped_at_close", bdf=self.bdf,
                           inflight=self.inflight)
        self._teardown(shutdown=True)

    def _teardown(self, shutdown: bool) -> None:
        self._closed = True
        self.detach()
        self._table.busy.clear()
        self._table.pending.clear()
        regs = self._regs
        if regs is not None and shutdown:
            try:
                if self._state is _State.LIVE:
                    if hasattr(self, "_sq"):
                        controller.admin(self, pci.ADMIN_DELETE_SQ, cdw10=1)
                        controller.admin(self, pci.ADMIN_DELETE_CQ, cdw10=1)
                    cc = regs.read32(pci.REG_CC)
                    regs.write32(pci.REG_CC, (cc & ~pci.CC_SHN_MASK) | pci.CC_SHN_NORMAL)
                    controller.wait_csts(self, pci.CSTS_SHST_MASK, pci.CSTS_SHST_CMPLT,
                                         "shutdown")
                else:  # the admin queue of a failed reset is not to be trusted: just stop
                    controller.disable(self)
            except BackendError as e:
                logfmt.warning(log, "vfio_nvme_unclean_shutdown", bdf=self.bdf, reason=e)
        if self.cmb is not None:
            self.cmb.close()
        controller.close_rings(self)
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
                logfmt.warning(log, "vfio_unbind_failed", bdf=self.bdf, reason=e)

    def describe(self) -> dict:
        d = super().describe()
        d.update(bdf=self.bdf, nsid=self.nsid, cmb=self.cmb.describe() if self.cmb else None,
                 cmb_reason=self.cmb_reason, state=self.state, io_timeout=self.io_timeout,
                 **self.stats)
        if self.failed_reason:
            d["failed_reason"] = self.failed_reason
        return d


def pci_dsm_range(slba: int, nlb: int) -> bytes:
    """One 16-byte DSM range: context attributes 0, length, starting LBA."""
    return NVME_DSM_RANGE.pack(0, nlb, slba)


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
