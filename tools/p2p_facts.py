"""Measure what the VM's kernel does with PCI P2PDMA memory; run INSIDE the VM as root.

    flock /work/vm.lock .venv/bin/python -m nvmet_p2p.vm run --cmb --iommu --switch -- \
        python tools/p2p_facts.py all

(`nvmet_p2p.testbed.vm` once the harness has moved there.)

Sections (each can be run alone): topology, p2pmem, pairs, fs, rdma, nvmet, vfio, unbind.
vfio and unbind rebind the root-bus CMB NVMe (to vfio-pci, and with a p2pmem mapping held),
so `all` runs them last.  Every result
is one line: what was tried, then `ok` or the errno the kernel returned, then any new
kernel log lines.  docs/p2p-kernel-facts.md records what these printed.

Self-contained on purpose (standard library + pyverbs): the facts are about the kernel, and
this must keep working while the package layout moves.  Struct layouts and ioctl numbers
are from the 7.3 uapi headers (linux-libc-dev 7.3.4): <linux/udmabuf.h>,
<linux/dma-heap.h>, <linux/vfio.h>.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

SYS_PCI = Path("/sys/bus/pci/devices")
PAGE = mmap.PAGESIZE
SIZE = 64 << 10  # per-I/O buffer; Python in the TCG guest is slow, keep it small
TRADDR = "192.0.2.1"

# <linux/udmabuf.h>: struct udmabuf_create { __u32 memfd; __u32 flags; __u64 offset;
# __u64 size; };  UDMABUF_CREATE = _IOW('u', 0x42, struct udmabuf_create)
UDMABUF_CREATE = (1 << 30) | (24 << 16) | (ord("u") << 8) | 0x42  # 0x40187542
UDMABUF_FLAGS_CLOEXEC = 0x01
# <linux/dma-heap.h>: struct dma_heap_allocation_data { __u64 len; __u32 fd;
# __u32 fd_flags; __u64 heap_flags; };  DMA_HEAP_IOCTL_ALLOC = _IOWR('H', 0x0, ...)
DMA_HEAP_IOCTL_ALLOC = (3 << 30) | (24 << 16) | (ord("H") << 8) | 0x0  # 0xc0184800
# <linux/vfio.h>
_VFIO = ord(";") << 8 | 100
VFIO_GET_API_VERSION = _VFIO + 0
VFIO_CHECK_EXTENSION = _VFIO + 1
VFIO_SET_IOMMU = _VFIO + 2
VFIO_GROUP_GET_STATUS = _VFIO + 3
VFIO_GROUP_SET_CONTAINER = _VFIO + 4
VFIO_GROUP_GET_DEVICE_FD = _VFIO + 6
VFIO_DEVICE_GET_REGION_INFO = _VFIO + 8
VFIO_DEVICE_FEATURE = _VFIO + 17  # 0x3b75
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_PROBE = 1 << 18
VFIO_DEVICE_FEATURE_DMA_BUF = 11
VFIO_TYPE1v2_IOMMU = 3
VFIO_PCI_BAR2_REGION_INDEX = 2
VFIO_PCI_CONFIG_REGION_INDEX = 7
# struct vfio_device_feature { __u32 argsz; __u32 flags; __u8 data[]; } followed by
# struct vfio_device_feature_dma_buf { __u32 region_index; __u32 open_flags; __u32 flags;
# __u32 nr_ranges; struct vfio_region_dma_range { __u64 offset; __u64 length; } [] }
_FEATURE_DMA_BUF = struct.Struct("=II" "IIII" "QQ")


def out(*parts: object) -> None:
    print(*parts, flush=True)


def err_text(e: BaseException) -> str:
    code = getattr(e, "errno", None)
    if code is None:
        code = getattr(e, "error_code", None)  # pyverbs' PyverbsRDMAError
    if isinstance(code, int) and code > 0:
        return f"{errno.errorcode.get(code, '?')} ({code}: {os.strerror(code)})"
    return f"{type(e).__name__}: {e}"


def sh(*cmd: str, check: bool = False, timeout: float = 120) -> str:
    cp = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit {cp.returncode}: {cp.stderr.strip()}")
    return (cp.stdout + cp.stderr).strip()


def read(p: Path | str) -> str:
    try:
        return Path(p).read_text().strip()
    except OSError as e:
        return f"<{err_text(e)}>"


class Kmsg:
    """New kernel log lines since the last call."""

    def __init__(self) -> None:
        self.seen = len(self._lines())

    @staticmethod
    def _lines() -> list[str]:
        return sh("dmesg").splitlines()

    def new(self) -> list[str]:
        lines = self._lines()
        fresh, self.seen = lines[self.seen:], len(lines)
        return fresh

    def show(self, indent: str = "    ") -> None:
        for line in self.new():
            out(f"{indent}dmesg: {line}")


KMSG: Kmsg | None = None


def kmsg() -> Kmsg:
    global KMSG
    if KMSG is None:
        KMSG = Kmsg()
    return KMSG


def addr_of(buf: mmap.mmap) -> int:
    c = ctypes.c_char.from_buffer(buf)
    a = ctypes.addressof(c)
    del c
    return a


# -- inventory ------------------------------------------------------------------------------

def providers() -> list[str]:
    return sorted(d.parent.name for d in SYS_PCI.glob("*/p2pmem"))


def nvme_inventory() -> list[dict[str, str]]:
    """Every PCIe NVMe controller: BDF, serial, ctrl name, namespace block device."""
    found = []
    for c in sorted(Path("/sys/class/nvme").glob("nvme*")):
        if read(c / "transport") != "pcie":
            continue
        bdf = os.path.basename(os.path.realpath(c / "device"))
        serial = read(c / "serial")
        disks = []
        for b in sorted(Path("/sys/block").glob("nvme*n*")):
            if re.fullmatch(r"nvme\d+n\d+", b.name) and read(b / "device/serial") == serial:
                disks.append("/dev/" + b.name)
        found.append({"bdf": bdf, "serial": serial, "ctrl": c.name,
                      "disk": disks[0] if disks else "",
                      "cmb": read(c / "cmb") if (c / "cmb").exists() else "-"})
    return found


def section(name: str) -> None:
    out(f"\n=== {name} (kernel {os.uname().release}) ===")


def topology() -> None:
    section("topology")
    out("$ lspci -D -nn")
    out(sh("lspci", "-D", "-nn"))
    out("$ lspci -tv")
    out(sh("lspci", "-tv"))
    for n in nvme_inventory():
        out(f"nvme {n['bdf']} serial={n['serial']} ctrl={n['ctrl']} disk={n['disk']} "
            f"cmb={n['cmb']!r}")
    out("$ lspci -vvv (ACS lines, per bridge)")
    cur = ""
    for line in sh("lspci", "-D", "-vvv").splitlines():
        if line and not line[0].isspace():
            cur = line
        elif "ACS" in line or "Access Control" in line:
            out(f"  {cur.split(' ', 1)[0]} {line.strip()}")
    for bdf in providers():
        out(f"p2pmem provider {bdf}: iommu_group="
            f"{os.path.basename(os.path.realpath(SYS_PCI / bdf / 'iommu_group'))}")
    out("$ cat /sys/kernel/iommu_groups/*/devices")
    for g in sorted(Path("/sys/kernel/iommu_groups").glob("*"), key=lambda p: int(p.name)):
        out(f"  group {g.name}: {' '.join(sorted(d.name for d in (g / 'devices').iterdir()))}")
    out(f"cmdline: {read('/proc/cmdline').split(' init=')[0][-80:]}")
    for prm in ("use_cmb_sqes", "sgl_threshold", "max_host_mem_size_mb"):
        out(f"nvme.{prm} = {read(Path('/sys/module/nvme/parameters') / prm)}")
    kmsg().new()
    out("dmesg lines with p2p/cmb/ACS at boot:")
    for line in sh("dmesg").splitlines():
        if re.search(r"p2p|peer-to-peer|cmb|CMB|ACS|acs", line):
            out(f"  {line}")


# -- p2pmem sysfs -------------------------------------------------------------------------

def p2p_attrs(bdf: str) -> str:
    d = SYS_PCI / bdf / "p2pmem"
    return " ".join(f"{a}={read(d / a)}" for a in ("size", "available", "published"))


def p2p_map(bdf: str, length: int, offset: int = 0,
            flags: int = mmap.MAP_SHARED) -> tuple[int, mmap.mmap]:
    fd = os.open(SYS_PCI / bdf / "p2pmem/allocate", os.O_RDWR)
    try:
        return fd, mmap.mmap(fd, length, flags, mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=offset)
    except BaseException:
        os.close(fd)
        raise


def touch_in_child(fn) -> str:
    """Run fn() in a child; 'ok', 'exit N' or the signal that killed it (SIGBUS...)."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
            os._exit(0)
        except BaseException as e:  # noqa: BLE001
            print(f"    child: {err_text(e)}", flush=True)
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return "ok" if os.WEXITSTATUS(status) == 0 else f"exit {os.WEXITSTATUS(status)}"


