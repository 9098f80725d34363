"""Our target serving the Linux NVMe/TCP host (nvme-cli, fio) in the test VM.

Runs only inside the VM: `python -m nvmet_p2p.testbed.vm pytest tests/system/test_linux_host_tcp_vm.py`.
One `nvmet-p2p serve` process (tests/support/vm_target.py), no RDMA anywhere:
  * tcp 192.0.2.1:4440 (the dummy netdev) and [::1]:4441, allow_p2pmem=1;
  * SUBNQN, any host: ns1 file 512 B LBAs (fio), ns2 file 4096 B LBAs;
  * RESTRICTED_NQN, only OTHER_HOSTNQN;
  * BDEV_NQN, when the QEMU NVMe is bound to the kernel nvme driver: its block device.
The kernel's own nvmet-tcp answers on 4442 in the same boot, as the reference for the
discovery entries.  The Linux host is nvme-tcp, with and without header and data digests
and SQ flow control; fio writes mixed sizes (in-capsule and R2T writes) and verifies
crc32c.  Figures go to stderr with a [linux-host-tcp] prefix.  Every test leaves no
controller behind.

NVMET_P2P_LH_FIO_SCALE (default 2) scales the fio sizes, as in test_linux_host_vm.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nvmet_p2p.core.p2pmem import REASON_EXHAUSTED, REASON_IN_CAPSULE
from nvmet_p2p.errors import VMError
from nvmet_p2p.testbed import guest
from nvmet_p2p.testbed.kernel_target import KernelTarget
from tests.support import vm_target as vt

pytestmark = pytest.mark.vm

PORT, PORT6, KERNEL_PORT, LIVE_PORT = 4440, 4441, 4442, 4443
SUBNQN = "nqn.2026-12.io.nvmet-p2p:tcp-host"
RESTRICTED_NQN = "nqn.2026-12.io.nvmet-p2p:tcp-host-restricted"
BDEV_NQN = "nqn.2026-12.io.nvmet-p2p:tcp-host-bdev"
KERNEL_NQN = "nqn.2026-12.io.nvmet-p2p:tcp-kernel-reference"
DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:3b0c6a52-91d4-4c61-8d0e-7a1f00000c01"
OTHER_HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:3b0c6a52-91d4-4c61-8d0e-7a1f00000c02"
MiB = 1 << 20
NS1_SIZE = 96 * MiB
NS2_SIZE = 16 * MiB
BSSPLIT = "4k/40:8k/20:16k/15:64k/15:128k/10"  # 4k in the capsule, the rest by R2T
FIO_SCALE = max(1, int(os.environ.get("NVMET_P2P_LH_FIO_SCALE", "2")))
FIO_RUNS = ((1, 0, 2 * MiB * FIO_SCALE), (32, 2 * MiB * FIO_SCALE, 6 * MiB * FIO_SCALE))
FIO_TIMEOUT = 300.0
SETTLE_TIMEOUT = 30.0
CYCLES = 10

_capture: list[Any] = []


def report(msg: str) -> None:
    line = f"[linux-host-tcp] {msg}\n"
    if _capture:
        with _capture[0].global_and_fixture_disabled():
            sys.stderr.write(line)
            sys.stderr.flush()
    else:
        sys.stderr.write(line)


def _qemu_nvme_bdev() -> tuple[str | None, str]:
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


@pytest.fixture(scope="module")
def bdev() -> tuple[str | None, str]:
    return _qemu_nvme_bdev()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config,
           bdev: tuple[str | None, str]) -> Iterator[vt.VmTarget]:
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        _capture[:] = [capman]
    guest.setup_netdev()
    guest.modprobe("nvme-tcp")
    shm = Path("/dev/shm")
    subsystems = [
        vt.subsystem(SUBNQN, [vt.file_ns(1, shm / "lht-ns1.img", NS1_SIZE),
                              vt.file_ns(2, shm / "lht-ns2.img", NS2_SIZE, block_size=4096)]),
        vt.subsystem(RESTRICTED_NQN, [vt.file_ns(1, shm / "lht-restricted.img", 8 * MiB)],
                     allowed_hosts=[OTHER_HOSTNQN]),
    ]
    if bdev[0] is not None:
        subsystems.append(vt.subsystem(BDEV_NQN, [vt.bdev_ns(1, bdev[0])]))
    nqns = [s["nqn"] for s in subsystems]
    ports = [vt.tcp_port(1, PORT, nqns), vt.tcp_port(2, PORT6, [SUBNQN], traddr="::1",
                                                    adrfam="ipv6")]
    for p in ports:
        p["attr"] = {"allow_p2pmem": "1"}
    t0 = time.monotonic()
    with vt.VmTarget(vt.config(ports, subsystems), tmp_path_factory.mktemp("lh-tcp")) as tgt:
        report(f"target listening after {vt.elapsed(t0):.1f} s")
        yield tgt
    for f in shm.glob("lht-*.img"):
        f.unlink()
    log = tgt.log_text()
    assert tgt.returncode == 0, f"target exit {tgt.returncode}"
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]


@pytest.fixture(autouse=True)
def no_ctrl_left(target: vt.VmTarget) -> Iterator[None]:
    yield
    problems = vt.disconnect_all([SUBNQN, RESTRICTED_NQN, BDEV_NQN])
    assert not problems, problems
    assert target.alive(), f"target died:\n{target.log_tail()}"


@contextlib.contextmanager
def linux_ctrl(subnqn: str, hostnqn: str = HOSTNQN, nr_io_queues: int = 2,
               **kw: Any) -> Iterator[str]:
    ctrl = guest.nvme_connect(subnqn, kw.pop("traddr", guest.TRADDR), kw.pop("trsvcid", PORT),
                              hostnqn=hostnqn, nr_io_queues=nr_io_queues, transport="tcp",
                              **kw)
    try:
        yield ctrl
    finally:
        guest.nvme_disconnect(subnqn)


def tcp_stats(target: vt.VmTarget) -> dict[str, int]:
    return dict(target.status()["transports"]["tcp"])


def ns_stats(target: vt.VmTarget, nqn: str = SUBNQN, nsid: int = 1) -> dict[str, Any]:
    nss = target.status()["subsystems"][nqn]["namespaces"]
    return dict(next(ns for ns in nss if ns["nsid"] == nsid)["stats"])


def fio_args(dev: str, offset: int, size: int, iodepth: int, *, verify_only: bool = False,
             seed: int = 0x7c9) -> list[str]:
    args = [f"--name=tcp-verify-qd{iodepth}", f"--filename={dev}", "--ioengine=libaio",
            "--direct=1", "--rw=randwrite", f"--bssplit={BSSPLIT}", f"--offset={offset}",
            f"--size={size}", f"--iodepth={iodepth}", "--verify=crc32c", "--do_verify=1",
            "--verify_fatal=1", "--verify_state_save=0", f"--randseed={seed}"]
    return args + (["--verify_only=1"] if verify_only else [])


def fio_verify(dev: str, what: str) -> int:
    """Write+verify runs at QD1 and QD32, then a verify-only pass; returns bytes written."""
    written = 0
    for iodepth, offset, size in FIO_RUNS:
        t0 = time.monotonic()
        [job] = guest.run_fio(fio_args(dev, offset, size, iodepth), timeout=FIO_TIMEOUT)["jobs"]
        assert job["error"] == 0, job
        assert job["write"]["io_bytes"] == size and job["read"]["io_bytes"] == size
        written += size
        w, r = job["write"], job["read"]
        report(f"fio {what} QD{iodepth} {size // MiB} MiB in {vt.elapsed(t0):.1f} s: write "
               f"{w['iops']:.0f} IOPS {w['bw_bytes'] / MiB:.2f} MiB/s; verify-read "
               f"{r['iops']:.0f} IOPS {r['bw_bytes'] / MiB:.2f} MiB/s; crc32c verify clean")
    for iodepth, offset, size in FIO_RUNS:
        [job] = guest.run_fio(fio_args(dev, offset, size, iodepth, verify_only=True),
                              timeout=FIO_TIMEOUT)["jobs"]
        assert job["error"] == 0 and job["read"]["io_bytes"] == size, job
    return written


# -- discovery, as the kernel's nvmet-tcp answers it -----------------------------------------

def _entry_shape(e: dict[str, Any]) -> tuple[Any, ...]:
    return (e["trtype"], e["adrfam"], e["subtype"], e["treq"], e.get("sectype"),
            e.get("eflags"))


def test_discovery_entries_match_the_kernel_nvmet_tcp(target: vt.VmTarget,
                                                      tmp_path: Path) -> None:
    ours = guest.nvme_discover(guest.TRADDR, PORT, hostnqn=HOSTNQN, transport="tcp")
    backing = guest.shm_file("lht-kernel.img", 8 * MiB)
    with KernelTarget(KERNEL_NQN, backing, trsvcid=KERNEL_PORT, port_id=7, trtype="tcp",
                      buffered_io=True):
        kernel = guest.nvme_discover(guest.TRADDR, KERNEL_PORT, hostnqn=HOSTNQN,
                                     transport="tcp")
    backing.unlink()
    report(f"kernel nvmet-tcp entries: {json.dumps([_entry_shape(e) for e in kernel])}")
    report(f"our entries: {json.dumps([_entry_shape(e) for e in ours])}")
    by_sub = {e["subtype"]: _entry_shape(e) for e in kernel}
    for e in ours:
        assert e["traddr"].strip() == guest.TRADDR and e["trsvcid"].strip() == str(PORT), e
        assert _entry_shape(e) == by_sub[e["subtype"]], (e, kernel)
    assert {e["subnqn"] for e in ours} >= {DISCOVERY_NQN, SUBNQN}
    assert RESTRICTED_NQN not in {e["subnqn"] for e in ours}


def test_identify_over_tcp(target: vt.VmTarget) -> None:
    with linux_ctrl(SUBNQN) as ctrl:
        ident = json.loads(guest.sh("nvme", "id-ctrl", f"/dev/{ctrl}", "-o", "json").stdout)
        assert int(ident["sgls"]) == 1 << 0 | 1 << 20  # SGLs, offset (in-capsule); no keyed
        assert int(ident["ioccsz"]) == (64 + 4096) // 16 and int(ident["iorcsz"]) == 1
        assert ident["subnqn"].strip() == SUBNQN
        [mine] = [c for c in target.controllers() if c["hostnqn"] == HOSTNQN]
        assert mine["queues"] == [0, 1, 2]


# -- fio verify, with and without digests, with and without SQ flow control ----------------

@pytest.mark.parametrize("digests", [False, True], ids=["no-digests", "hdr+data-digests"])
def test_fio_verify(target: vt.VmTarget, digests: bool) -> None:
    before, ns_before = tcp_stats(target), ns_stats(target)
    with linux_ctrl(SUBNQN, digests=digests):
        dev = guest.namespace_block_device(SUBNQN, 1)
        written = fio_verify(dev, "file-ns digests" if digests else "file-ns")
    after, ns_after = tcp_stats(target), ns_stats(target)
    assert ns_after["write_bytes"] - ns_before["write_bytes"] == written
    assert ns_after["read_bytes"] - ns_before["read_bytes"] >= 2 * written
    queues = 3  # admin + 2 I/O queues, each with the digests asked for
    assert after["hdgst_queues"] - before["hdgst_queues"] == (queues if digests else 0)
    assert after["ddgst_queues"] - before["ddgst_queues"] == (queues if digests else 0)
    assert after["r2t"] > before["r2t"] and after["h2c_data"] > before["h2c_data"]
    assert after["hdr_digest_errors"] == after["data_digest_errors"] == after["term_sent"] == 0
    report(f"digests {digests}: {after['r2t'] - before['r2t']} R2Ts, "
           f"{after['h2c_data'] - before['h2c_data']} H2CData PDUs")


def test_reads_end_with_the_success_flag_without_sq_flow_control(target: vt.VmTarget) -> None:
    before = tcp_stats(target)
    with linux_ctrl(SUBNQN, disable_sqflow=True):
        dev = guest.namespace_block_device(SUBNQN, 1)
        [job] = guest.run_fio(fio_args(dev, 64 * MiB, 4 * MiB, 16), timeout=FIO_TIMEOUT)["jobs"]
        assert job["error"] == 0 and job["read"]["io_bytes"] == 4 * MiB
    done = tcp_stats(target)["c2h_success"] - before["c2h_success"]
    assert done >= job["read"]["total_ios"], (done, job["read"])
    report(f"--disable-sqflow: {done} reads completed by C2HData SUCCESS")


def test_fio_on_a_4k_namespace_and_over_ipv6(target: vt.VmTarget) -> None:
    entries = guest.nvme_discover("::1", PORT6, hostnqn=HOSTNQN, transport="tcp")
    assert {e["adrfam"] for e in entries} == {"ipv6"}
    assert {e["traddr"].strip() for e in entries} == {"::1"}
    with linux_ctrl(SUBNQN, traddr="::1", trsvcid=PORT6, nr_io_queues=1):
        dev = guest.namespace_block_device(SUBNQN, 2)  # 4096-byte LBAs
        [job] = guest.run_fio(fio_args(dev, 0, 4 * MiB, 8), timeout=FIO_TIMEOUT)["jobs"]
        assert job["error"] == 0 and job["read"]["io_bytes"] == 4 * MiB


# -- a block-device namespace and the P2P decision --------------------------------------------

def test_fio_verify_bdev_namespace_and_the_p2p_path(target: vt.VmTarget,
                                                    bdev: tuple[str | None, str]) -> None:
    if bdev[0] is None:
        pytest.skip(f"no block-device namespace: {bdev[1]}")
    before = ns_stats(target, BDEV_NQN)
    with linux_ctrl(BDEV_NQN):
        dev = guest.namespace_block_device(BDEV_NQN, 1)
        written = fio_verify(dev, "bdev-ns")
    after = ns_stats(target, BDEV_NQN)
    [d] = [d for d in target.rpc("p2p_explain") if d["subnqn"] == BDEV_NQN and d["portid"] == 1]
    report(f"bdev namespace over tcp: {d['text']}")
    moved = {k: after.get(k, 0) - before.get(k, 0) for k in ("p2p_bytes", "p2p_reqs",
                                                            "sysmem_reqs")}
    report(f"bdev namespace over tcp: P2P {moved}")
    assert after["write_bytes"] - before["write_bytes"] == written
    if d["p2p"]:
        # the payload went socket -> p2pmem chunk -> O_DIRECT (and back), but for writes
        # small enough to come inside the capsule (16 KiB over TCP) and for requests the
        # provider had no room for, which are counted with those reasons
        assert moved["p2p_bytes"] >= written, moved
        reasons = set(after.get("sysmem_by_reason", {})) - set(before.get("sysmem_by_reason", {}))
        assert reasons <= {REASON_IN_CAPSULE, REASON_EXHAUSTED}, reasons
    else:
        assert moved["p2p_reqs"] == 0 and d["reason"]
        reasons = after.get("sysmem_by_reason", {})
        assert sum(reasons.values()) == after["sysmem_reqs"], reasons


# -- live configuration ----------------------------------------------------------------------

def test_port_linked_live_listens_and_unlinking_deletes_its_controllers(
        target: vt.VmTarget) -> None:
    def subnqns() -> set[str]:
        try:
            recs = guest.nvme_discover(guest.TRADDR, LIVE_PORT, hostnqn=HOSTNQN,
                                       transport="tcp", timeout=30)
        except VMError:  # nothing listens there
            return set()
        return {r["subnqn"] for r in recs}

    assert subnqns() == set()
    target.rpc("create", path="/ports", name=9,
               attrs={"addr": {"trtype": "tcp", "adrfam": "ipv4", "traddr": guest.TRADDR,
                               "trsvcid": str(LIVE_PORT)}})
    target.rpc("link", port=9, subsystem=SUBNQN)
    assert SUBNQN in subnqns()
    ctrl = guest.nvme_connect(SUBNQN, guest.TRADDR, LIVE_PORT, hostnqn=HOSTNQN,
                              nr_io_queues=1, transport="tcp", ctrl_loss_tmo=2)
    assert [c for c in target.controllers() if c["hostnqn"] == HOSTNQN]
    target.rpc("unlink", port=9, subsystem=SUBNQN)
    vt.wait_until(lambda: not [c for c in target.controllers() if c["hostnqn"] == HOSTNQN],
                  SETTLE_TIMEOUT, "the unlinked port's controller to be deleted")
    assert subnqns() == set()  # no subsystem left: the port stopped listening
    state = Path("/sys/class/nvme", ctrl, "state")

    def lost() -> bool:  # reconnecting, or already given up (ctrl_loss_tmo) and removed
        try:
            return state.read_text().strip() != "live"
        except FileNotFoundError:
            return True
    guest.wait_for(lost, SETTLE_TIMEOUT, f"{ctrl} to lose its controller")
    guest.nvme_disconnect(SUBNQN)
    target.rpc("delete", path="/ports/9")


def test_host_not_allowed(target: vt.VmTarget) -> None:
    with pytest.raises(VMError):
        guest.nvme_connect(RESTRICTED_NQN, guest.TRADDR, PORT, hostnqn=HOSTNQN,
                           transport="tcp", timeout=60)
    with linux_ctrl(RESTRICTED_NQN, OTHER_HOSTNQN, nr_io_queues=1):
        assert guest.namespace_block_device(RESTRICTED_NQN).startswith("/dev/nvme")


def test_connect_disconnect_cycles_leak_nothing(target: vt.VmTarget) -> None:
    def resources() -> dict[str, Any]:
        st = target.status()
        tcp = st["transports"]["tcp"]
        return {"queues": tcp["queues"], "sockets": tcp["sockets"],
                "inflight": tcp["inflight"], "controllers": len(st["controllers"]),
                "fds": target.fd_count()}
    with linux_ctrl(RESTRICTED_NQN, OTHER_HOSTNQN, nr_io_queues=1):
        pass
    base: dict[str, Any] = {}
    vt.wait_until(lambda: base.update(resources()) or base["controllers"] == 0,
                  SETTLE_TIMEOUT, "the warm-up controller to go")
    t0 = time.monotonic()
    for i in range(CYCLES):
        with linux_ctrl(RESTRICTED_NQN, OTHER_HOSTNQN, nr_io_queues=1):
            if i == 0:
                assert resources()["queues"] == base["queues"] + 2
    report(f"{CYCLES} tcp connect/disconnect cycles in {vt.elapsed(t0):.1f} s; base {base}")
    last: dict[str, Any] = {}
    vt.wait_until(lambda: last.update(resources()) or last == base, SETTLE_TIMEOUT,
                  "resources back to the baseline")


# -- bad input from a raw Python host while the Linux host runs fio -------------------------

def test_bad_input_with_concurrent_linux_fio(target: vt.VmTarget) -> None:
    from nvmet_p2p.host.tcp import TargetTerminated, TcpHost
    from nvmet_p2p.wire import tcp as t
    from nvmet_p2p.wire.command import IoOpcode, Psdt, Sgl, SglType, Sqe

    python_hostnqn = "nqn.2014-08.org.nvmexpress:uuid:3b0c6a52-91d4-4c61-8d0e-7a1f00000cba"
    size = 4 * MiB
    with linux_ctrl(SUBNQN, digests=True) as ctrl:
        dev = guest.namespace_block_device(SUBNQN, 1)
        errors: list[str] = []
        runs: list[dict[str, Any]] = []
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    [job] = guest.run_fio(fio_args(dev, 0, size, 8, seed=0xbad),
                                          timeout=FIO_TIMEOUT)["jobs"]
                    assert job["error"] == 0, job
                    runs.append(job)
                except (VMError, AssertionError) as e:
                    errors.append(str(e))
                    return
        worker = threading.Thread(target=loop, daemon=True)
        worker.start()
        try:
            vt.wait_until(lambda: runs or errors or ns_stats(target)["write_cmds"] > 20, 60,
                          "Linux-host fio writes reaching the target")
            terms = []
            for mangle in ("hdgst", "window", "type"):
                h = TcpHost(guest.TRADDR, PORT, hostnqn=python_hostnqn, hdgst=True,
                            ddgst=True).connect(SUBNQN, nr_io_queues=1)
                q = h.io[1]
                if mangle == "hdgst":
                    raw = bytearray(t.encode(t.PduType.CMD, t.CapsuleCmd(bytes(64)),
                                             hdgst=True))
                    raw[20] ^= 1
                    q.conn.send(raw)
                elif mangle == "window":
                    sqe = Sqe(opcode=IoOpcode.WRITE, flags=Psdt.SGL_MPTR_CONTIG << 6, cid=1,
                              nsid=1, cdw12=7,
                              dptr=Sgl(SglType.TRANSPORT_DATA_BLOCK, 0, 4096).encode())
                    q.conn.send_pdu(t.PduType.CMD, t.CapsuleCmd(sqe.encode()))
                    [ev] = q.conn.events(20.0, until=lambda e: True)
                    r2t = ev.pdu.psh
                    q.conn.send_pdu(t.PduType.H2C_DATA, t.DataPdu(1, r2t.ttag, 2048, 4096),
                                    bytes(4096))
                else:
                    q.conn.send(bytes([0x0C, 0, 24, 0, 24, 0, 0, 0]) + bytes(20))
                with pytest.raises(TargetTerminated) as err:
                    q.progress(20.0)
                terms.append(t.Fes(err.value.fes).name)
                h.disconnect()
            assert terms == ["HDR_DIGEST_ERR", "DATA_OUT_OF_RANGE", "INVALID_PDU_HDR"]
            n = len(runs)
            vt.wait_until(lambda: len(runs) > n or errors, FIO_TIMEOUT,
                          "one more complete Linux-host fio verify run")
        finally:
            stop.set()
            worker.join(FIO_TIMEOUT + 30)
        assert not errors, errors
        assert Path(f"/sys/class/nvme/{ctrl}/state").read_text().strip() == "live"
        report(f"bad input (TermReqs {terms}): {len(runs)} concurrent Linux fio verify runs "
               "clean")
    vt.wait_until(lambda: not [c for c in target.controllers()
                               if c["hostnqn"] == python_hostnqn],
                  SETTLE_TIMEOUT, "the Python host's controllers to go away")


def test_host_write_survives_random_sizes_through_dd(target: vt.VmTarget) -> None:
    """Odd sizes through the page cache-less path: dd with O_DIRECT, read back."""
    with linux_ctrl(SUBNQN, nr_io_queues=1):
        dev = guest.namespace_block_device(SUBNQN, 1)
        rng = random.Random(5)
        for n in (512, 4096, 4608, 65536, 131072 + 512, 1 << 20):
            data = rng.randbytes(n)
            src = Path("/dev/shm/lht-dd.bin")
            src.write_bytes(data)
            guest.sh("dd", f"if={src}", f"of={dev}", f"bs={n}", "count=1", "oflag=direct",
                     "seek=80", "iflag=fullblock")
            back = guest.sh("sh", "-c", f"dd if={dev} bs={n} count=1 skip=80 iflag=direct "
                            "status=none | sha256sum").stdout.split()[0]
            assert back == hashlib.sha256(data).hexdigest(), n
        src.unlink()
