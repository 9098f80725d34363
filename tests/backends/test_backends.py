"""Namespace backends: data integrity, zeroing, errors, O_DIRECT fallback, lifecycle.

Runs on the host.  File tests use a real disk directory (O_DIRECT works there) and
/dev/shm; block device tests use a loop device and skip with a reason when the host
cannot attach one.  Completions are received on an asyncio loop, every wait has a
deadline.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading

import pytest

from nvmet_p2p.backends import BdevBackend, FileBackend, MemoryBackend, aligned, open_backend
from nvmet_p2p.backends.bdev import pci_function_of, volatile_write_cache
from nvmet_p2p.errors import BackendError
from nvmet_p2p.wire.status import DNR, Status, status_name

DEADLINE = 10.0  # seconds for any single completion
LBA_RANGE = Status.LBA_RANGE | DNR


# ---- helpers -------------------------------------------------------------------------

@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def run_io(loop, submit) -> int:
    """Call submit(cb) and wait (with a deadline) for its completion status."""
    fut = loop.create_future()

    def cb(status):
        assert not fut.done(), "completion delivered twice"
        fut.set_result(status)

    submit(cb)
    return loop.run_until_complete(asyncio.wait_for(fut, DEADLINE))


def ok(status: int) -> None:
    assert status == 0, status_name(status)


def unaligned(n: int) -> tuple[bytearray, memoryview]:
    """A writable buffer of n bytes whose address is not 4096-aligned."""
    raw = bytearray(n + aligned.ALIGN + 1)
    addr = aligned.buffer_address(memoryview(raw))
    skip = (aligned.ALIGN - addr % aligned.ALIGN) % aligned.ALIGN + 1  # aligned + 1
    mv = memoryview(raw)[skip:skip + n]
    assert not aligned.is_aligned(mv)
    return raw, mv


def page_buffer(n: int) -> tuple[mmap.mmap, memoryview]:
    m = mmap.mmap(-1, max(n, 1))
    return m, memoryview(m)[:n]


def backend_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nvmet-")]


def o_direct_works(directory: str) -> bool:
    path = os.path.join(directory, ".odirect-probe")
    try:
        with open(path, "wb") as f:
            f.truncate(4096)
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            m = mmap.mmap(-1, 4096)
            os.preadv(fd, [m], 0)
            m.close()
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
    finally:
        if os.path.exists(path):
            os.unlink(path)


@pytest.fixture
def disk_dir():
    """A directory on a real disk filesystem, where O_DIRECT is accepted."""
    d = tempfile.mkdtemp(prefix="nvmet-p2p-test-", dir="/var/tmp")
    try:
        if not o_direct_works(d):
            pytest.skip("/var/tmp does not accept O_DIRECT on this host")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def shm_dir():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this host")
    d = tempfile.mkdtemp(prefix="nvmet-p2p-test-", dir="/dev/shm")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _losetup(args: list[str]) -> str:
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    try:
        out = subprocess.run(["losetup", *args], check=False, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"losetup cannot run here: {e}")
    if out.returncode != 0:
        pytest.skip(f"cannot attach a loop device on this host: {out.stderr.strip()}")
    return out.stdout.strip()


class LoopDevices:
    """Attaches loop devices over sparse files; detaches them all at teardown."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.devices: list[str] = []

    def attach(self, size: int, sector_size: int = 512) -> str:
        fd, image = tempfile.mkstemp(dir=self.directory, suffix=".img")
        os.ftruncate(fd, size)
        os.close(fd)
        args = ["-f", "--show"]
        if sector_size != 512:
            args += ["--sector-size", str(sector_size)]
        dev = _losetup([*args, image])
        self.devices.append(dev)
        return dev

    def detach_all(self) -> None:
        for dev in self.devices:
            subprocess.run(["losetup", "-d", dev], check=False, capture_output=True, timeout=20)


@pytest.fixture
def loop_devices():
    if os.geteuid() != 0:
        pytest.skip("attaching loop devices needs root")
    d = tempfile.mkdtemp(prefix="nvmet-p2p-loopdev-", dir="/var/tmp")
    devs = LoopDevices(d)
    yield devs
    devs.detach_all()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def no_thread_leak():
    before = set(backend_threads())
    yield
    leaked = [t.name for t in backend_threads() if t not in before and t.is_alive()]
    assert not leaked, f"backend worker threads left running: {leaked}"