def p2pmem() -> None:
    section("p2pmem sysfs")
    k = kmsg()
    k.new()
    for bdf in providers():
        d = SYS_PCI / bdf / "p2pmem"
        out(f"{d}: files {sorted(p.name for p in d.iterdir())}")
        out(f"  {p2p_attrs(bdf)}")
        out(f"  stat allocate: mode {oct(os.stat(d / 'allocate').st_mode)} "
            f"size {os.stat(d / 'allocate').st_size}")
    bdf = providers()[0]
    n = 1 << 20
    out(f"\n-- on {bdf}, N = {n}")
    base = int(read(SYS_PCI / bdf / "p2pmem/available"))
    fd, m1 = p2p_map(bdf, n)
    out(f"mmap #1 of {n}: ok; available {base} -> {read(SYS_PCI / bdf / 'p2pmem/available')}")
    m1[:8] = b"ABCDEFGH"
    out(f"  write+read back via the mapping: {bytes(m1[:8])!r}")
    fd2, m2 = p2p_map(bdf, n)
    out(f"mmap #2 of {n} (second fd): ok; available -> "
        f"{read(SYS_PCI / bdf / 'p2pmem/available')}")
    m3 = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    out(f"mmap #3 of {n} on the same fd as #1: ok; available -> "
        f"{read(SYS_PCI / bdf / 'p2pmem/available')}; #3 sees #1's bytes: "
        f"{bytes(m3[:8]) == b'ABCDEFGH'}")
    a1, a3 = addr_of(m1), addr_of(m3)
    out(f"  #1 at {a1:#x}, #3 at {a3:#x}")
    for name, m in (("#3", m3), ("#2", m2), ("#1", m1)):
        m.close()
        out(f"munmap {name}: available -> {read(SYS_PCI / bdf / 'p2pmem/available')}")
    os.close(fd)
    os.close(fd2)
    out(f"after closing both fds: available {read(SYS_PCI / bdf / 'p2pmem/available')}")
    k.show()

    avail = int(read(SYS_PCI / bdf / "p2pmem/available"))
    for length in (avail, avail + PAGE, 64 << 20, 128 << 20):
        try:
            fd, m = p2p_map(bdf, length)
        except OSError as e:
            out(f"mmap of {length} (available {avail}): {err_text(e)}")
            k.show()
            continue
        out(f"mmap of {length} (available {avail}): ok; available -> "
            f"{read(SYS_PCI / bdf / 'p2pmem/available')}")

        def touch(m: mmap.mmap = m, length: int = length) -> None:
            for off in range(0, length, 1 << 20):
                m[off] = 1
            m[length - 1] = 1
        out(f"  touching every MiB + the last byte in a child: {touch_in_child(touch)}")
        m.close()
        os.close(fd)
        k.show()

    for what, length, off, flags in (
            ("MAP_SHARED at offset 4096", 1 << 20, PAGE, mmap.MAP_SHARED),
            ("MAP_SHARED at offset 1 MiB", 1 << 20, 1 << 20, mmap.MAP_SHARED),
            ("MAP_PRIVATE at offset 0", 1 << 20, 0, mmap.MAP_PRIVATE),
            ("MAP_SHARED of 4096 (one page)", PAGE, 0, mmap.MAP_SHARED),
            ("MAP_SHARED of 5000 (not a page multiple)", 5000, 0, mmap.MAP_SHARED)):
        try:
            fd, m = p2p_map(bdf, length, off, flags)
        except OSError as e:
            out(f"mmap {what}: {err_text(e)}")
        else:
            out(f"mmap {what}: ok; available -> {read(SYS_PCI / bdf / 'p2pmem/available')}")
            m.close()
            os.close(fd)
        k.show()
    # read()/write() on the file itself
    fd = os.open(SYS_PCI / bdf / "p2pmem/allocate", os.O_RDWR)
    for what, fn in (("read(4096)", lambda: os.read(fd, PAGE)),
                     ("write(4096)", lambda: os.write(fd, b"x" * PAGE))):
        try:
            r = fn()
            out(f"{what} on allocate: ok ({r if isinstance(r, int) else len(r)})")
        except OSError as e:
            out(f"{what} on allocate: {err_text(e)}")
    os.close(fd)
    # fork: does a child inherit the mapping (it is VM_DONTCOPY?)
    fd, m = p2p_map(bdf, 1 << 20)
    m[:4] = b"PQRS"
    out(f"fork with a live mapping, child reads it: "
        f"{touch_in_child(lambda: None if bytes(m[:4]) == b'PQRS' else os._exit(4))}")
    m.close()
    os.close(fd)
    out(f"final: {p2p_attrs(bdf)}")
    k.show()


