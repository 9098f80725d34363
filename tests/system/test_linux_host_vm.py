"""Our target serving the Linux NVMe/RDMA host (nvme-cli, fio, ext4) over soft-RoCE.

Runs only inside the test VM: `python -m nvmet_p2p.testbed.vm pytest tests/test_linux_host_vm.py`.
One `nvmet-p2p serve` process (tests/vm_target.py) serves, on rxe0 port 4420:
  * SUBNQN, any host: ns1 file 512 B LBAs (fio), ns2 file 4096 B LBAs (ext4),
    ns3 file 512 B LBAs (reset / disconnect under I/O);
  * RESTRICTED_NQN, only OTHER_HOSTNQN may use it: ns1 file (ACL, connect cycles);
  * BDEV_NQN, any host, when the QEMU NVMe is bound to the kernel nvme driver: ns1 is
    its block device (fio on a block-device namespace).
The Linux host always names itself HOSTNQN (or OTHER_HOSTNQN); every test leaves no
controller behind, even when it fails.  fio figures and times go to stderr with a
[linux-host] prefix, past pytest's capture, so the VM log keeps them.

Depth knobs (environment, inside the guest): NVMET_P2P_LH_FIO_SCALE (default 8: 128 MiB
written per namespace, 256 MiB in all; 1 for a quick look) and NVMET_P2P_LH_CYCLES
(default 50).  The harness passes no environment through, so a quick run is:
  python -m nvmet_p2p.testbed.vm run --cmb --iommu --timeout 2400 -- env NVMET_P2P_LH_FIO_SCALE=1 \
      python -m pytest -m vm -p no:cacheprovider -v tests/test_linux_host_vm.py -k fio
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import pytest

from nvmet_p2p.errors import VMError
from nvmet_p2p.testbed import guest
from nvmet_p2p.wire.limits import NVME_DISC_SUBSYS_NAME as DISCOVERY_NQN
from tests.support import vm_target as vt
from tests.support.capsules import cm_pdata, write_capsule

pytestmark = pytest.mark.vm


PORT = 4420
SUBNQN = "nqn.2026-11.io.nvmet-p2p:linux-host"
RESTRICTED_NQN = "nqn.2026-11.io.nvmet-p2p:linux-host-restricted"
BDEV_NQN = "nqn.2026-11.io.nvmet-p2p:linux-host-bdev"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:3b0c6a52-91d4-4c61-8d0e-7a1f00000001"
OTHER_HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:3b0c6a52-91d4-4c61-8d0e-7a1f00000002"

MODEL = "nvmet-p2p linux-host test"
SERIAL = "5eed0000c0ffee01"
FIRMWARE = "0.1.0"

MiB = 1 << 20
NS1_SIZE = 160 * MiB  # fio: QD1 32 MiB + QD32 96 MiB regions
NS2_SIZE = 64 * MiB  # ext4, 4096-byte LBAs
NS3_SIZE = 32 * MiB  # reset / disconnect under I/O
RESTRICTED_SIZE = 8 * MiB

# Kernel target values the Linux host sees (REFERENCE.md §1, drivers/nvme/target).
MDTS = 8
INLINE = 4096
SGLS = 1 << 0 | 1 << 2 | 1 << 20  # SGLs, keyed SGL data block, offset (in-capsule data)
NN = 1024  # NVMET_MAX_NAMESPACES

BSSPLIT = "4k/40:8k/20:16k/15:64k/15:128k/10"
# fio verify sizes scale with NVMET_P2P_LH_FIO_SCALE: 8 (the default) writes 128 MiB per
# namespace, 256 MiB in all over the file and block-device namespaces; 1 writes 16 MiB
# per namespace for a quick look.
FIO_SCALE = max(1, int(os.environ.get("NVMET_P2P_LH_FIO_SCALE", "8")))
# (iodepth, offset, size) of the fio verify runs on one namespace.
FIO_RUNS = ((1, 0, 4 * MiB * FIO_SCALE), (32, 4 * MiB * FIO_SCALE, 12 * MiB * FIO_SCALE))
FIO_TIMEOUT = 300.0
# 50 cycles take ~3.5 min on a loaded TCG guest; NVMET_P2P_LH_CYCLES trades depth for time.
CYCLES = max(1, int(os.environ.get("NVMET_P2P_LH_CYCLES", "50")))
SETTLE_TIMEOUT = 30.0


_capture: list[Any] = []  # pytest's capture manager, set by the `target` fixture


def report(msg: str) -> None:
    """A line for the VM log, past pytest's output capture (also on success)."""
    line = f"[linux-host] {msg}\n"
    if _capture:
        with _capture[0].global_and_fixture_disabled():
            sys.stderr.write(line)
            sys.stderr.flush()
    else:
        sys.stderr.write(line)


