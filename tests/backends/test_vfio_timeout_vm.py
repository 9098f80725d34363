"""I/O timeouts of the VFIO NVMe backend against QEMU's NVMe (1b36:0010) in the VM.

Expiry is forced deterministically: commands are submitted with the SQ doorbell held
back (the controller never hears of them, as with a controller that lost them), nothing
is polled, the injected clock is moved past the deadline, then the backend polls.  The
host half (bookkeeping, order of the steps, the failed state) is tests/test_vfio_timeout.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from nvmet_p2p.backends.vfio_nvme import controller
from nvmet_p2p.backends.vfio_nvme import nvme_pci as pci
from nvmet_p2p.cmb import copy_from, copy_into
from nvmet_p2p.core.clock import FakeClock
from nvmet_p2p.errors import BackendError, VMError
from nvmet_p2p.testbed.guest import on_vfio, pci_driver, vfio_nvme_bdf
from nvmet_p2p.wire.status import DNR, Status
from tests.support.backend_io import COMPLETION_TIMEOUT_S as DEADLINE_S
from tests.support.backend_io import pattern, run

# tests that need the VM's emulated NVMe, VFIO and IOMMU
vm = pytest.mark.vm


SYS = Path("/sys/bus/pci/devices")
DEPTH = 4  # three command ids: a fourth submission has to wait


@pytest.fixture
def bdf():
    try:
        return vfio_nvme_bdf()
    except VMError as e:
        pytest.skip(str(e))


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def ctrl(bdf, clock):
    from nvmet_p2p.backends.vfio_nvme.backend import VfioNvmeBackend
    driver = pci_driver(bdf)
    with on_vfio(bdf, lambda b: VfioNvmeBackend(b, io_depth=DEPTH, clock=clock)) as backend:
        yield backend
    # on_vfio checked the driver is back; the kernel must also find a working controller
    if driver == "nvme":
        _wait_kernel_ctrl_live(bdf)


def _wait_kernel_ctrl_live(bdf: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    state = ""
    while time.monotonic() < deadline:
        states = [p.read_text().strip() for p in (SYS / bdf / "nvme").glob("nvme*/state")]
        state = states[0] if states else "no controller yet"
        if state == "live":
            return
        time.sleep(0.1)
    raise AssertionError(f"{bdf}: the kernel's controller is {state!r}, not live")


def hold_doorbell(ctrl, monkeypatch) -> None:
    """Submissions from now on reach the SQ but the controller is never told (until reset)."""
    monkeypatch.setattr(ctrl._sq, "ring", lambda: None)


@vm
def test_timeout_disables_aborts_resets_and_serves_again(ctrl, clock, monkeypatch):
    bs = ctrl.block_size
    before = pattern(8 * bs, 1)
    assert run(ctrl, lambda cb: ctrl.submit_write(100, 8, memoryview(before), False, cb)) == 0
    assert ctrl._dma is not None
    dma_in_use = ctrl._dma.counters()["allocated"]

    hold_doorbell(ctrl, monkeypatch)
    got: list[int] = []
    ready_at_callback: list[int] = []

    def cb(st: int) -> None:  # the controller must be disabled before the host hears
        got.append(st)
        ready_at_callback.append(ctrl._regs.read32(pci.REG_CSTS) & pci.CSTS_RDY)

    back = bytearray(8 * bs)
    ctrl.submit_read(100, 8, memoryview(back), cb)  # bounced: a bytearray is not mapped
    ctrl.submit_write(200, 8, memoryview(pattern(8 * bs, 2)), False, cb)
    ctrl.submit_flush(cb)
    ctrl.submit_write_zeroes(300, 8, cb)  # no command id left: waits
    assert ctrl.inflight == 4 and ctrl._dma.counters()["allocated"] > dma_in_use
    assert ctrl.poll() == 0 and not got
    clock.advance(ctrl.io_timeout - 1)
    assert ctrl.poll() == 0 and not got

    clock.advance(2)
    t = time.monotonic()
    assert ctrl.poll() == 4
    reset_s = time.monotonic() - t
    assert got == [Status.ABORT_REQ] * 4 and not any(st & DNR for st in got)
    assert ready_at_callback == [0] * 4
    assert back == bytes(8 * bs)  # an aborted read delivers nothing
    assert ctrl._dma.counters()["allocated"] == dma_in_use  # bounce buffers went back
    st = ctrl.stats
    assert (st["timeouts"], st["resets"], st["aborted"]) == (1, 1, 4)
    assert ctrl.state == "live" and ctrl.inflight == 0
    print(f"\nreset took {reset_s * 1000:.0f} ms")

    # usable again: a new pattern, and what was written before the reset is still there
    data = pattern(16 * bs, 3)
    assert run(ctrl, lambda cb: ctrl.submit_write(400, 16, memoryview(data), True, cb)) == 0
    out = bytearray(16 * bs)
    assert run(ctrl, lambda cb: ctrl.submit_read(400, 16, memoryview(out), cb)) == 0
    assert out == data
    assert run(ctrl, lambda cb: ctrl.submit_read(100, 8, memoryview(back), cb)) == 0
    assert back == before

    # the CMB is back at the bus address peers know
    cmb = ctrl.cmb
    if cmb is None:
        pytest.skip(f"no CMB to check after the reset: {ctrl.cmb_reason}")
    chunk = cmb.alloc(16 * bs)
    try:
        assert chunk.bus_addr == ctrl.cba + chunk.offset
        copy_into(chunk, data[::-1], cmb.access)
        assert run(ctrl, lambda cb: ctrl.submit_write_p2p(500, 16, chunk, False, cb)) == 0
        assert run(ctrl, lambda cb: ctrl.submit_read(500, 16, memoryview(out), cb)) == 0
        assert out == data[::-1]
        copy_into(chunk, bytes(16 * bs), cmb.access)
        assert run(ctrl, lambda cb: ctrl.submit_read_p2p(400, 16, chunk, cb)) == 0
        assert copy_from(chunk, cmb.access) == data
    finally:
        chunk.free()
    assert ctrl.stats["timeouts"] == 1 and ctrl.stats["resets"] == 1


@vm
def test_the_attached_poller_resets_on_a_thread(ctrl, clock, monkeypatch):
    bs = ctrl.block_size

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        ctrl.attach(loop)
        try:
            hold_doorbell(ctrl, monkeypatch)
            stuck = loop.create_future()
            ctrl.submit_read(0, 1, memoryview(bytearray(bs)), stuck.set_result)
            await asyncio.sleep(0.05)
            assert not stuck.done()
            clock.advance(ctrl.io_timeout)
            first = await asyncio.wait_for(stuck, DEADLINE_S)
            # submitted while the controller is down: goes out once it is back
            later = loop.create_future()
            ctrl.submit_read(0, 1, memoryview(bytearray(bs)), later.set_result)
            return first, await asyncio.wait_for(later, DEADLINE_S)
        finally:
            ctrl.detach()

    assert asyncio.run(main()) == (Status.ABORT_REQ, 0)
    assert ctrl.state == "live" and ctrl.stats["resets"] == 1


@vm
def test_a_failed_reinit_fails_fast_with_dnr_and_close_gives_the_device_back(
        ctrl, clock, monkeypatch):
    bs = ctrl.block_size
    hold_doorbell(ctrl, monkeypatch)
    got: list[int] = []
    ctrl.submit_read(0, 1, memoryview(bytearray(bs)), got.append)

    def identify_fails(b: object, cns: int, nsid: int) -> bytes:  # bring-up stops half way
        raise BackendError("injected: Identify failed")

    monkeypatch.setattr(controller, "identify", identify_fails)
    clock.advance(ctrl.io_timeout)
    ctrl.poll()
    assert got == [Status.ABORT_REQ]
    assert ctrl.state == "failed"
    d = ctrl.describe()
    assert d["state"] == "failed" and "injected: Identify failed" in d["failed_reason"]

    t = time.monotonic()
    ctrl.submit_write(0, 1, memoryview(bytes(bs)), False, got.append)
    ctrl.submit_flush(got.append)
    assert time.monotonic() - t < 1.0
    assert got[1:] == [Status.INTERNAL | DNR] * 2  # inside the calls, without polling
    st = ctrl.stats
    assert (st["timeouts"], st["resets"], st["refused"]) == (1, 0, 2)
    t = time.monotonic()
    ctrl.close()  # the fixture's on_vfio checks the device is back on its driver
    print(f"\nclose of a failed backend took {(time.monotonic() - t) * 1000:.0f} ms")