# -- O_DIRECT between p2pmem pages and block devices / files ---------------------------------

def dio(target: str, bdf: str, offset: int, open_flags: int = 0) -> str:
    """pwritev from a p2pmem buffer, preadv into another, verify; one result line."""
    k = kmsg()
    fd_a, src = p2p_map(bdf, SIZE)
    fd_b, dst = p2p_map(bdf, SIZE)
    pattern = os.urandom(SIZE)
    src[:] = pattern
    dst[:] = b"\0" * SIZE
    res = []
    try:
        fd = os.open(target, os.O_RDWR | os.O_DIRECT | open_flags)
    except OSError as e:
        res.append(f"open(O_DIRECT): {err_text(e)}")
        fd = -1
    if fd >= 0:
        try:
            n = os.pwritev(fd, [src], offset)
            res.append(f"pwritev {n}")
        except OSError as e:
            res.append(f"pwritev: {err_text(e)}")
        try:
            n = os.preadv(fd, [dst], offset)
            res.append(f"preadv {n}")
            res.append("verify ok" if bytes(dst) == pattern else "verify MISMATCH")
        except OSError as e:
            res.append(f"preadv: {err_text(e)}")
        os.close(fd)
    # the same from system memory, so a refusal is known to be about P2P
    anon = mmap.mmap(-1, SIZE)
    anon[:] = pattern
    try:
        fd = os.open(target, os.O_RDWR | os.O_DIRECT | open_flags)
        os.pwritev(fd, [anon], offset)
        os.close(fd)
        res.append("(system memory: ok)")
    except OSError as e:
        res.append(f"(system memory: {err_text(e)})")
    anon.close()
    for m in (src, dst):
        m.close()
    os.close(fd_a)
    os.close(fd_b)
    line = f"  {bdf} -> {target}: " + "; ".join(res)
    new = k.new()
    return line + "".join(f"\n    dmesg: {x}" for x in new)


def pairs() -> None:
    section("O_DIRECT p2pmem <-> NVMe namespaces")
    inv = nvme_inventory()
    for bdf in providers():
        for i, n in enumerate(inv):
            if n["disk"]:
                out(dio(n["disk"], bdf, offset=(1 << 20) * (1 + i)) +
                    f"   [{n['serial']}]")