# -- the QEMU NVMe as a block-device namespace backing ------------------------------------

def _qemu_nvme_bdev() -> tuple[str | None, str]:
    """(/dev/nvmeXnY of the QEMU NVMe, "") or (None, why not)."""
    try:
        bdf = guest.cmb_nvme_bdf()
    except VMError as e:
        return None, str(e)
    dev = Path("/sys/bus/pci/devices", bdf)
    driver = (dev / "driver").resolve().name if (dev / "driver").exists() else None
    if driver != "nvme":
        return None, f"QEMU NVMe {bdf} is bound to {driver}, not the kernel nvme driver"
    ctrls = sorted((dev / "nvme").glob("nvme*"))
    if not ctrls:
        return None, f"QEMU NVMe {bdf} has no nvme controller in sysfs"
    subnqn = (ctrls[0] / "subsysnqn").read_text().strip()
    try:
        return guest.namespace_block_device(subnqn, timeout=10.0), ""
    except VMError as e:
        return None, str(e)


# -- fixtures ------------------------------------------------------------------------------

def _config(bdev: str | None) -> dict[str, Any]:
    shm = Path("/dev/shm")
    subsystems = [
        vt.subsystem(SUBNQN, [vt.file_ns(1, shm / "lh-ns1.img", NS1_SIZE),
                              vt.file_ns(2, shm / "lh-ns2.img", NS2_SIZE, block_size=4096),
                              vt.file_ns(3, shm / "lh-ns3.img", NS3_SIZE)],
                     model=MODEL, serial=SERIAL, firmware=FIRMWARE),
        vt.subsystem(RESTRICTED_NQN, [vt.file_ns(1, shm / "lh-restricted.img",
                                                 RESTRICTED_SIZE)],
                     allowed_hosts=[OTHER_HOSTNQN]),
    ]
    if bdev is not None:
        subsystems.append(vt.subsystem(BDEV_NQN, [vt.bdev_ns(1, bdev)]))
    nqns = [s["nqn"] for s in subsystems]
    return vt.config([vt.rdma_port(1, PORT, nqns)], subsystems)


@pytest.fixture(scope="module")
def bdev() -> tuple[str | None, str]:
    return _qemu_nvme_bdev()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config,
           bdev: tuple[str | None, str]) -> Iterator[vt.VmTarget]:
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        _capture[:] = [capman]
    guest.setup_rxe()
    guest.modprobe("nvme-rdma")
    t0 = time.monotonic()
    tgt = vt.VmTarget(_config(bdev[0]), tmp_path_factory.mktemp("linux-host"))
    with tgt:
        report(f"target listening after {vt.elapsed(t0):.1f} s")
        yield tgt
    for f in Path("/dev/shm").glob("lh-*.img"):
        f.unlink()
    log = tgt.log_text()
    noted = [ln for ln in log.splitlines() if " WARNING" in ln or " ERROR" in ln]
    report(f"target log: {len(noted)} warning/error lines" +
           "".join(f"\n    {ln[:300]}" for ln in noted[:20]))
    assert tgt.returncode == 0, f"target exit {tgt.returncode}"
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]


@pytest.fixture(autouse=True)
def no_ctrl_left(target: vt.VmTarget) -> Iterator[None]:
    """Each test leaves no Linux controller behind and the target alive."""
    yield
    problems = vt.disconnect_all(target.subnqns)
    assert not problems, problems
    assert target.alive(), f"target died:\n{target.log_tail()}"


@contextlib.contextmanager
def linux_ctrl(subnqn: str, hostnqn: str = HOSTNQN, nr_io_queues: int = 2,
               **kw: Any) -> Iterator[str]:
    """A Linux-host controller of `subnqn` (name, e.g. "nvme1"), disconnected after."""
    ctrl = guest.nvme_connect(subnqn, guest.TRADDR, PORT, hostnqn=hostnqn,
                              nr_io_queues=nr_io_queues, **kw)
    try:
        yield ctrl
    finally:
        guest.nvme_disconnect(subnqn)


