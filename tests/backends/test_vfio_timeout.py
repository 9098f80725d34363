"""I/O timeouts of the VFIO NVMe backend, without a device.

`CommandTable` (nvme_pci) is tested alone; the backend's recovery (stop DMA, abort
everything, bring the controller up again, or fail) runs against `ScriptedBackend`: the
real data path and ring logic over plain memory, with the controller played by the test
(`post_cqe`) and its disable and bring-up replaced by steps that record their order.
The VM half (the same against QEMU's NVMe through VFIO) is tests/test_vfio_timeout_vm.py.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading

import pytest

from nvmet_p2p.backends.vfio_nvme.backend import VfioNvmeBackend
from nvmet_p2p.backends.vfio_nvme.nvme_pci import (
    Cmd,
    CommandTable,
    CompletionRing,
    SubmissionRing,
)
from nvmet_p2p.core.clock import FakeClock
from nvmet_p2p.errors import BackendError
from nvmet_p2p.wire.status import DNR, Status

BDF = "0000:00:0a.0"
ABORTED = Status.ABORT_REQ
FAILED = Status.INTERNAL | DNR


class FakeBuf:
    """A bounce buffer that counts how often it was given back."""

    def __init__(self, data: bytes) -> None:
        self.view = memoryview(bytearray(data))
        self.frees = 0

    def free(self) -> None:
        self.frees += 1


# -- CommandTable ----------------------------------------------------------------------------


def test_table_hands_out_every_id_but_one_and_takes_them_back():
    t = CommandTable(4, timeout_s=30.0)
    cids = [t.start(Cmd(print), 1, 0.0) for _ in range(3)]
    assert sorted(cids) == [0, 1, 2] and not t.has_free()  # one SQ slot stays empty
    assert t.start(Cmd(print), 1, 0.0) is None
    cmd = t.busy[cids[1]]
    assert t.finish(cids[1]) is cmd and t.has_free() and len(t) == 2
    assert t.finish(cids[1]) is None  # not in flight any more
    assert t.finish(99) is None


def test_expired_looks_at_the_oldest_command_only():
    t = CommandTable(8, timeout_s=30.0)
    a = t.start(Cmd(print), 2, 100.0)
    b = t.start(Cmd(print), 1, 110.0)
    assert t.expired(129.9) is None
    assert t.expired(130.0) == (a, t.busy[a])
    t.finish(a)
    assert t.expired(130.0) is None and t.expired(140.0) == (b, t.busy[b])
    c = t.start(Cmd(print), 0, 135.0)  # a reused id goes behind the older command
    assert c == a and t.expired(140.0)[0] == b
    t.finish(b)
    assert t.expired(164.9) is None and t.expired(165.0)[0] == c
    t.finish(c)
    assert t.expired(1e9) is None


def test_fail_all_completes_busy_and_pending_and_gives_buffers_back():
    t = CommandTable(4, timeout_s=30.0)
    got: list[tuple[str, int]] = []
    wbuf, rbuf = FakeBuf(b"w" * 8), FakeBuf(b"r" * 8)
    dest = bytearray(8)
    t.start(Cmd(lambda st: got.append(("write", st)), wbuf), 1, 0.0)
    t.start(Cmd(lambda st: got.append(("read", st)), rbuf, memoryview(dest), 8), 2, 0.0)

    def resubmit(st: int) -> None:  # a callback that submits again finds an empty table
        got.append(("pending", st))
        assert len(t) == 0 and t.has_free()
        t.pending.append((lambda: True, print))

    t.pending.append((lambda: True, resubmit))
    assert t.fail_all(ABORTED) == 3
    assert got == [("write", ABORTED), ("read", ABORTED), ("pending", ABORTED)]
    assert wbuf.frees == rbuf.frees == 1
    assert dest == bytes(8)  # a failed read copies nothing
    assert len(t) == 1 and not t.busy  # only the resubmission
    assert sorted(t.start(Cmd(print), 1, 0.0) for _ in range(3)) == [0, 1, 2]


def test_fail_all_keeps_the_buffers_of_a_controller_that_may_still_dma():
    t = CommandTable(4, timeout_s=30.0)
    buf = FakeBuf(b"x")
    got: list[int] = []
    t.start(Cmd(got.append, buf), 1, 0.0)
    assert t.fail_all(ABORTED, release=False) == 1
    assert got == [ABORTED] and buf.frees == 0


def test_a_bounced_read_is_copied_out_on_success_only():
    dest = bytearray(4)
    buf = FakeBuf(b"data")
    Cmd(print, buf, memoryview(dest), 4).complete(0)
    assert dest == b"data" and buf.frees == 1


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan")])
def test_table_refuses_a_timeout_that_is_not_positive(timeout):
    with pytest.raises(ValueError, match="positive"):
        CommandTable(4, timeout_s=timeout)


def test_backend_refuses_a_bad_io_timeout_before_touching_the_device(tmp_path):
    with pytest.raises(BackendError, match="io_timeout must be a positive"):
        VfioNvmeBackend(BDF, io_timeout=0, sysfs_root=str(tmp_path), dev_root=str(tmp_path))


# -- the backend's recovery, against a scripted controller -----------------------------------


class ScriptedBackend(VfioNvmeBackend):
    """VfioNvmeBackend with the controller played by the test (see the module docstring)."""

    def __init__(self, clock: FakeClock, depth: int = 4, io_timeout: float = 30.0) -> None:
        self.bdf, self.nsid = BDF, 1
        self._init_state(depth, io_timeout, clock)
        self.io_depth, self.nblocks, self.block_size, self.max_xfer = depth, 1 << 20, 512, 4096
        self.events: list[str] = []
        self.threads: set[str] = set()
        self.bring_up_error: str | None = None
        self._bring_up()
        self.events.clear()
        self.threads.clear()

    def _stop_dma(self) -> bool:
        self.events.append("stop_dma")
        self.threads.add(threading.current_thread().name)
        return True

    def _bring_up(self) -> None:
        self.events.append("bring_up")
        self.threads.add(threading.current_thread().name)
        if self.bring_up_error:
            raise BackendError(self.bring_up_error)
        d = self.io_depth
        self._sq = SubmissionRing(1, memoryview(bytearray(d * 64)), d, lambda tail: None)
        self._cq = CompletionRing(1, memoryview(bytearray(d * 16)), d, lambda head: None)
        self.cq_tail, self.cq_phase = 0, 1

    def post_cqe(self, cid: int, status: int = 0) -> None:
        """The controller completes `cid`."""
        struct.pack_into("<IIHHHH", self._cq.mem, self.cq_tail * 16, 0, 0, self._sq.tail, 1,
                         cid, status << 1 | self.cq_phase)
        self.cq_tail += 1
        if self.cq_tail == self.io_depth:
            self.cq_tail, self.cq_phase = 0, self.cq_phase ^ 1


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def backend(clock):
    b = ScriptedBackend(clock)
    yield b
    b.close()


def test_a_stuck_command_is_aborted_only_after_the_controller_stopped(backend, clock, caplog):
    got: list[tuple[int, str]] = []

    def cb(st: int) -> None:  # which step had run when the host heard of it
        got.append((st, backend.events[-1] if backend.events else ""))

    for _ in range(3):  # every command id
        backend.submit_flush(cb)
    backend.submit_write_zeroes(0, 8, cb)  # waits for an id
    assert backend.inflight == 4 and len(backend._table.pending) == 1
    clock.advance(29.0)
    assert backend.poll() == 0 and not got
    first = next(iter(backend._table.busy))
    backend.post_cqe(first)  # one completes; the waiting one goes out, at t = 29 s
    assert backend.poll() == 1 and got == [(0, "")] and not backend._table.pending
    clock.advance(1.5)
    with caplog.at_level(logging.ERROR, logger="nvmet_p2p.backends.vfio_nvme.backend"):
        assert backend.poll() == 3
    assert got[1:] == [(ABORTED, "stop_dma")] * 3
    assert backend.events == ["stop_dma", "bring_up"]
    assert backend.state == "live" and backend.inflight == 0
    st = backend.stats
    assert (st["timeouts"], st["resets"], st["aborted"], st["refused"]) == (1, 1, 3, 0)
    [record] = [r for r in caplog.records if "timed out" in r.getMessage()]
    msg = record.getMessage()
    assert BDF in msg and "Flush (opcode 0x00, cid" in msg and "after 30.5 s" in msg, msg
    assert "ABORT_REQ" in msg and "DNR" not in msg

    # the controller serves again, with fresh rings and every id free
    backend.submit_flush(cb)
    [cid] = backend._table.busy
    backend.post_cqe(cid)
    assert backend.poll() == 1 and got[-1][0] == 0


def test_a_late_completion_is_not_a_timeout(backend, clock):
    got: list[int] = []
    backend.submit_flush(got.append)
    [cid] = backend._table.busy
    backend.post_cqe(cid)  # completed in time, reaped late
    clock.advance(300.0)
    assert backend.poll() == 1 and got == [0]
    assert backend.stats["timeouts"] == 0 and backend.events == []


def test_submissions_made_during_the_reset_go_out_after_it(backend, clock):
    got: list[int] = []

    def resubmit(st: int) -> None:
        got.append(st)
        if len(got) == 1:
            assert backend.state == "resetting"
            backend.submit_flush(got.append)  # must not reach the disabled controller

    backend.submit_flush(resubmit)
    clock.advance(30.0)
    assert backend.poll() == 1 and got == [ABORTED]
    [cid] = backend._table.busy  # issued to the new queue once the reset was done
    assert backend._sq.tail == 1 and backend.events == ["stop_dma", "bring_up"]
    backend.post_cqe(cid)
    assert backend.poll() == 1 and got == [ABORTED, 0]


def test_a_failed_bring_up_fails_every_command_at_once_with_dnr(backend, clock, caplog):
    got: list[int] = []

    def resubmit(st: int) -> None:
        got.append(st)
        backend.submit_write_zeroes(0, 1, got.append)  # waits for the reset, then fails

    backend.submit_flush(resubmit)
    backend.bring_up_error = "injected: Identify failed"
    clock.advance(31.0)
    with caplog.at_level(logging.ERROR, logger="nvmet_p2p.backends.vfio_nvme.backend"):
        backend.poll()
    assert got == [ABORTED, FAILED]
    assert backend.state == "failed" and backend.inflight == 0
    d = backend.describe()
    assert d["state"] == "failed" and "injected: Identify failed" in d["failed_reason"]
    assert any("namespace is failed" in r.getMessage() and BDF in r.getMessage()
               for r in caplog.records)

    backend.submit_flush(got.append)  # completes inside the call, nothing goes out
    backend.submit_write(0, 1, memoryview(bytearray(512)), False, got.append)
    assert got[2:] == [FAILED, FAILED] and all(s & DNR for s in got[1:])
    assert backend.poll() == 0
    st = backend.stats
    assert (st["timeouts"], st["resets"], st["aborted"], st["refused"]) == (1, 0, 1, 3)
    backend.close()
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.submit_flush(got.append)


def test_a_completion_for_a_command_not_in_flight_resets(backend):
    got: list[int] = []
    backend.submit_flush(got.append)
    [busy] = backend._table.busy
    backend.post_cqe(busy ^ 1)  # an id nobody used: the controller is confused
    assert backend.poll() == 1 and got == [ABORTED]
    assert backend.stats["timeouts"] == 0 and backend.stats["resets"] == 1
    assert backend.events == ["stop_dma", "bring_up"]


def test_the_attached_poller_times_out_and_resets_off_the_loop(backend, clock):
    async def main() -> int:
        loop = asyncio.get_running_loop()
        backend.attach(loop)
        try:
            fut = loop.create_future()
            backend.submit_flush(fut.set_result)
            await asyncio.sleep(0.01)  # the poller runs and finds nothing
            assert not fut.done()
            clock.advance(30.0)
            st = await asyncio.wait_for(fut, 10.0)
            async with asyncio.timeout(10.0):
                while backend.state != "live":
                    await asyncio.sleep(0.001)
            again = loop.create_future()
            backend.submit_flush(again.set_result)
            [cid] = backend._table.busy
            backend.post_cqe(cid)
            assert await asyncio.wait_for(again, 10.0) == 0
            return st
        finally:
            backend.detach()

    assert asyncio.run(main()) == ABORTED
    assert backend.events == ["stop_dma", "bring_up"]
    assert backend.threads == {f"nvme-reset {BDF}"}  # the reactor did not wait for it
    assert backend.stats["resets"] == 1


def test_close_during_a_threaded_reset_completes_what_it_aborted(clock):
    b = ScriptedBackend(clock)
    release = threading.Event()
    bring_up = b._bring_up

    def slow_bring_up() -> None:
        release.wait(10.0)
        bring_up()

    got: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        b.attach(loop)
        b.submit_flush(got.append)
        b._bring_up = slow_bring_up  # type: ignore[method-assign]
        clock.advance(30.0)
        async with asyncio.timeout(10.0):
            while b.state != "resetting":
                await asyncio.sleep(0.001)
        release.set()
        b.close()  # before the loop ran what the reset thread posted

    asyncio.run(main())
    assert got == [ABORTED] and b.state == "resetting" and b.inflight == 0