def fs() -> None:
    section("O_DIRECT p2pmem -> loop devices and files")
    k = kmsg()
    sh("modprobe", "loop")
    img = Path("/dev/shm/loop.img")
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    loop = sh("losetup", "-f", "--show", str(img), check=True)
    loop_dio = sh("losetup", "-f", "--show", "--direct-io=on", str(img))
    out(f"loop on tmpfs: {loop}; with --direct-io=on: {loop_dio!r} "
        f"(dio flag: {read(Path('/sys/block') / Path(loop_dio).name / 'loop/dio')})")
    k.new()
    tmpfs_file = Path("/dev/shm/plain")
    with open(tmpfs_file, "wb") as f:
        f.truncate(8 << 20)
    targets = [loop]
    if loop_dio.startswith("/dev/loop"):
        targets.append(loop_dio)
    targets.append(str(tmpfs_file))
    # ext4 on a loop device on tmpfs
    img2 = Path("/dev/shm/ext4.img")
    with open(img2, "wb") as f:
        f.truncate(64 << 20)
    loop2 = sh("losetup", "-f", "--show", str(img2), check=True)
    sh("mkfs.ext4", "-q", "-F", loop2, check=True)
    os.makedirs("/run/ext4-loop", exist_ok=True)
    sh("mount", loop2, "/run/ext4-loop", check=True)
    f = Path("/run/ext4-loop/file")
    with open(f, "wb") as fh:
        fh.write(b"\0" * (4 << 20))
    targets.append(str(f))
    # ext4 on the NVMe behind the switch without a CMB (the raw pairs already ran)
    sw1 = [n for n in nvme_inventory() if n["serial"] == "nvmetp2p-sw1" and n["disk"]]
    if sw1:
        sh("mkfs.ext4", "-q", "-F", sw1[0]["disk"], check=True)
        os.makedirs("/run/ext4-sw1", exist_ok=True)
        sh("mount", sw1[0]["disk"], "/run/ext4-sw1", check=True)
        f2 = Path("/run/ext4-sw1/file")
        with open(f2, "wb") as fh:
            fh.write(b"\0" * (4 << 20))
        targets.append(str(f2))
    k.new()
    for bdf in providers():
        for t in targets:
            out(dio(t, bdf, offset=1 << 20))
    sh("umount", "/run/ext4-loop")
    if sw1:
        sh("umount", "/run/ext4-sw1")
    sh("losetup", "-D")


# -- RDMA registration --------------------------------------------------------------------

def setup_rxe() -> str:
    for mod in ("dummy", "rdma_rxe", "rdma_ucm", "ib_uverbs"):
        sh("modprobe", mod)
    if not Path("/sys/class/net/dummy0").exists():
        sh("ip", "link", "add", "dummy0", "type", "dummy", check=True)
        sh("ip", "addr", "add", f"{TRADDR}/24", "dev", "dummy0", check=True)
    sh("ip", "link", "set", "dummy0", "up", check=True)
    if not Path("/sys/class/infiniband/rxe0").exists():
        sh("rdma", "link", "add", "rxe0", "type", "rxe", "netdev", "dummy0", check=True)
    deadline = time.monotonic() + 30
    while "ACTIVE" not in read("/sys/class/infiniband/rxe0/ports/1/state"):
        if time.monotonic() > deadline:
            raise RuntimeError("rxe0 not ACTIVE")
        time.sleep(0.2)
    return "rxe0"