def nvme_json(*args: str, timeout: float = 60.0) -> Any:
    return json.loads(guest.sh("nvme", *args, "-o", "json", timeout=timeout).stdout)


def wait_settled(target: vt.VmTarget, want: dict[str, Any], timeout: float = SETTLE_TIMEOUT,
                 what: str = "target resources to settle") -> dict[str, Any]:
    """Poll the target's resources until they equal `want` (VMError shows the last ones)."""
    last: dict[str, Any] = {}

    def probe() -> bool:
        last.clear()
        last.update(resources(target))
        return last == want
    try:
        vt.wait_until(probe, timeout, what)
    except VMError as e:
        raise VMError(f"{e}: want {want}, have {last}") from None
    return last


def resources(target: vt.VmTarget) -> dict[str, Any]:
    st = target.status()
    return {**st["transports"].get("rdma", {}), "controllers": len(st["controllers"]),
            "fds": target.fd_count()}


# -- fio -------------------------------------------------------------------------------------

def fio_verify_args(dev: str, offset: int, size: int, iodepth: int, *,
                    verify_only: bool = False, seed: int = 0x5eed) -> list[str]:
    """Random writes of mixed sizes over [offset, offset+size) then crc32c verify of all."""
    args = [f"--name=verify-qd{iodepth}", f"--filename={dev}", "--ioengine=libaio",
            "--direct=1", "--rw=randwrite", f"--bssplit={BSSPLIT}", f"--offset={offset}",
            f"--size={size}", f"--iodepth={iodepth}", "--verify=crc32c", "--do_verify=1",
            "--verify_fatal=1", "--verify_state_save=0", f"--randseed={seed}"]
    if verify_only:
        args.append("--verify_only=1")
    return args


def check_fio(res: dict[str, Any], written: int | None) -> dict[str, Any]:
    """One clean job; with `written`, it wrote that much and its verify read it all back."""
    [job] = res["jobs"]
    assert job["error"] == 0, job
    if written is not None:
        assert job["write"]["io_bytes"] == written
        assert job["read"]["io_bytes"] == written
    return job


def fio_figures(job: dict[str, Any]) -> str:
    w, r = job["write"], job["read"]
    return (f"write {w['iops']:.0f} IOPS {w['bw_bytes'] / MiB:.2f} MiB/s "
            f"clat mean {w['clat_ns']['mean'] / 1e3:.0f} us; "
            f"verify-read {r['iops']:.0f} IOPS {r['bw_bytes'] / MiB:.2f} MiB/s")


def fio_verify_namespace(dev: str, what: str) -> int:
    """The FIO_RUNS write+verify runs, then a verify-only pass; returns bytes written."""
    written = 0
    for iodepth, offset, size in FIO_RUNS:
        t0 = time.monotonic()
        try:
            res = guest.run_fio(fio_verify_args(dev, offset, size, iodepth),
                                timeout=FIO_TIMEOUT)
        except VMError as e:
            report(f"fio {what} QD{iodepth} {size // MiB} MiB failed after "
                   f"{vt.elapsed(t0):.1f} s: {e}")
            raise
        job = check_fio(res, size)
        written += size
        report(f"fio {what} QD{iodepth} {size // MiB} MiB in {vt.elapsed(t0):.1f} s: "
               f"{fio_figures(job)}")
    for iodepth, offset, size in FIO_RUNS:
        t0 = time.monotonic()
        job = check_fio(guest.run_fio(fio_verify_args(dev, offset, size, iodepth,
                                                      verify_only=True),
                                      timeout=FIO_TIMEOUT), None)
        # fio counts the skipped writes of a verify_only pass as written; only reads go out.
        assert job["read"]["io_bytes"] == size
        r = job["read"]
        report(f"fio {what} verify-only QD{iodepth} {size // MiB} MiB in "
               f"{vt.elapsed(t0):.1f} s: {r['iops']:.0f} IOPS {r['bw_bytes'] / MiB:.2f} MiB/s")
    return written


class FioLoop:
    """fio write+verify runs back to back in a thread until stopped; keeps every result."""

    def __init__(self, args: list[str], size: int) -> None:
        self.args, self.size = args, size
        self.jobs: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.jobs.append(check_fio(guest.run_fio(self.args, timeout=FIO_TIMEOUT),
                                           self.size))
            except (VMError, AssertionError) as e:
                self.errors.append(str(e))
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(FIO_TIMEOUT + 30)
        assert not self._thread.is_alive(), "fio loop did not finish"


