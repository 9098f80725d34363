"""What the VM's kernel does with PCI P2PDMA memory, asked the way a user would (as root).

`kernel_p2pdma()` reads the running kernel's config; `kernel_nvme_disks()` maps each PCI
NVMe controller bound to the kernel's nvme driver to its block device; `o_direct_verdict()`
maps a few pages of a provider's `p2pmem/allocate` and does an O_DIRECT write and read
between them and a block device, which the block layer issues as P2P-flagged requests:
success, or the errno and the kernel log lines the refusal printed.  `KernelLog` reads
the lines /dev/kmsg got since it was opened; `FunctionCalls` counts calls of kernel
functions with ftrace's function tracer.
"""

from __future__ import annotations

import errno
import mmap
import os
import platform
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nvmet_p2p.backends.bdev import pci_function_of, sysfs_block_dir
from nvmet_p2p.testbed.guest import pci_driver

SYS = Path("/sys")
VERDICT_BYTES = 64 << 10  # a few pages: Python in the TCG guest is slow
NVME_DRIVER = "nvme"


def kernel_config(release: str | None = None) -> dict[str, str]:
    """CONFIG_* of the running kernel, from /boot/config-R or /lib/modules/R/config."""
    release = release or platform.release()
    for path in (Path(f"/boot/config-{release}"), Path(f"/lib/modules/{release}/config")):
        if path.exists():
            out = {}
            for line in path.read_text().splitlines():
                if line.startswith("CONFIG_") and "=" in line:
                    k, v = line.split("=", 1)
                    out[k] = v
            return out
    return {}


def kernel_p2pdma() -> bool:
    return kernel_config().get("CONFIG_PCI_P2PDMA") == "y"


def kernel_nvme_disks(sysfs: Path = SYS) -> dict[str, str]:
    """{controller BDF: /dev/nvmeXnY} for namespaces of the kernel's PCI NVMe driver."""
    out: dict[str, str] = {}
    for disk in sorted((sysfs / "block").glob("nvme*n*")):
        name = disk.name
        if "c" in name.split("n", 1)[1] or (disk / "partition").exists():
            continue  # a hidden multipath path (nvme0c0n1), or a partition
        dev = f"/dev/{name}"
        if not os.path.exists(dev):
            continue
        bdf = pci_function_of(sysfs_block_dir(os.stat(dev).st_rdev, str(sysfs)))
        if bdf is not None and pci_driver(bdf, sysfs) == NVME_DRIVER:
            out.setdefault(bdf, dev)
    return out


class KernelLog:
    """The kernel log lines written after construction (/dev/kmsg, non-blocking)."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)

    def lines(self) -> list[str]:
        out = []
        while True:
            try:
                rec = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # overwritten records: go on with the next
                    continue
                raise
            if not rec:
                break
            out.append(rec.decode(errors="replace").split(";", 1)[-1].rstrip("\n"))
        return out

    def close(self) -> None:
        os.close(self.fd)


TRACEFS = Path("/sys/kernel/tracing")


class FunctionCalls:
    """How often the kernel ran `functions` between start() and stop() (ftrace, function
    tracer filtered to them); a function the kernel cannot trace raises OSError at start."""

    def __init__(self, *functions: str) -> None:
        self.functions = functions
        self.counts: Counter[str] = Counter()

    def _write(self, name: str, value: str) -> None:
        with open(TRACEFS / name, "w") as f:
            f.write(value)

    def start(self) -> None:
        if not (TRACEFS / "tracing_on").exists():
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True,
                           capture_output=True, timeout=30)
        self._write("set_ftrace_filter", " ".join(self.functions))
        self._write("trace", "")
        self._write("current_tracer", "function")
        self._write("tracing_on", "1")

    def stop(self) -> Counter[str]:
        self._write("tracing_on", "0")
        text = (TRACEFS / "trace").read_text()
        self._write("current_tracer", "nop")
        self._write("set_ftrace_filter", "")
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            for fn in self.functions:  # "... : nvmet_req_alloc_sgls <-nvmet_rdma_..."
                if f": {fn} <-" in line:
                    self.counts[fn] += 1
        return self.counts


@dataclass
class Verdict:
    """What the kernel did with O_DIRECT between a provider's p2pmem and a disk."""

    provider: str
    disk: str
    client: str
    errno: int | None  # None: the write and the read both succeeded
    data_ok: bool
    log: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.errno is None and self.data_ok


def o_direct_verdict(provider: str, disk: str, client: str, offset: int,
                     sysfs: Path = SYS) -> Verdict:
    """O_DIRECT pwritev from `provider`'s p2pmem pages to `disk` at `offset`, preadv back
    into other p2pmem pages, and compare (the data on the disk at `offset` is overwritten)."""
    klog = KernelLog()
    alloc = sysfs / "bus/pci/devices" / provider / "p2pmem/allocate"
    afd = os.open(alloc, os.O_RDWR)
    try:
        mm = mmap.mmap(afd, 2 * VERDICT_BYTES, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(afd)
    code: int | None = None
    data_ok = False
    try:
        view = memoryview(mm)
        src, dst = view[:VERDICT_BYTES], view[VERDICT_BYTES:]
        pattern = bytes((i * 7 + len(disk)) & 0xFF for i in range(256)) * (VERDICT_BYTES // 256)
        src[:] = pattern
        dst[:] = bytes(VERDICT_BYTES)
        fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
        try:
            os.pwritev(fd, [src], offset)
            os.preadv(fd, [dst], offset)
            data_ok = bytes(dst) == pattern
        except OSError as e:
            code = e.errno
        finally:
            os.close(fd)
        src.release()
        dst.release()
        view.release()
    finally:
        mm.close()
        log = klog.lines()
        klog.close()
    return Verdict(provider, disk, client, code, data_ok, log)