def udmabuf(size: int) -> int:
    memfd = os.memfd_create("p2p-facts", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(memfd, size)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        dev = os.open("/dev/udmabuf", os.O_RDWR)
        try:
            arg = bytearray(struct.pack("=IIQQ", memfd, UDMABUF_FLAGS_CLOEXEC, 0, size))
            return fcntl.ioctl(dev, UDMABUF_CREATE, arg, True)  # the ioctl returns the fd
        finally:
            os.close(dev)
    finally:
        os.close(memfd)


def dma_heap(size: int, heap: str = "system") -> int:
    dev = os.open(f"/dev/dma_heap/{heap}", os.O_RDWR)
    try:
        arg = bytearray(struct.pack("=QIIQ", size, 0, os.O_RDWR | os.O_CLOEXEC, 0))
        fcntl.ioctl(dev, DMA_HEAP_IOCTL_ALLOC, arg, True)
        return struct.unpack("=QIIQ", arg)[1]
    finally:
        os.close(dev)


def try_mr(what: str, fn) -> object | None:
    k = kmsg()
    try:
        mr = fn()
        out(f"  {what}: ok (lkey {mr.lkey:#x})")
        k.show()
        return mr
    except Exception as e:  # noqa: BLE001 - pyverbs has its own error types
        out(f"  {what}: {err_text(e)}")
        k.show()
        return None


def rdma() -> None:
    section("RDMA registration on rxe0")
    import pyverbs.enums as e
    from pyverbs.device import Context
    from pyverbs.mr import MR, DmaBufMR
    from pyverbs.pd import PD

    setup_rxe()
    access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ | e.IBV_ACCESS_REMOTE_WRITE
    ctx = Context(name="rxe0")
    pd = PD(ctx)
    out(f"/dev/udmabuf {Path('/dev/udmabuf').exists()} "
        f"/dev/dma_heap: {sorted(p.name for p in Path('/dev/dma_heap').glob('*'))}")
    anon = mmap.mmap(-1, SIZE)
    for mr in [try_mr("ibv_reg_mr on anonymous memory",
                      lambda: MR(pd, SIZE, access, address=addr_of(anon)))]:
        if mr is not None:
            mr.close()
    for bdf in providers():
        fd, m = p2p_map(bdf, SIZE)
        m[:1] = b"x"  # pages are inserted at mmap time; touch anyway
        for acc, name in ((access, "remote access"), (e.IBV_ACCESS_LOCAL_WRITE, "local write"),
                          (0, "access 0")):
            mr = try_mr(f"ibv_reg_mr on p2pmem {bdf} ({name})",
                        lambda acc=acc, m=m: MR(pd, SIZE, acc, address=addr_of(m)))
            if mr is not None:
                mr.close()
        m.close()
        os.close(fd)
    for maker in (udmabuf, dma_heap):
        try:
            fd = maker(SIZE)
        except OSError as err:
            out(f"  {maker.__name__}({SIZE}): {err_text(err)}")
            continue
        out(f"  {maker.__name__}({SIZE}): dma-buf fd {fd} ({os.readlink(f'/proc/self/fd/{fd}')})")
        for off in (0, PAGE):
            mr = try_mr(f"ibv_reg_dmabuf_mr on {maker.__name__} offset {off}",
                        lambda off=off, fd=fd: DmaBufMR(pd, SIZE - off, access, dmabuf=fd,
                                                        offset=off))
            if mr is not None:
                mr.close()
        try:
            cm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            out(f"  mmap of the {maker.__name__} fd: ok")
            mr = try_mr(f"ibv_reg_mr on the {maker.__name__} mmap",
                        lambda cm=cm: MR(pd, SIZE, access, address=addr_of(cm)))
            if mr is not None:
                mr.close()
            cm.close()
        except OSError as err:
            out(f"  mmap of the {maker.__name__} fd: {err_text(err)}")
        os.close(fd)
    pd.close()
    ctx.close()


# -- kernel nvmet with p2pmem -------------------------------------------------------------

CFS = Path("/sys/kernel/config/nvmet")


def cfs_write(path: Path, value: str) -> str:
    try:
        with open(path, "w") as f:
            f.write(value)
        return "ok"
    except OSError as e:
        return err_text(e)


TRACING = Path("/sys/kernel/tracing")
# nvmet_req_alloc_sgls picks p2pmem (pci_p2pmem_alloc_sgl) or system memory (sgl_alloc)
# for every request with data; counting the calls shows which one the target used.
TRACED = ("nvmet_req_alloc_sgls", "pci_p2pmem_alloc_sgl", "sgl_alloc", "sgl_alloc_order",
          "pci_p2pdma_distance_many", "pci_p2pmem_find_many")


def trace_write(name: str, value: str, append: bool = False) -> None:
    fd = os.open(TRACING / name, os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC))
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def trace_start() -> bool:
    if not (TRACING / "tracing_on").exists():
        sh("mount", "-t", "tracefs", "nodev", str(TRACING))
    step = ""
    try:
        step = "tracing_on"
        trace_write("tracing_on", "0")
        step = "current_tracer nop"
        trace_write("current_tracer", "nop")
        trace_write("set_ftrace_filter", "")
        for fn in TRACED:
            try:
                trace_write("set_ftrace_filter", fn, append=True)
            except OSError:
                pass  # not traceable (inlined or notrace) in this build
        step = "trace"
        trace_write("trace", "")
        step = "current_tracer function"
        trace_write("current_tracer", "function")
        trace_write("tracing_on", "1")
        return True
    except OSError as e:
        out(f"  ftrace ({step}): {err_text(e)}; available: "
            f"{read(TRACING / 'available_tracers')}")
        return False