# -- discovery -------------------------------------------------------------------------------

def _records(hostnqn: str) -> dict[str, dict[str, Any]]:
    entries = guest.nvme_discover(guest.TRADDR, PORT, hostnqn=hostnqn)
    by_nqn = {e["subnqn"]: e for e in entries}
    assert len(by_nqn) == len(entries), f"duplicate entries: {entries}"
    return by_nqn


def test_discover_lists_exactly_the_allowed_subsystems(target: vt.VmTarget,
                                                       bdev: tuple[str | None, str]) -> None:
    by_nqn = _records(HOSTNQN)
    want = {DISCOVERY_NQN, SUBNQN} | ({BDEV_NQN} if bdev[0] else set())
    assert set(by_nqn) == want  # RESTRICTED_NQN is not ours to see
    for nqn, e in by_nqn.items():
        assert e["trtype"] == "rdma", e
        assert e["adrfam"] == "ipv4", e
        assert e["traddr"].strip() == guest.TRADDR, e
        assert e["trsvcid"].strip() == str(PORT), e
        assert e["treq"] == "not specified", e
        assert int(e["portid"]) == 1, e
        assert e["subtype"] == ("current discovery subsystem" if nqn == DISCOVERY_NQN
                                else "nvme subsystem"), e
        # tsas: RDMA QP type connected, no provider type, RDMA CM.
        assert (e["rdma_qptype"], e["rdma_prtype"], e["rdma_cms"]) == \
            ("connected", "not specified", "rdma-cm"), e
    # The allowed host of the restricted subsystem does see it.
    assert RESTRICTED_NQN in _records(OTHER_HOSTNQN)


# -- identify ------------------------------------------------------------------------------

def _lbads(ns: dict[str, Any]) -> int:
    return int(ns["lbafs"][int(ns["flbas"]) & 0xF]["ds"])


def test_identify_matches_config(target: vt.VmTarget) -> None:
    with linux_ctrl(SUBNQN) as ctrl:
        dev = f"/dev/{ctrl}"
        ident = nvme_json("id-ctrl", dev)
        assert ident["mn"].strip() == MODEL
        assert ident["sn"].strip() == SERIAL
        assert ident["fr"].strip() == FIRMWARE
        assert ident["subnqn"].strip() == SUBNQN
        assert int(ident["nn"]) == NN
        assert int(ident["mdts"]) == MDTS
        assert int(ident["sgls"]) == SGLS
        assert int(ident["ioccsz"]) == (64 + INLINE) // 16 == 260
        assert int(ident["iorcsz"]) == 1
        assert int(ident["cntlid"]) in {c["cntlid"] for c in target.controllers()
                                        if c["subsys"] == SUBNQN}
        # Two I/O queues as asked, on our side too.
        [mine] = [c for c in target.controllers() if c["hostnqn"] == HOSTNQN]
        assert mine["queues"] == [0, 1, 2]
        active = [int(x) for x in re.findall(r"0x([0-9a-f]+)",
                                             guest.sh("nvme", "list-ns", dev).stdout)]
        assert sorted(active) == [1, 2, 3], active

        sizes = {1: (NS1_SIZE, 512), 2: (NS2_SIZE, 4096), 3: (NS3_SIZE, 512)}
        for nsid, (size, bs) in sizes.items():
            blk = guest.namespace_block_device(SUBNQN, nsid)
            ns = nvme_json("id-ns", blk)
            assert 1 << _lbads(ns) == bs, (nsid, ns["lbafs"])
            assert int(ns["nsze"]) == int(ns["ncap"]) == size // bs, (nsid, ns)
            sysblk = Path("/sys/block", Path(blk).name)
            assert int((sysblk / "queue/logical_block_size").read_text()) == bs
            assert int((sysblk / "size").read_text()) * 512 == size

        listed = nvme_json("list")["Devices"]
        ours = {d["DevicePath"]: d for d in listed if d["ModelNumber"].strip() == MODEL}
        assert len(ours) == 3, listed
        for d in ours.values():
            assert d["SerialNumber"].strip() == SERIAL and d["Firmware"].strip() == FIRMWARE
            assert int(d["PhysicalSize"]) == sizes[int(d["NameSpace"])][0]
            assert int(d["SectorSize"]) == sizes[int(d["NameSpace"])][1]