SIZE = 4 * 1024 * 1024


@pytest.fixture(params=["file-disk", "file-shm", "memory", "bdev"])
def make(request, loop, tmp_path, no_thread_leak):
    """make(block_size) -> an open backend of the parametrized kind, closed at teardown."""
    opened = []

    def _make(block_size: int = 512):
        kind = request.param
        if kind == "file-disk":
            d = request.getfixturevalue("disk_dir")
            b = open_backend(os.path.join(d, "ns.img"), block_size=block_size, size=SIZE,
                             create=True, loop=loop)
            assert b.o_direct, b.describe()
        elif kind == "file-shm":
            d = request.getfixturevalue("shm_dir")
            b = open_backend(os.path.join(d, "ns.img"), block_size=block_size, size=SIZE,
                             create=True, loop=loop)
        elif kind == "memory":
            b = open_backend("ram0", kind="memory", size=SIZE, block_size=block_size,
                             loop=loop)
        else:
            dev = request.getfixturevalue("loop_devices").attach(SIZE)
            b = open_backend(dev, block_size=block_size, loop=loop)
            assert isinstance(b, BdevBackend)
        opened.append(b)
        return b

    yield _make
    for b in opened:
        b.close()


def write(loop, b, slba, data, fua=False, buf=None):
    mv = buf if buf is not None else memoryview(data)
    return run_io(loop, lambda cb: b.submit_write(slba, len(data) // b.block_size, mv, fua, cb))


def read(loop, b, slba, nlb, buf=None) -> bytes:
    if buf is None:
        buf = memoryview(bytearray(nlb * b.block_size))
    ok(run_io(loop, lambda cb: b.submit_read(slba, nlb, buf, cb)))
    return bytes(buf)


# ---- data integrity on every backend ------------------------------------------------

@pytest.mark.parametrize("block_size", [512, 4096])
def test_data_integrity(make, loop, block_size):
    b = make(block_size)
    assert b.block_size == block_size and b.nblocks == SIZE // block_size
    bs = block_size
    # aligned (mmap) buffer
    data1 = os.urandom(8 * bs)
    m, mv = page_buffer(len(data1))
    mv[:] = data1
    ok(write(loop, b, 0, data1, buf=mv))
    # unaligned writable buffer: a bounce copy under O_DIRECT
    data2 = os.urandom(3 * bs)
    _raw, umv = unaligned(len(data2))
    umv[:] = data2
    ok(write(loop, b, 17, data2, buf=umv))
    # read-only buffer (bytes): address unknown, so treated as unaligned
    data3 = os.urandom(bs)
    ok(write(loop, b, b.nblocks - 1, data3))
    assert read(loop, b, 0, 8) == data1
    _, urd = unaligned(3 * bs)
    assert read(loop, b, 17, 3, buf=urd) == data2
    _, ard = page_buffer(bs)
    assert read(loop, b, b.nblocks - 1, 1, buf=ard) == data3
    # a read across written and never-written blocks
    assert read(loop, b, 16, 5) == bytes(bs) + data2 + bytes(bs)
    mv.release()
    m.close()


def test_many_in_flight(make, loop):
    """32 writes then 32 reads in flight at once all complete, with the right data."""
    b = make(4096)
    n = 32
    blobs = [os.urandom(4096) for _ in range(n)]

    async def burst():
        futs = []
        for i, data in enumerate(blobs):
            fut = loop.create_future()
            b.submit_write(i * 3, 1, memoryview(data), False, fut.set_result)
            futs.append(fut)
        statuses = await asyncio.wait_for(asyncio.gather(*futs), DEADLINE)
        assert statuses == [0] * n
        bufs = [memoryview(bytearray(4096)) for _ in range(n)]
        futs = []
        for i, buf in enumerate(bufs):
            fut = loop.create_future()
            b.submit_read(i * 3, 1, buf, fut.set_result)
            futs.append(fut)
        statuses = await asyncio.wait_for(asyncio.gather(*futs), DEADLINE)
        assert statuses == [0] * n
        assert [bytes(x) for x in bufs] == blobs

    loop.run_until_complete(burst())


def test_fua_and_flush(make, loop):
    b = make(512)
    data = os.urandom(4 * 512)
    ok(write(loop, b, 8, data, fua=True))
    ok(run_io(loop, b.submit_flush))
    assert read(loop, b, 8, 4) == data
    if isinstance(b, FileBackend):
        # the data is in the file/device for any other opener too
        fd = os.open(b.path, os.O_RDONLY)
        try:
            assert os.pread(fd, len(data), 8 * 512) == data
        finally:
            os.close(fd)
    if b.kind != "bdev":  # a block device's flag comes from sysfs (tested below)
        assert b.vwc is (b.kind == "file")


@pytest.mark.parametrize("block_size", [512, 4096])
def test_write_zeroes_and_discard(make, loop, block_size):
    b = make(block_size)
    bs = block_size
    span = 64
    data = os.urandom(span * bs)
    ok(write(loop, b, 100, data))
    ok(run_io(loop, lambda cb: b.submit_write_zeroes(101, 3, cb)))
    # ranges: a single block, a multi-page range, and an empty range
    ok(run_io(loop, lambda cb: b.submit_discard([(110, 1), (120, 40), (130, 0)], cb)))
    got = read(loop, b, 100, span)
    want = bytearray(data)
    for slba, nlb in ((101, 3), (110, 1), (120, 40)):
        start = (slba - 100) * bs
        want[start:start + nlb * bs] = bytes(nlb * bs)
    assert got == bytes(want)
    # a zeroed range takes new data again
    again = os.urandom(bs)
    ok(write(loop, b, 125, again))
    assert read(loop, b, 125, 1) == again


def test_beyond_capacity_is_lba_range(make, loop):
    """Range checks are the core's job, but a backend asked anyway must not crash."""
    b = make(512)
    last = b.nblocks - 1
    ok(write(loop, b, last, bytes(512)))  # the last block is inside
    buf = memoryview(bytearray(1024))
    assert run_io(loop, lambda cb: b.submit_read(last, 2, buf, cb)) == LBA_RANGE
    assert run_io(loop, lambda cb: b.submit_write(b.nblocks, 2, buf, False, cb)) == LBA_RANGE
    assert run_io(loop, lambda cb: b.submit_write_zeroes(last, 2, cb)) == LBA_RANGE
    assert run_io(loop, lambda cb: b.submit_discard([(0, 1), (last, 5)], cb)) == LBA_RANGE
    assert run_io(loop, lambda cb: b.submit_read(-1, 1, buf[:512], cb)) == LBA_RANGE


def test_buffer_length_mismatch(make, loop):
    b = make(512)
    short = memoryview(bytearray(511))
    expect = Status.SGL_INVALID_DATA | DNR
    assert run_io(loop, lambda cb: b.submit_read(0, 1, short, cb)) == expect
    assert run_io(loop, lambda cb: b.submit_write(0, 1, short, False, cb)) == expect


def test_close_is_idempotent_and_final(make, loop):
    b = make(512)
    b.close()
    b.close()
    with pytest.raises(BackendError, match="after"):
        b.submit_read(0, 1, memoryview(bytearray(512)), lambda s: None)


def test_describe(make):
    b = make(4096)
    d = b.describe()
    assert d["block_size"] == 4096 and d["nblocks"] == SIZE // 4096
    assert d["kind"] == b.kind and d["path"] == b.path
    assert isinstance(d["o_direct"], bool)
    # a backend without O_DIRECT says why
    assert d["o_direct"] or d["o_direct_fallback"] or b.kind == "memory"


# ---- file backend: threads, completions, close ---------------------------------------

@pytest.fixture
def file_backend(disk_dir, loop, no_thread_leak):
    b = open_backend(os.path.join(disk_dir, "ns.img"), size=SIZE, create=True, loop=loop)
    yield b
    b.close()


def test_file_io_never_runs_on_the_loop_thread(file_backend, loop, monkeypatch):
    """The worker path (AIO off, as where libaio is missing): blocking calls on workers."""
    b = file_backend
    monkeypatch.setattr(b, "_aio", None)  # restored before the fixture closes b
    io_threads = []
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def preadv(*a):
        io_threads.append(threading.get_ident())
        return real_preadv(*a)

    def pwritev(*a):
        io_threads.append(threading.get_ident())
        return real_pwritev(*a)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "pwritev", pwritev)
    cb_threads = []
    loop_thread = threading.get_ident()  # run_until_complete runs the loop here

    def submit_and_record(submit):
        def cb_wrap(cb):
            submit(lambda s: (cb_threads.append(threading.get_ident()), cb(s)))
        return run_io(loop, cb_wrap)

    ok(submit_and_record(lambda cb: b.submit_write(0, 1, memoryview(bytes(512)), True, cb)))
    ok(submit_and_record(lambda cb: b.submit_read(0, 1, memoryview(bytearray(512)), cb)))
    assert len(io_threads) == 2 and loop_thread not in io_threads
    assert cb_threads == [loop_thread, loop_thread]


def test_file_completion_is_never_synchronous(file_backend, loop):
    b = file_backend
    seen = []
    b.submit_read(0, 1, memoryview(bytearray(512)), seen.append)
    b.submit_read(b.nblocks, 1, memoryview(bytearray(512)), seen.append)  # error path too
    assert seen == []
    loop.run_until_complete(asyncio.wait_for(_until(lambda: len(seen) == 2), DEADLINE))
    assert sorted(seen) == [0, LBA_RANGE]


async def _until(pred):
    while not pred():
        await asyncio.sleep(0.005)


def test_no_completion_after_close(file_backend, loop):
    b = file_backend
    seen = []

    async def scenario():
        for i in range(64):
            b.submit_write(i, 1, memoryview(os.urandom(512)), False, seen.append)
        b.close()  # waits for I/O in flight, drops the rest
        await asyncio.sleep(0.2)

    loop.run_until_complete(scenario())
    assert seen == []
    assert not [t for t in backend_threads() if t.is_alive()
                and t.name.startswith("nvmet-file")]


def test_closed_loop_does_not_break_workers(disk_dir, no_thread_leak):
    lp = asyncio.new_event_loop()
    b = open_backend(os.path.join(disk_dir, "ns.img"), size=SIZE, create=True, loop=lp)
    b.submit_read(0, 1, memoryview(bytearray(512)), lambda s: None)
    lp.close()  # the worker's call_soon_threadsafe now raises; the backend swallows it
    b.close()


def test_io_errors_become_status(file_backend, loop, monkeypatch):
    b = file_backend
    monkeypatch.setattr(b, "_aio", None)  # the worker path; AIO errors: tests/backends/test_aio.py

    def eio(*a):
        raise OSError(errno.EIO, "Input/output error")

    def enospc(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "preadv", eio)
    buf = memoryview(bytearray(512))
    assert run_io(loop, lambda cb: b.submit_read(0, 1, buf, cb)) == Status.INTERNAL | DNR
    monkeypatch.setattr(os, "pwritev", enospc)
    assert (run_io(loop, lambda cb: b.submit_write(0, 1, buf, False, cb))
            == Status.CAP_EXCEEDED | DNR)
    monkeypatch.setattr(os, "fdatasync", eio)
    assert run_io(loop, b.submit_flush) == Status.INTERNAL | DNR


def test_short_read_after_external_truncate_is_internal_error(file_backend, loop):
    """Someone shrinks the file under us: the kernel target answers Internal Error."""
    b = file_backend
    os.truncate(b.path, SIZE // 2)
    buf = memoryview(bytearray(512))
    assert (run_io(loop, lambda cb: b.submit_read(b.nblocks - 1, 1, buf, cb))
            == Status.INTERNAL | DNR)
    assert read(loop, b, 0, 1) == bytes(512)  # the backend keeps working


# ---- O_DIRECT and its fallback --------------------------------------------------------

def test_buffered_io_requested(disk_dir, loop, no_thread_leak):
    b = open_backend(os.path.join(disk_dir, "ns.img"), size=SIZE, create=True,
                     buffered_io=True, loop=loop)
    try:
        d = b.describe()
        assert d["o_direct"] is False and d["o_direct_fallback"] == "buffered_io requested"
        data = os.urandom(512)
        _, umv = unaligned(512)
        umv[:] = data
        ok(write(loop, b, 3, data, buf=umv))
        assert read(loop, b, 3, 1) == data
    finally:
        b.close()


def test_tmpfs_reports_its_mode(shm_dir, loop, no_thread_leak):
    """tmpfs: older kernels refuse O_DIRECT (fallback), 6.6+ accept it; either way
    describe() is consistent and the data is right."""
    b = open_backend(os.path.join(shm_dir, "ns.img"), size=SIZE, create=True, loop=loop)
    try:
        d = b.describe()
        if d["o_direct"]:
            assert d["o_direct_fallback"] is None
        else:
            assert "O_DIRECT" in d["o_direct_fallback"]
        data = os.urandom(4096)
        ok(write(loop, b, 0, data))
        assert read(loop, b, 0, 8) == data
    finally:
        b.close()


def test_open_refusing_o_direct_falls_back_and_logs_once(disk_dir, loop, monkeypatch,
                                                         caplog, no_thread_leak):
    """Simulates a filesystem whose open() rejects O_DIRECT with EINVAL (old tmpfs, 9p)."""
    real_open = os.open

    def no_direct_open(path, flags, *a):
        if flags & os.O_DIRECT:
            if flags & os.O_CREAT:  # as Linux does: the file is created, then refused
                os.close(real_open(path, flags & ~os.O_DIRECT, *a))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct_open)
    caplog.set_level(logging.WARNING, logger="nvmet_p2p.backend")
    b = open_backend(os.path.join(disk_dir, "ns.img"), size=SIZE, create=True, loop=loop)
    try:
        assert b.o_direct is False
        assert "refused O_DIRECT on open" in b.describe()["o_direct_fallback"]
        data = os.urandom(2048)
        for i in range(3):
            ok(write(loop, b, i * 4, data))
        assert read(loop, b, 8, 4) == data
        msgs = [r for r in caplog.records if "instead of O_DIRECT" in r.getMessage()]
        assert len(msgs) == 1
    finally:
        b.close()


@pytest.fixture
def fs_on_4k_disk(loop_devices):
    """An ext4 filesystem on a 4096-byte-sector loop device, mounted."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed")
    dev = loop_devices.attach(32 * 1024 * 1024, sector_size=4096)
    r = subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=False, capture_output=True, timeout=60)
    if r.returncode:
        pytest.skip(f"mkfs.ext4 failed: {r.stderr.decode().strip()}")
    mnt = tempfile.mkdtemp(prefix="nvmet-p2p-mnt-", dir="/var/tmp")
    r = subprocess.run(["mount", dev, mnt], check=False, capture_output=True, timeout=30)
    if r.returncode:
        os.rmdir(mnt)
        pytest.skip(f"cannot mount a filesystem here: {r.stderr.decode().strip()}")
    yield dev, mnt
    subprocess.run(["umount", mnt], check=False, capture_output=True, timeout=30)
    os.rmdir(mnt)


def test_o_direct_refused_on_first_io_falls_back(fs_on_4k_disk, loop, caplog,
                                                  no_thread_leak):
    """A 512-byte namespace on a 4K-sector disk: open succeeds, the first O_DIRECT
    write gets EINVAL, the backend turns O_DIRECT off, retries and says why once."""
    _, mnt = fs_on_4k_disk
    caplog.set_level(logging.WARNING, logger="nvmet_p2p.backend")
    b = open_backend(os.path.join(mnt, "ns.img"), size=SIZE, create=True, loop=loop)
    try:
        assert b.o_direct is True
        data = os.urandom(512)
        ok(write(loop, b, 1, data))
        d = b.describe()
        assert d["o_direct"] is False
        assert "EINVAL" in d["o_direct_fallback"] and "512 bytes" in d["o_direct_fallback"]
        ok(write(loop, b, 9, data))
        assert read(loop, b, 1, 1) == data and read(loop, b, 9, 1) == data
        msgs = [r for r in caplog.records if "instead of O_DIRECT" in r.getMessage()]
        assert len(msgs) == 1
    finally:
        b.close()


def test_mounted_bdev_is_refused(fs_on_4k_disk, loop):
    dev, _ = fs_on_4k_disk
    with pytest.raises(BackendError, match="in use"):
        open_backend(dev, block_size=4096, loop=loop)


# ---- block devices ---------------------------------------------------------------------

def test_bdev_geometry_and_facts(loop_devices, loop, no_thread_leak):
    dev = loop_devices.attach(SIZE)
    b = open_backend(dev, block_size=4096, loop=loop)
    try:
        d = b.describe()
        assert d["kind"] == "bdev" and d["nblocks"] == SIZE // 4096
        assert d["logical_block_size"] == 512 and d["o_direct"] is True
        assert d["p2p_client"] is None  # a loop device has no PCI function
        name = os.path.basename(dev)
        with open(f"/sys/block/{name}/queue/write_cache") as f:
            assert b.vwc == (f.read().strip() == "write back")
    finally:
        b.close()


def test_bdev_that_falls_back_to_buffered_io_stops_claiming_p2p(loop_devices, loop):
    """P2P-flagged I/O is O_DIRECT I/O: once the kernel refused an aligned O_DIRECT
    transfer and the device went buffered, the backend offers P2P memory no more."""
    dev = loop_devices.attach(SIZE)
    b = open_backend(dev, block_size=4096, loop=loop)
    try:
        b.p2p_kinds = frozenset({"p2pmem"})  # as an NVMe namespace's would be
        assert b._direct_refused(OSError(errno.EINVAL, "Invalid argument"), True, "write",
                                 8192, 4096)
        d = b.describe()
        assert d["o_direct"] is False and d["p2p_kinds"] == []
        assert b.p2p_needs == (f"{dev} fell back to buffered I/O (the filesystem refused an "
                               "aligned O_DIRECT write of 4096 bytes at offset 8192 (EINVAL)), "
                               "and only O_DIRECT I/O is P2P")
        data = os.urandom(4096)
        ok(write(loop, b, 3, data))
        assert read(loop, b, 3, 1) == data
    finally:
        b.close()


def test_bdev_logical_block_larger_than_block_size(loop_devices, loop):
    dev = loop_devices.attach(SIZE, sector_size=4096)
    with pytest.raises(BackendError, match="logical block size of 4096 bytes, larger than "
                                           "block_size 512"):
        open_backend(dev, block_size=512, loop=loop)
    b = open_backend(dev, block_size=4096, loop=loop)
    b.close()


def test_unattached_loop_device_has_no_capacity(loop, loop_devices):
    free = _losetup(["-f"])
    with pytest.raises(BackendError, match="no capacity"):
        open_backend(free, loop=loop)


def test_bdev_kind_checks(loop, tmp_path, loop_devices):
    dev = loop_devices.attach(SIZE)
    with pytest.raises(BackendError, match="is a block device, not a file"):
        open_backend(dev, kind="file", loop=loop)
    f = tmp_path / "f.img"
    f.write_bytes(bytes(4096))
    with pytest.raises(BackendError, match="not a block device"):
        open_backend(str(f), kind="bdev", loop=loop)
    with pytest.raises(BackendError, match="block device .* does not exist"):
        open_backend(str(tmp_path / "nope"), kind="bdev", loop=loop)


def _fake_sysfs(root, rel_target: str, links: dict[str, str]) -> str:
    target = os.path.join(root, rel_target)
    os.makedirs(target, exist_ok=True)
    for name, dest in links.items():
        os.makedirs(os.path.join(root, dest), exist_ok=True)
        os.symlink(os.path.join(root, dest), os.path.join(target, name))
    return os.path.realpath(target)


def test_p2p_client_of_pci_nvme_namespace_and_partition(tmp_path):
    ns = _fake_sysfs(tmp_path, "devices/pci0000:00/0000:00:03.0/0000:01:00.0/nvme/nvme0/"
                               "nvme0n1", {})
    assert pci_function_of(ns) == "0000:01:00.0"
    part = _fake_sysfs(tmp_path, "devices/pci0000:00/0000:00:03.0/0000:01:00.0/nvme/nvme0/"
                                 "nvme0n1/nvme0n1p2", {})
    assert pci_function_of(part) == "0000:01:00.0"


def test_p2p_client_of_nvme_multipath_head(tmp_path):
    head = _fake_sysfs(tmp_path, "devices/virtual/nvme-subsystem/nvme-subsys0/nvme0n1", {})
    subsys = os.path.dirname(head)
    os.makedirs(tmp_path / "devices/pci0000:00/0000:00:0a.0/nvme/nvme0")
    os.symlink(tmp_path / "devices/pci0000:00/0000:00:0a.0/nvme/nvme0",
               os.path.join(subsys, "nvme0"))
    assert pci_function_of(head) == "0000:00:0a.0"
    assert pci_function_of(os.path.join(head, "nvme0n1p1")) == "0000:00:0a.0"


def test_p2p_client_of_virtual_devices_is_none(tmp_path):
    assert pci_function_of(str(tmp_path / "devices/virtual/block/loop0")) is None
    assert pci_function_of(str(tmp_path / "devices/virtual/block/zram0")) is None


def test_volatile_write_cache_from_sysfs(tmp_path):
    disk = tmp_path / "sda"
    (disk / "queue").mkdir(parents=True)
    (disk / "queue" / "write_cache").write_text("write through\n")
    assert volatile_write_cache(str(disk)) is False
    assert volatile_write_cache(str(disk / "sda1")) is False  # partition: the disk's queue
    (disk / "queue" / "write_cache").write_text("write back\n")
    assert volatile_write_cache(str(disk)) is True
    assert volatile_write_cache(str(tmp_path / "unknown")) is True


# ---- open_backend error paths -------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({}, r"does not exist; set device.create=1 and device.size to create it"),
    ({"create": True}, r"creating it needs a size; set device.size"),
    ({"create": True, "size": 1000}, r"size 1000 is not a positive multiple of block_size 512"),
    ({"create": True, "size": 4096 + 512, "block_size": 4096},
     r"not a positive multiple of block_size 4096"),
    ({"create": True, "size": 0}, r"not a positive multiple"),
    ({"block_size": 1024}, r"block_size 1024 is not supported: use 512 or 4096"),
    ({"kind": "nvme"}, r"unknown backend kind 'nvme'"),
])
def test_open_errors_on_missing_file(tmp_path, loop, kwargs, match):
    path = tmp_path / "missing.img"
    with pytest.raises(BackendError, match=match):
        open_backend(str(path), loop=loop, **kwargs)
    assert not path.exists()


def test_open_error_messages_for_paths(tmp_path, loop):
    with pytest.raises(BackendError, match="is a directory, not a file or block device"):
        open_backend(str(tmp_path), loop=loop)
    with pytest.raises(BackendError, match=r"cannot create .*: directory .* does not exist"):
        open_backend(str(tmp_path / "no" / "ns.img"), create=True, size=4096, loop=loop)
    with pytest.raises(BackendError, match="neither a regular file nor a block device"):
        open_backend("/dev/null", loop=loop)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(BackendError, match="a component of the path is not a directory"):
        open_backend(str(tmp_path / "file" / "ns.img"), loop=loop)
    with pytest.raises(BackendError, match="smaller than one 512-byte block"):
        open_backend(str(tmp_path / "file"), loop=loop)
    with pytest.raises(BackendError, match="no device path"):
        open_backend("", loop=loop)
    with pytest.raises(BackendError, match="memory namespace 'm0' needs a size"):
        open_backend("m0", kind="memory", loop=loop)


def test_open_wraps_oserror_with_cause(tmp_path, loop, monkeypatch):
    path = tmp_path / "ns.img"
    path.write_bytes(bytes(4096))
    real_open = os.open

    def eacces(p, flags, *a):
        if str(p) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(p, flags, *a)

    monkeypatch.setattr(os, "open", eacces)
    with pytest.raises(BackendError, match=f"permission denied opening {path} "
                                           f"read-write") as ei:
        open_backend(str(path), loop=loop)
    assert isinstance(ei.value.__cause__, PermissionError)


@pytest.mark.parametrize("dir_mode, message", [
    (0o755, "permission denied opening {path} read-write"),  # the file is root-only
    (0o700, "permission denied looking up {path}"),  # so is the directory
])
def test_permission_denied_for_an_unprivileged_user(dir_mode, message):
    """A real EACCES: 'nobody' opens a root-only namespace file in a child process."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the nobody user")
    d = tempfile.mkdtemp(prefix="nvmet-p2p-perm-", dir="/var/tmp")
    try:
        _open_as_nobody(d, dir_mode, message)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _open_as_nobody(d: str, dir_mode: int, message: str) -> None:
    os.chmod(d, dir_mode)
    path = os.path.join(d, "ns.img")
    with open(path, "wb") as f:
        f.write(bytes(4096))
    os.chmod(path, 0o600)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import asyncio, sys\n"
            f"sys.path.insert(0, {repo!r})\n"
            "from nvmet_p2p.backends import open_backend\n"
            "from nvmet_p2p.errors import BackendError\n"
            "try:\n"
            f"    open_backend({path!r}, loop=asyncio.new_event_loop())\n"
            "except BackendError as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                       timeout=60, preexec_fn=lambda: os.setuid(65534))
    if r.returncode and "BackendError" not in r.stderr:
        pytest.skip(f"cannot run the package as nobody here: {r.stderr.strip()[-200:]}")
    assert r.stdout.strip() == message.format(path=path)