def trace_stop() -> str:
    trace_write("tracing_on", "0")
    counts: dict[str, int] = {}
    for line in (TRACING / "trace").read_text().splitlines():
        if line.startswith("#"):
            continue
        m = re.search(r": (\w+) <-", line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    trace_write("current_tracer", "nop")
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no calls"


def set_filter() -> set[str]:
    return set((TRACING / "set_ftrace_filter").read_text().split()) if (
        TRACING / "set_ftrace_filter").exists() else set()


def nvmet_case(label: str, device: str, p2pmem: str | None, io: bool = True) -> None:
    k = kmsg()
    nqn = "nqn.2026-12.io.nvmet-p2p:facts"
    sub = CFS / "subsystems" / nqn
    ns = sub / "namespaces/1"
    port = CFS / "ports/1"
    out(f"\n-- {label}: device_path={device} p2pmem={p2pmem}")
    sub.mkdir(exist_ok=True)
    cfs_write(sub / "attr_allow_any_host", "1")
    ns.mkdir(exist_ok=True)
    out(f"  device_path: {cfs_write(ns / 'device_path', device)}")
    if p2pmem is not None:
        out(f"  p2pmem <- {p2pmem}: {cfs_write(ns / 'p2pmem', p2pmem)}; reads back "
            f"{read(ns / 'p2pmem')!r}")
    r = cfs_write(ns / "enable", "1")
    out(f"  enable <- 1: {r}; enable reads {read(ns / 'enable')}")
    k.show()
    if read(ns / "enable") == "1":
        out(f"  p2pmem <- 0 while enabled: {cfs_write(ns / 'p2pmem', '0')}")
        k.show()
    port.mkdir(exist_ok=True)
    for a, v in (("addr_trtype", "rdma"), ("addr_adrfam", "ipv4"),
                 ("addr_traddr", TRADDR), ("addr_trsvcid", "4420")):
        cfs_write(port / a, v)
    link = port / "subsystems" / nqn
    if not link.is_symlink():
        link.symlink_to(sub)
    k.show()
    if io and read(ns / "enable") == "1":
        traced = trace_start()
        before = {c.name for c in Path("/sys/class/nvme").glob("nvme*")}
        r = sh("nvme", "connect", "-t", "rdma", "-a", TRADDR, "-s", "4420", "-n", nqn)
        out(f"  nvme connect: {r or 'ok'}")
        time.sleep(2)
        new = sorted({c.name for c in Path("/sys/class/nvme").glob("nvme*")} - before)
        k.show()
        disk = ""
        for _ in range(50):
            disks = [b for b in Path("/sys/block").glob("nvme*n*")
                     if re.fullmatch(r"nvme\d+n\d+", b.name)
                     and read(b / "device/subsysnqn") == nqn]
            if disks:
                disk = "/dev/" + disks[0].name
                break
            time.sleep(0.2)
        out(f"  host ctrl {new}, disk {disk or '?'}")
        if disk:
            src = Path("/dev/shm/nvmet-src")
            src.write_bytes(os.urandom(256 << 10))
            w = sh("dd", f"if={src}", f"of={disk}", "bs=64k", "oflag=direct", "count=4")
            r2 = sh("dd", f"if={disk}", "of=/dev/shm/nvmet-dst", "bs=64k", "iflag=direct",
                    "count=4")
            same = Path("/dev/shm/nvmet-dst").read_bytes() == src.read_bytes()
            out(f"  dd write: {w.splitlines()[-1]}")
            out(f"  dd read:  {r2.splitlines()[-1]}; data {'verified' if same else 'DIFFERS'}")
            k.show()
        if traced:
            out(f"  ftrace calls during connect + I/O: {trace_stop()}")
            out(f"  traceable: {[f for f in TRACED if f in set_filter()]}")
        out(f"  nvme disconnect: {sh('nvme', 'disconnect', '-n', nqn)}")
        time.sleep(1)
        k.show()
    link.unlink()
    port.rmdir()
    cfs_write(ns / "enable", "0")
    ns.rmdir()
    sub.rmdir()
    k.show()


def nvmet() -> None:
    section("kernel nvmet with p2pmem over rxe0")
    for mod in ("configfs", "nvmet", "nvmet-rdma", "nvme-rdma"):
        sh("modprobe", mod)
    if "configfs" not in read("/proc/mounts"):
        sh("mount", "-t", "configfs", "none", "/sys/kernel/config")
    setup_rxe()
    inv = {n["serial"]: n for n in nvme_inventory()}
    cmb, sw0, sw1 = (inv.get(s, {}) for s in ("nvmetp2p-cmb", "nvmetp2p-sw0", "nvmetp2p-sw1"))
    ns_attrs = None
    sub = CFS / "subsystems/nqn.probe"
    sub.mkdir()
    (sub / "namespaces/1").mkdir()
    ns_attrs = sorted(p.name for p in (sub / "namespaces/1").iterdir())
    (sub / "namespaces/1").rmdir()
    sub.rmdir()
    (CFS / "ports/9").mkdir()
    port_attrs = sorted(p.name for p in (CFS / "ports/9").iterdir())
    (CFS / "ports/9").rmdir()
    out(f"namespace attributes: {ns_attrs}")
    out(f"port attributes: {port_attrs}")
    cases = [("CMB NVMe, p2pmem=1 (auto)", cmb.get("disk"), "1"),
             ("CMB NVMe, p2pmem=<its own BDF>", cmb.get("disk"), cmb.get("bdf")),
             ("CMB NVMe, p2pmem=<sw0's BDF, across the host bridge>", cmb.get("disk"),
              sw0.get("bdf")),
             ("sw1 NVMe, p2pmem=1 (auto)", sw1.get("disk"), "1"),
             ("sw1 NVMe, p2pmem=<sw0's BDF, same switch>", sw1.get("disk"), sw0.get("bdf")),
             ("CMB NVMe, p2pmem=0 (baseline)", cmb.get("disk"), "0"),
             ("file on tmpfs, p2pmem=1", "/dev/shm/nvmet-file", "1")]
    with open("/dev/shm/nvmet-file", "wb") as f:
        f.truncate(64 << 20)
    for label, dev, p2p in cases:
        if dev and p2p:
            nvmet_case(label, dev, p2p)
    # what the p2pmem attribute itself accepts (namespace disabled)
    k = kmsg()
    ns = CFS / "subsystems/nqn.probe/namespaces/1"
    ns.mkdir(parents=True)
    for value in ("0000:99:00.0", "0000:00:1f.2", "yes", "off", "1", cmb.get("bdf", "")):
        out(f"  p2pmem <- {value!r}: {cfs_write(ns / 'p2pmem', value)}; reads back "
            f"{read(ns / 'p2pmem')!r}")
        k.show()
    ns.rmdir()
    ns.parent.parent.rmdir()
    sh("modprobe", "loop")
    loop = sh("losetup", "-f", "--show", "/dev/shm/nvmet-file", check=True)
    nvmet_case("loop device on tmpfs, p2pmem=1", loop, "1", io=False)
    sh("losetup", "-d", loop)


# -- VFIO dma-buf export of the CMB -------------------------------------------------------

def vfio() -> None:
    section("VFIO dma-buf export of BAR2 (CMB)")
    import pyverbs.enums as e
    from pyverbs.device import Context
    from pyverbs.mr import MR, DmaBufMR
    from pyverbs.pd import PD

    k = kmsg()
    inv = {n["serial"]: n for n in nvme_inventory()}
    bdf = inv["nvmetp2p-cmb"]["bdf"]
    dev = SYS_PCI / bdf
    sh("modprobe", "vfio-pci")
    prev = os.path.basename(os.readlink(dev / "driver"))
    cfs_write(dev / "driver_override", "vfio-pci")
    cfs_write(dev / "driver/unbind", bdf)
    cfs_write(Path("/sys/bus/pci/drivers_probe"), bdf)
    time.sleep(0.5)
    out(f"{bdf}: {prev} -> {os.path.basename(os.readlink(dev / 'driver'))}; "
        f"p2pmem dir now: {(dev / 'p2pmem').exists()}; providers {providers()}")
    k.show()
    group = os.path.basename(os.readlink(dev / "iommu_group"))
    container = os.open("/dev/vfio/vfio", os.O_RDWR)
    gfd = os.open(f"/dev/vfio/{group}", os.O_RDWR)
    # a mutable buffer with mutate_flag=True makes fcntl.ioctl return the ioctl's int result
    fcntl.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("=i", container)), True)
    fcntl.ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
    dfd = fcntl.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, bytearray(bdf.encode() + b"\0"), True)
    out(f"group {group}, device fd {dfd}")
    info = bytearray(struct.pack("=IIIIQQ", 32, 0, VFIO_PCI_BAR2_REGION_INDEX, 0, 0, 0))
    fcntl.ioctl(dfd, VFIO_DEVICE_GET_REGION_INFO, info, True)
    _, rflags, _, _, rsize, roff = struct.unpack("=IIIIQQ", info)
    out(f"BAR2 region: flags {rflags:#x} size {rsize:#x} offset {roff:#x}")
    cinfo = bytearray(struct.pack("=IIIIQQ", 32, 0, VFIO_PCI_CONFIG_REGION_INDEX, 0, 0, 0))
    fcntl.ioctl(dfd, VFIO_DEVICE_GET_REGION_INFO, cinfo, True)
    cfg_off = struct.unpack("=IIIIQQ", cinfo)[5]

    def pci_command() -> int:
        return int.from_bytes(os.pread(dfd, 2, cfg_off + 4), "little")

    def export(offset: int, length: int, region: int = VFIO_PCI_BAR2_REGION_INDEX,
               flags: int = 0) -> int:
        arg = bytearray(_FEATURE_DMA_BUF.pack(
            _FEATURE_DMA_BUF.size, VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF,
            region, os.O_RDWR | os.O_CLOEXEC, flags, 1, offset, length))
        return fcntl.ioctl(dfd, VFIO_DEVICE_FEATURE, arg, True)

    probe = bytearray(struct.pack("=II", 8, VFIO_DEVICE_FEATURE_PROBE |
                                  VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF))
    try:
        r = fcntl.ioctl(dfd, VFIO_DEVICE_FEATURE, probe, True)
        out(f"VFIO_DEVICE_FEATURE PROBE|GET|DMA_BUF: {r} (0 = supported)")
    except OSError as err:
        out(f"VFIO_DEVICE_FEATURE PROBE|GET|DMA_BUF: {err_text(err)}")
    out(f"PCI_COMMAND {pci_command():#x} (bit 1 = memory decoding)")
    setup_rxe()
    ctx = Context(name="rxe0")
    pd = PD(ctx)
    access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ | e.IBV_ACCESS_REMOTE_WRITE
    for label, mem_on in (("memory decoding as vfio-pci left it", None),
                          ("memory decoding on", True)):
        if mem_on:
            os.pwrite(dfd, (pci_command() | 0x6).to_bytes(2, "little"), cfg_off + 4)
        out(f"-- {label}: PCI_COMMAND {pci_command():#x}")
        for off, length, region in ((0, SIZE, 2), (0, rsize, 2), (PAGE, SIZE, 2),
                                    (100, SIZE, 2), (0, rsize + PAGE, 2), (0, PAGE, 0),
                                    (0, PAGE, 6)):
            try:
                fd = export(off, length, region)
            except OSError as err:
                out(f"  export region {region} [{off:#x}, +{length:#x}): {err_text(err)}")
                k.show()
                continue
            out(f"  export region {region} [{off:#x}, +{length:#x}): dma-buf fd {fd} "
                f"({os.readlink(f'/proc/self/fd/{fd}')})")
            if region == 2 and length == SIZE:
                try:
                    m = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                    out("    mmap of the dma-buf fd: ok")
                    mr = try_mr("  ibv_reg_mr on that mmap",
                                lambda m=m: MR(pd, SIZE, access, address=addr_of(m)))
                    if mr is not None:
                        mr.close()
                    m.close()
                except OSError as err:
                    out(f"    mmap of the dma-buf fd: {err_text(err)}")
                for acc, name in ((access, "remote access"), (e.IBV_ACCESS_LOCAL_WRITE,
                                                              "local write")):
                    mr = try_mr(f"  ibv_reg_dmabuf_mr ({name}) on rxe0",
                                lambda acc=acc, fd=fd: DmaBufMR(pd, SIZE, acc, dmabuf=fd,
                                                                offset=0))
                    if mr is not None:
                        mr.close()
            os.close(fd)
            k.show()
    # BAR2 through the device fd and ibv_reg_mr (what the project does today)
    try:
        bar = mmap.mmap(dfd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                        offset=roff)
        mr = try_mr("ibv_reg_mr on the VFIO BAR2 mmap", lambda: MR(pd, SIZE, access,
                                                                   address=addr_of(bar)))
        if mr is not None:
            mr.close()
        bar.close()
    except OSError as err:
        out(f"mmap of BAR2 via the device fd: {err_text(err)}")
    pd.close()
    ctx.close()
    os.close(dfd)
    os.close(gfd)
    os.close(container)
    cfs_write(dev / "driver/unbind", bdf)
    cfs_write(dev / "driver_override", "\n")
    cfs_write(Path("/sys/bus/pci/drivers_probe"), bdf)
    time.sleep(1)
    out(f"{bdf} back on {os.path.basename(os.readlink(dev / 'driver'))}; providers "
        f"{providers()}; {p2p_attrs(bdf) if (dev / 'p2pmem').exists() else 'no p2pmem'}")
    k.show()