# -- fio verify ------------------------------------------------------------------------------

def test_fio_verify_file_namespace(target: vt.VmTarget) -> None:
    with linux_ctrl(SUBNQN):
        dev = guest.namespace_block_device(SUBNQN, 1)
        before = target.status()
        written = fio_verify_namespace(dev, "file-ns")
        after = target.status()
    stats = {s: next(ns for ns in st["subsystems"][SUBNQN]["namespaces"] if ns["nsid"] == 1)
             ["stats"] for s, st in (("before", before), ("after", after))}
    # Every byte fio wrote went through our target's namespace (no cache in between).
    assert stats["after"]["write_bytes"] - stats["before"]["write_bytes"] == written
    assert stats["after"]["read_bytes"] - stats["before"]["read_bytes"] >= 2 * written


def test_fio_verify_bdev_namespace(target: vt.VmTarget, bdev: tuple[str | None, str]) -> None:
    if bdev[0] is None:
        pytest.skip(f"no block-device namespace: {bdev[1]}")
    with linux_ctrl(BDEV_NQN):
        dev = guest.namespace_block_device(BDEV_NQN, 1)
        fio_verify_namespace(dev, "bdev-ns")
    [ns] = target.status()["subsystems"][BDEV_NQN]["namespaces"]
    assert ns["kind"] == "bdev" and ns["path"] == bdev[0], ns


# -- a filesystem ----------------------------------------------------------------------------

