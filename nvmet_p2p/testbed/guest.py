"""Helpers for code running INSIDE the soft-RoCE VM (as root): rxe, nvme-cli, fio, PCI lookup.

Tests, the demo and the benchmarks use these to set up soft-RoCE, drive the Linux NVMe
host (connect, discover, disconnect, find the block device) and run fio.  Python in the
TCG guest is 20-30x slower than on the host, so this module imports only the standard
library and shells out to the tools that do the work.  Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from nvmet_p2p.errors import VMError
from nvmet_p2p.p2p.netdev import netdev_of_addr
from nvmet_p2p.wire.limits import NVME_RDMA_IP_PORT

TRADDR = "192.0.2.1"  # TEST-NET-1: only ever the VM's own dummy netdev, never routed
PREFIX_LEN = 24
NETDEV = "dummy0"
RXE_DEV = "rxe0"

VM_SKIP_REASON = "needs the soft-RoCE VM (run: python -m nvmet_p2p.testbed.vm pytest)"

QEMU_NVME_ID = ("0x1b36", "0x0010")  # Red Hat, QEMU NVM Express Controller
CMB_BAR = 2  # QEMU puts the CMB in BAR2 (64-bit prefetchable)

T = TypeVar("T")


def in_vm() -> bool:
    """True inside the harness VM (the wrapper sets NVMET_P2P_IN_VM=1)."""
    return os.environ.get("NVMET_P2P_IN_VM") == "1"


def sh(*cmd: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command, capture text output; a failure raises VMError with its stderr."""
    try:
        cp = subprocess.run(cmd, check=False, capture_output=True, text=True,
                            timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise VMError(f"{' '.join(cmd)}: no result after {timeout:.0f} s") from e
    except FileNotFoundError as e:
        raise VMError(f"{cmd[0]}: not installed") from e
    if check and cp.returncode != 0:
        raise VMError(f"{' '.join(cmd)}: exit {cp.returncode}: {cp.stderr.strip() or cp.stdout.strip()}")
    return cp


def wait_for(probe: Callable[[], T | None], timeout: float, what: str,
             interval: float = 0.1) -> T:
    """Poll `probe` until it returns something other than None/False, or raise VMError."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise VMError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def modprobe(*modules: str) -> None:
    for mod in modules:
        sh("modprobe", mod)


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


# -- soft-RoCE ----------------------------------------------------------------------------

def setup_netdev(netdev: str = NETDEV, addr: str = TRADDR) -> str:
    """A dummy netdev holding `addr`, up (what NVMe/TCP needs); idempotent."""
    modprobe("dummy")
    if not Path(f"/sys/class/net/{netdev}").exists():
        sh("ip", "link", "add", netdev, "type", "dummy")
    if netdev_of_addr(addr) != netdev:  # rtnetlink, not `ip addr` output
        sh("ip", "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", netdev)
    sh("ip", "link", "set", netdev, "up")
    return netdev


def setup_rxe(netdev: str = NETDEV, addr: str = TRADDR, rxe: str = RXE_DEV,
              timeout: float = 30.0) -> str:
    """rxe on a dummy netdev holding `addr`; idempotent. Returns the RDMA device name."""
    modprobe("rdma_rxe", "rdma_ucm", "ib_uverbs")
    setup_netdev(netdev, addr)
    if not Path(f"/sys/class/infiniband/{rxe}").exists():
        sh("rdma", "link", "add", rxe, "type", "rxe", "netdev", netdev)
    state = Path(f"/sys/class/infiniband/{rxe}/ports/1/state")
    wait_for(lambda: "ACTIVE" in _read(state), timeout, f"{rxe} port ACTIVE")
    return rxe


# -- Linux NVMe host (nvme-cli) -----------------------------------------------------------

def _fabrics_args(transport: str, traddr: str, trsvcid: int | str,
                  hostnqn: str | None) -> list[str]:
    args = ["-t", transport, "-a", traddr, "-s", str(trsvcid)]
    if hostnqn:
        args += ["-q", hostnqn]
    return args


def host_module(transport: str) -> str:
    """The Linux host driver of a transport (what `nvme connect -t` loads)."""
    return {"rdma": "nvme-rdma", "tcp": "nvme-tcp"}[transport]


def nvme_ctrls(subnqn: str | None = None, sysfs: Path = Path("/sys")) -> list[str]:
    """Controller names (nvme0, ...) of fabrics connections, optionally to one subsystem."""
    out = []
    for d in sorted((sysfs / "class/nvme").glob("nvme*")):
        if subnqn is not None and _read(d / "subsysnqn") != subnqn:
            continue
        out.append(d.name)
    return out


def nvme_connect(subnqn: str, traddr: str = TRADDR, trsvcid: int | str = NVME_RDMA_IP_PORT,
                 hostnqn: str | None = None, nr_io_queues: int | None = None,
                 queue_size: int | None = None, transport: str = "rdma",
                 ctrl_loss_tmo: int | None = None, digests: bool = False,
                 disable_sqflow: bool = False, timeout: float = 60.0) -> str:
    """`nvme connect`; returns the new controller's name (e.g. "nvme1").  `digests`:
    NVMe/TCP header and data digests; `disable_sqflow`: no SQ flow control."""
    modprobe(host_module(transport))
    before = set(nvme_ctrls(subnqn))
    args = ["nvme", "connect", "-n", subnqn, *_fabrics_args(transport, traddr, trsvcid, hostnqn)]
    if nr_io_queues is not None:
        args += ["-i", str(nr_io_queues)]
    if queue_size is not None:
        args += ["-Q", str(queue_size)]
    if ctrl_loss_tmo is not None:
        args += ["-l", str(ctrl_loss_tmo)]
    if digests:
        args += ["--hdr-digest", "--data-digest"]
    if disable_sqflow:
        args.append("--disable-sqflow")
    sh(*args, timeout=timeout)
    new = wait_for(lambda: sorted(set(nvme_ctrls(subnqn)) - before), 10.0,
                   f"a controller for {subnqn} in /sys/class/nvme")
    ctrl = new[0]
    state = Path("/sys/class/nvme") / ctrl / "state"
    wait_for(lambda: _read(state) == "live", timeout, f"{ctrl} state live")
    return ctrl


def nvme_disconnect(subnqn: str, timeout: float = 60.0) -> None:
    """Disconnect every controller of `subnqn`; returns once they are gone."""
    if not nvme_ctrls(subnqn):
        return
    sh("nvme", "disconnect", "-n", subnqn, timeout=timeout)
    wait_for(lambda: not nvme_ctrls(subnqn), timeout, f"controllers of {subnqn} to go away")


def nvme_discover(traddr: str = TRADDR, trsvcid: int | str = NVME_RDMA_IP_PORT,
                  hostnqn: str | None = None, transport: str = "rdma",
                  timeout: float = 60.0) -> list[dict[str, Any]]:
    """Discovery log entries as nvme-cli's JSON records (trtype, subnqn, traddr, trsvcid...)."""
    modprobe(host_module(transport))
    cp = sh("nvme", "discover", *_fabrics_args(transport, traddr, trsvcid, hostnqn),
            "-o", "json", timeout=timeout)
    if not cp.stdout.strip():
        return []  # nvme-cli prints nothing for an empty log
    return list(json.loads(cp.stdout).get("records", []))


def namespace_block_device(subnqn: str, nsid: int = 1, timeout: float = 30.0,
                           sysfs: Path = Path("/sys"), dev: Path = Path("/dev")) -> str:
    """/dev/nvmeXnY of namespace `nsid` of a connected subsystem (waits for it to appear)."""
    def probe() -> str | None:
        # With native multipath (Debian's default) the disk hangs off the subsystem and
        # is named after it; without, it hangs off the controller.
        parents = [d for d in (sysfs / "class/nvme-subsystem").glob("nvme-subsys*")
                   if _read(d / "subsysnqn") == subnqn]
        parents += [sysfs / "class/nvme" / c for c in nvme_ctrls(subnqn, sysfs)]
        for parent in parents:
            for disk in sorted(parent.glob("nvme*n*")):
                if not re.fullmatch(r"nvme\d+n\d+", disk.name):
                    continue  # nvmeXcYnZ: a hidden per-path disk
                if _read(disk / "nsid") == str(nsid) and (dev / disk.name).exists():
                    return str(dev / disk.name)
        return None
    return wait_for(probe, timeout, f"namespace {nsid} of {subnqn} as a block device")


# -- scratch files ------------------------------------------------------------------------

def shm_file(name: str, size: int, shm: Path = Path("/dev/shm")) -> Path:
    """A sparse file on the guest's tmpfs, for namespace backing.

    Not in /tmp: the guest's /tmp is an overlay, which reports i_blkbits 0, so the kernel
    target advertises 1-byte LBAs and the host sees a zero-sized disk.  tmpfs refuses
    O_DIRECT in 6.1, so the kernel target needs buffered_io=1 on these files.
    """
    path = shm / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# -- fio ----------------------------------------------------------------------------------

def run_fio(job: str | Sequence[str], timeout: float = 600.0) -> dict[str, Any]:
    """Run fio on a job file path or an argument list; returns its parsed JSON output.

    A job that fails (including a failed verify) raises VMError with fio's messages.
    """
    args = [job] if isinstance(job, str) else list(job)
    cp = sh("fio", "--output-format=json", *args, timeout=timeout, check=False)
    # fio may print notes before the JSON document.
    start = cp.stdout.find("{")
    try:
        result = json.loads(cp.stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        result = None
    notes = cp.stdout[:start] if start >= 0 else cp.stdout[-2000:]
    if cp.returncode != 0 or result is None:
        raise VMError(f"fio exit {cp.returncode}: {cp.stderr.strip()[-2000:]} {notes.strip()}")
    errors = [j.get("error", 0) for j in result.get("jobs", [])]
    if any(errors):
        raise VMError(f"fio job errors {errors}: {cp.stderr.strip()[-2000:]} {notes.strip()}")
    return result


def fio_iops(result: dict[str, Any], ddir: str = "read") -> float:
    """Sum of IOPS over the jobs of a run_fio() result for one data direction."""
    return sum(float(j[ddir]["iops"]) for j in result["jobs"])


def fio_bw_bytes(result: dict[str, Any], ddir: str = "read") -> float:
    """Sum of bandwidth in bytes/s over the jobs of a run_fio() result."""
    return sum(float(j[ddir]["bw_bytes"]) for j in result["jobs"])


# -- PCI ----------------------------------------------------------------------------------

def pci_bar(bdf: str, bar: int, sysfs: Path = Path("/sys")) -> tuple[int, int, int]:
    """(start, size, flags) of a BAR from sysfs `resource`; size 0 if unimplemented."""
    lines = (sysfs / "bus/pci/devices" / bdf / "resource").read_text().splitlines()
    start, end, flags = (int(x, 16) for x in lines[bar].split())
    return start, (end - start + 1) if end else 0, flags


def pci_devices(vendor: str, device: str, sysfs: Path = Path("/sys")) -> list[str]:
    """BDFs of PCI functions with this vendor and device ID ("0x1b36", "0x0010")."""
    return [d.name for d in sorted((sysfs / "bus/pci/devices").iterdir())
            if _read(d / "vendor") == vendor and _read(d / "device") == device]


def qemu_nvmes(sysfs: Path = Path("/sys")) -> list[str]:
    """Every QEMU NVMe controller (1b36:0010), in BDF order."""
    return pci_devices(*QEMU_NVME_ID, sysfs=sysfs)


def vfio_nvme_bdf(sysfs: Path = Path("/sys")) -> str:
    """The first QEMU NVMe, checked to sit in an IOMMU group (VFIO needs one)."""
    bdfs = qemu_nvmes(sysfs)
    if not bdfs:
        raise VMError("no QEMU NVMe (1b36:0010) in this VM (boot with --cmb)")
    if not (sysfs / "bus/pci/devices" / bdfs[0] / "iommu_group").exists():
        raise VMError(f"{bdfs[0]} has no IOMMU group (boot with --iommu)")
    return bdfs[0]


def cmb_nvme_bdfs(sysfs: Path = Path("/sys")) -> list[str]:
    """Every QEMU NVMe whose BAR2 (the CMB) is implemented."""
    return [bdf for bdf in qemu_nvmes(sysfs) if pci_bar(bdf, CMB_BAR, sysfs)[1] > 0]


def cmb_nvme_bdf(sysfs: Path = Path("/sys")) -> str:
    """The QEMU NVMe with a CMB on the root bus (the harness's `nvme_cmb` device)."""
    bdfs = cmb_nvme_bdfs(sysfs)
    on_root = [b for b in bdfs if b.split(":")[1] == "00"]
    if not (on_root or bdfs):
        raise VMError("no QEMU NVMe with a CMB (boot the VM with --cmb)")
    return (on_root or bdfs)[0]


def pci_driver(bdf: str, sysfs: Path = Path("/sys")) -> str | None:
    """The driver bound to PCI function `bdf` ("nvme", "vfio-pci"), or None."""
    link = sysfs / "bus/pci/devices" / bdf / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)


@contextmanager
def on_vfio(bdf: str, open_device: Callable[[str], C]) -> Iterator[C]:
    """`open_device(bdf)` (a VFIO user such as VfioNvmeBackend), checked to have bound
    vfio-pci; closed on exit, and the device must be back on the driver it had."""
    before = pci_driver(bdf)
    dev = open_device(bdf)
    try:
        assert pci_driver(bdf) == "vfio-pci", f"{bdf} is on {pci_driver(bdf)!r}"
        yield dev
    finally:
        dev.close()
        after = pci_driver(bdf)
        assert after == before, f"{bdf}: driver after close {after!r}, before {before!r}"