def unbind() -> None:
    """Caching mode of a p2pmem mapping, and driver unbind while a mapping is held."""
    section("p2pmem mapping attributes and driver unbind")
    k = kmsg()
    bdf = next(n["bdf"] for n in nvme_inventory() if n["serial"] == "nvmetp2p-cmb")
    fd, m = p2p_map(bdf, 1 << 20)
    m[:1] = b"x"
    a = addr_of(m)
    smaps = read("/proc/self/smaps").splitlines()
    for i, line in enumerate(smaps):
        if line.startswith(f"{a:x}-"):
            out(f"smaps: {line}")
            out(f"  {next(x for x in smaps[i:i + 30] if x.startswith('VmFlags'))}")
    if not Path("/sys/kernel/debug/x86").exists():
        sh("mount", "-t", "debugfs", "none", "/sys/kernel/debug")
    bar = int(read(SYS_PCI / bdf / "resource").split()[6], 16)  # BAR2 start
    pat = [x for x in read("/sys/kernel/debug/x86/pat_memtype_list").splitlines()
           if x.startswith("PAT: [mem 0x") and bar <= int(x[12:28], 16) < bar + (64 << 20)]
    out(f"PAT entries inside BAR2 {bar:#x}: {pat[:6]}")
    out(f"unbinding {bdf} from nvme while this process maps 1 MiB of its p2pmem ...")
    pid = os.fork()
    if pid == 0:
        t = time.monotonic()
        try:
            Path(SYS_PCI / bdf / "driver/unbind").write_text(bdf)
            print(f"  child: unbind returned after {time.monotonic() - t:.1f} s", flush=True)
        except OSError as e:
            print(f"  child: unbind: {err_text(e)}", flush=True)
        os._exit(0)
    done = False
    for _ in range(100):
        if os.waitpid(pid, os.WNOHANG)[0]:
            done = True
            break
        time.sleep(0.1)
    state = read(f"/proc/{pid}/stat").split()[2] if not done else "exited"
    out(f"  after 10 s: unbind {'finished' if done else 'still blocked, child state ' + state};"
        f" p2pmem dir exists: {(SYS_PCI / bdf / 'p2pmem').exists()}")
    out(f"  reading the mapping afterwards (in a child): "
        f"{touch_in_child(lambda: bytes(m[:4]))}")
    out(f"  writing the mapping afterwards (in a child): "
        f"{touch_in_child(lambda: m.__setitem__(slice(0, 4), b'abcd'))}")
    m.close()
    os.close(fd)
    if not done:
        t = time.monotonic()
        os.waitpid(pid, 0)
        out(f"  after munmap: unbind finished {time.monotonic() - t:.1f} s later")
    k.show()
    cfs_write(Path("/sys/bus/pci/drivers/nvme/bind"), bdf)
    time.sleep(1)
    out(f"  rebound: driver {os.path.basename(os.readlink(SYS_PCI / bdf / 'driver'))}; "
        f"{p2p_attrs(bdf) if (SYS_PCI / bdf / 'p2pmem').exists() else 'no p2pmem'}")
    k.show()


SECTIONS = {"topology": topology, "p2pmem": p2pmem, "pairs": pairs, "fs": fs, "rdma": rdma,
            "nvmet": nvmet, "vfio": vfio, "unbind": unbind}


def main(argv: list[str]) -> int:
    names = list(SECTIONS) if argv in ([], ["all"]) else argv
    kmsg()
    rc = 0
    for name in names:
        try:
            SECTIONS[name]()
        except Exception as e:  # noqa: BLE001 - report and go on with the next section
            import traceback
            out(f"!!! section {name} failed: {err_text(e)}")
            traceback.print_exc(file=sys.stdout)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