def _tree(root: Path, rng: random.Random, count: int = 200) -> dict[str, str]:
    sums = {}
    for i in range(count):
        rel = f"d{i % 10}/f{i:03d}"
        path = root / rel
        path.parent.mkdir(exist_ok=True)
        data = rng.randbytes(rng.choice((0, 1, 511, 4096, 4097)) + rng.randrange(64 << 10))
        path.write_bytes(data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


def _check_tree(root: Path, sums: dict[str, str]) -> None:
    found = {str(p.relative_to(root)) for p in root.rglob("f*") if p.is_file()}
    assert found == set(sums)
    bad = [rel for rel, h in sums.items()
           if hashlib.sha256((root / rel).read_bytes()).hexdigest() != h]
    assert not bad, f"{len(bad)} files differ: {bad[:5]}"


def test_ext4_on_4k_namespace(target: vt.VmTarget, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with linux_ctrl(SUBNQN):
        dev = guest.namespace_block_device(SUBNQN, 2)  # 4096-byte LBAs
        guest.sh("mkfs.ext4", "-q", "-F", dev, timeout=120)
        guest.sh("mount", dev, str(mnt), timeout=60)
        try:
            sums = _tree(mnt, random.Random(0xe474))
        finally:
            guest.sh("umount", str(mnt), timeout=120)
        guest.sh("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
        guest.sh("mount", dev, str(mnt), timeout=60)
        try:
            _check_tree(mnt, sums)
        finally:
            guest.sh("umount", str(mnt), timeout=120)
        fsck = guest.sh("fsck.ext4", "-n", "-f", dev, timeout=120, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr


# -- reset and disconnect under I/O ----------------------------------------------------------

def _fio_background(dev: str, offset: int, size: int, runtime: int,
                    log: Path) -> subprocess.Popen[bytes]:
    args = ["fio", "--name=bg", f"--filename={dev}", "--ioengine=libaio", "--direct=1",
            "--rw=randwrite", "--bs=4k", f"--offset={offset}", f"--size={size}",
            "--iodepth=16", "--time_based=1", f"--runtime={runtime}", "--output-format=json"]
    with open(log, "wb") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def _ns_write_cmds(target: vt.VmTarget, nsid: int) -> int:
    nss = target.status()["subsystems"][SUBNQN]["namespaces"]
    return next(ns for ns in nss if ns["nsid"] == nsid)["stats"]["write_cmds"]


def _wait_io_flowing(target: vt.VmTarget, nsid: int, proc: subprocess.Popen[bytes]) -> None:
    start = _ns_write_cmds(target, nsid)
    vt.wait_until(lambda: proc.poll() is None and _ns_write_cmds(target, nsid) > start + 50,
                  60, "background fio writes reaching the target")


def _finish(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise


def _target_up(target: vt.VmTarget) -> None:
    assert target.alive(), f"target died:\n{target.log_tail()}"
    assert "controllers" in target.status()


def test_reset_and_disconnect_under_io(target: vt.VmTarget, tmp_path: Path) -> None:
    half = 4 * MiB  # verified data in [0, half); background writes in [half, NS3_SIZE)
    with linux_ctrl(SUBNQN) as ctrl:
        dev = guest.namespace_block_device(SUBNQN, 3)
        check_fio(guest.run_fio(fio_verify_args(dev, 0, half, 8), timeout=FIO_TIMEOUT), half)

        # nvme reset while fio writes the other half: the host requeues, fio sees no error.
        bg = _fio_background(dev, half, NS3_SIZE - half, 20, tmp_path / "fio-reset.log")
        try:
            _wait_io_flowing(target, 3, bg)
            cntlid_before = {c["cntlid"] for c in target.controllers()}
            guest.sh("nvme", "reset", f"/dev/{ctrl}", timeout=60)
            vt.wait_until(lambda: Path(f"/sys/class/nvme/{ctrl}/state").read_text().strip()
                          == "live", 60, f"{ctrl} live after reset")
            _target_up(target)
            rc = _finish(bg, 120)
        finally:
            if bg.poll() is None:
                bg.kill()
        fio_out = (tmp_path / "fio-reset.log").read_text()
        assert rc == 0, f"fio across nvme reset failed:\n{fio_out[-3000:]}"
        mine = [c for c in target.controllers() if c["hostnqn"] == HOSTNQN]
        assert len(mine) == 1 and mine[0]["cntlid"] not in cntlid_before  # a new association

        # nvme disconnect while fio writes: fio fails, the target stays up.
        bg = _fio_background(dev, half, NS3_SIZE - half, 60, tmp_path / "fio-disconnect.log")
        try:
            _wait_io_flowing(target, 3, bg)
            guest.nvme_disconnect(SUBNQN)
            _finish(bg, 120)  # ends with I/O errors: its disk went away
        finally:
            if bg.poll() is None:
                bg.kill()
    _target_up(target)
    vt.wait_until(lambda: not [c for c in target.controllers() if c["subsys"] == SUBNQN],
                  SETTLE_TIMEOUT, "the target to drop the disconnected controller")

    # The host reconnects and what it wrote before is intact.
    with linux_ctrl(SUBNQN):
        dev = guest.namespace_block_device(SUBNQN, 3)
        check_fio(guest.run_fio(fio_verify_args(dev, 0, half, 8, verify_only=True),
                                timeout=FIO_TIMEOUT), None)


# -- connect / disconnect cycles -------------------------------------------------------------

def test_connect_disconnect_cycles_leak_nothing(target: vt.VmTarget) -> None:
    # One warm-up cycle: buffer pools are registered on the device once, at first use.
    with linux_ctrl(RESTRICTED_NQN, OTHER_HOSTNQN, nr_io_queues=1):
        pass
    base = wait_settled(target, {**resources(target), "controllers": 0},
                        what="the warm-up controller to go away")
    assert base["qps"] == 0 and base["queues"] == 0, base
    t0 = time.monotonic()
    for i in range(CYCLES):
        with linux_ctrl(RESTRICTED_NQN, OTHER_HOSTNQN, nr_io_queues=1):
            if i == 0:
                during = resources(target)
                assert during["qps"] == 2 and during["controllers"] == 1, during
    report(f"{CYCLES} connect/disconnect cycles in {vt.elapsed(t0):.1f} s; baseline {base}")
    wait_settled(target, base)


# -- access control --------------------------------------------------------------------------

def test_host_not_allowed(target: vt.VmTarget) -> None:
    assert RESTRICTED_NQN not in _records(HOSTNQN)
    guest.sh("dmesg", "-C")
    with pytest.raises(VMError):
        guest.nvme_connect(RESTRICTED_NQN, guest.TRADDR, PORT, hostnqn=HOSTNQN, timeout=60)
    assert guest.nvme_ctrls(RESTRICTED_NQN) == []
    dmesg = guest.sh("dmesg").stdout
    # nvmf_log_connect_error() prints this for status 0x184 (Connect Invalid Host).
    assert f"Connect for subsystem {RESTRICTED_NQN} is not allowed, hostnqn: {HOSTNQN}" \
        in dmesg, dmesg[-3000:]
    assert (f"event=connect_refused hostnqn={HOSTNQN} subnqn={RESTRICTED_NQN} "
            'reason="host not allowed"') in target.log_text()
    assert not [c for c in target.controllers() if c["subsys"] == RESTRICTED_NQN]
    # The allowed host gets in.
    with linux_ctrl(RESTRICTED_NQN, OTHER_HOSTNQN, nr_io_queues=1):
        assert guest.namespace_block_device(RESTRICTED_NQN).startswith("/dev/nvme")


# -- bad input from a raw RDMA host while a Linux host does verified I/O ----------------------

BAD_FIO_SIZE = 4 * MiB


def test_bad_input_with_concurrent_linux_fio(target: vt.VmTarget) -> None:
    from nvmet_p2p.host.rdma import RdmaHost
    from nvmet_p2p.wire.command import Sgl, SglType

    python_hostnqn = "nqn.2014-08.org.nvmexpress:uuid:3b0c6a52-91d4-4c61-8d0e-7a1f000000ba"
    with linux_ctrl(SUBNQN) as ctrl:
        # fio on ns1 LBA 0.., exactly where the bad capsules below aim (nsid 1, slba 0): a
        # target that wrote anything for them would show up as a verify mismatch.
        dev = guest.namespace_block_device(SUBNQN, 1)
        loop = FioLoop(fio_verify_args(dev, 0, BAD_FIO_SIZE, 8, seed=0xbad), BAD_FIO_SIZE)
        writes = _ns_write_cmds(target, 1)
        with loop:
            vt.wait_until(lambda: _ns_write_cmds(target, 1) > writes + 20 or loop.errors, 60,
                          "Linux-host fio writes reaching the target")
            probe = RdmaHost(guest.TRADDR, PORT)
            for pdata, sts in ((cm_pdata(recfmt=1), 0x02), (cm_pdata(qid=1000), 0x03),
                               (cm_pdata(hsqsize=0), 0x04), (cm_pdata(hrqsize=0), 0x05),
                               (cm_pdata(qid=1, hsqsize=4096, hrqsize=128), 0x04)):
                assert probe.connect_raw(pdata) == ("rejected", sts)
            host = RdmaHost(guest.TRADDR, PORT).connect(SUBNQN, python_hostnqn,
                                                        nr_io_queues=1, queue_size=32)
            try:
                q = host.io[1]
                for cid, (sgl, payload, nlb, sc) in enumerate((
                        (Sgl(SglType.DATA_BLOCK_OFFSET, 4095, 512), bytes(512), 1, 0x16),
                        (Sgl(SglType.DATA_BLOCK_OFFSET, (1 << 64) - 512, 512), bytes(512),
                         1, 0x16),
                        (Sgl(0x50, 0, 512), b"", 1, 0x11),
                        (Sgl(SglType.KEYED_DATA_BLOCK, 0x1000, 2 * MiB, 0x1234), b"",
                         2 * MiB // 512, 0x0F),
                        (Sgl(SglType.KEYED_DATA_BLOCK, 0x1000, 1024, 0x1234), b"", 1, 0x0F),
                ), start=20):
                    cqe = q.raw(write_capsule(cid, sgl, payload, nlb=nlb))
                    assert cqe.status & 0x7FF == sc, (cid, hex(cqe.status))
                # A bad rkey: the RC QP breaks and the target drops that queue only.
                with pytest.raises(ConnectionError):
                    q.raw(write_capsule(30, Sgl(SglType.KEYED_DATA_BLOCK, 0x1000, 512,
                                                 0xBAD0BAD), nlb=1), timeout=20)
                host.io.pop(1).close()
                assert host.property_get(0x1C) & 1
            finally:
                host.disconnect()
            # Keep the Linux host busy a while longer after the last bad input.
            n = len(loop.jobs)
            vt.wait_until(lambda: len(loop.jobs) > n or loop.errors, FIO_TIMEOUT,
                          "one more complete Linux-host fio verify run")
        assert not loop.errors, loop.errors
        assert loop.jobs
        assert Path(f"/sys/class/nvme/{ctrl}/state").read_text().strip() == "live"
        report(f"bad input: {len(loop.jobs)} concurrent Linux fio verify runs clean; last: "
               f"{fio_figures(loop.jobs[-1])}")
    vt.wait_until(lambda: not [c for c in target.controllers()
                               if c["hostnqn"] == python_hostnqn],
                  SETTLE_TIMEOUT, "the Python host's controller to go away")