def test_file_size_rules(tmp_path, loop, caplog, no_thread_leak):
    caplog.set_level(logging.INFO, logger="nvmet_p2p.backend")
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(3 * 512 + 100))
    b = open_backend(str(path), loop=loop)
    assert b.nblocks == 3
    b.close()
    assert any("last 100 bytes are unused" in r.getMessage() for r in caplog.records)
    # an existing file keeps its size, create or not; the mismatch is logged
    b = open_backend(str(path), size=8192, create=True, loop=loop)
    assert b.nblocks == 3 and os.path.getsize(path) == 3 * 512 + 100
    b.close()
    assert any("not the configured size 8192" in r.getMessage() for r in caplog.records)


def test_create_makes_a_sparse_file(disk_dir, loop, no_thread_leak):
    path = os.path.join(disk_dir, "sparse.img")
    b = open_backend(path, size=1 << 30, create=True, block_size=4096, loop=loop)
    try:
        st = os.stat(path)
        assert st.st_size == 1 << 30 and st.st_blocks * 512 < 1 << 20
        assert stat.S_ISREG(st.st_mode) and b.nblocks == (1 << 30) // 4096
    finally:
        b.close()


# ---- memory backend ----------------------------------------------------------------------

def test_memory_completes_synchronously_and_says_what_it_is(loop):
    b = open_backend("bench0", kind="memory", size=1 << 20, loop=loop)
    try:
        assert isinstance(b, MemoryBackend) and b.vwc is False
        seen = []
        b.submit_write(0, 1, memoryview(b"a" * 512), False, seen.append)
        b.submit_read(0, 1, memoryview(bytearray(512)), seen.append)
        b.submit_flush(seen.append)
        assert seen == [0, 0, 0]
        assert "lost" in b.describe()["note"]
    finally:
        b.close()


def test_memory_discard_releases_whole_pages(loop):
    """Discard of a large range reads zeroes, including unaligned edges."""
    b = open_backend("m", kind="memory", size=1 << 20, loop=loop)
    try:
        data = os.urandom(1 << 20)
        ok(write(loop, b, 0, data))
        ok(run_io(loop, lambda cb: b.submit_discard([(3, 1000)], cb)))
        got = read(loop, b, 0, b.nblocks)
        assert got[:3 * 512] == data[:3 * 512]
        assert got[3 * 512:1003 * 512] == bytes(1000 * 512)
        assert got[1003 * 512:] == data[1003 * 512:]
    finally:
        b.close()


def test_aligned_pool_reuses_and_closes():
    pool = aligned.AlignedPool(keep=1)
    a = pool.get(5000)
    assert aligned.is_aligned(memoryview(a)) and len(a) >= 5000
    pool.put(a)
    assert pool.get(100) is a  # reused
    b = pool.get(100)
    pool.put(a)
    pool.put(b)  # beyond keep: unmapped now
    assert b.closed and not a.closed
    pool.close()
    assert a.closed
    assert aligned.buffer_address(memoryview(b"read-only")) is None
