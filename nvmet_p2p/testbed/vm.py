"""The soft-RoCE test VM harness: boot a throwaway VM, run a script in it, bring results back.

The VM is virtme-ng (`vng`) booting an installed Debian kernel over the host's own root
filesystem (read-only 9p), so everything installed on the host, including this checkout
and its venv, is present in the guest.  By default that is the newest installed kernel
with CONFIG_PCI_P2PDMA=y (the 7.x backports kernel tools/vm-kernel.sh puts under
/lib/modules/<release>/), else the newest /boot kernel (Debian 12's 6.1, no P2PDMA).  This module owns the QEMU device set (an NVMe
with a CMB, an intel-iommu for VFIO, a PCIe switch), the vng command line, the per-VM
scratch directory, the hard timeout, and relaying the guest's output.

The guest's stdout is not reliably relayed by `vng --exec`, so a wrapper script inside
the guest redirects the user's script into a file in a shared read-write directory and
writes the exit code next to it; the host tails that file while the VM runs.

Inside the guest: NVMET_P2P_IN_VM=1, PATH starts with <repo>/.venv/bin, the cwd is the
repo root (read-only; write scratch files to /dev/shm), and files written under
$NVMET_P2P_VM_OUT come back to the host (run(out_dir=...), `run --out DIR`).

CLI::

    python -m nvmet_p2p.testbed.vm run [--cmb] [--iommu] [--switch] [--kernel K] [--timeout S]
                                       [--out DIR] -- CMD...
    python -m nvmet_p2p.testbed.vm pytest [--allow-empty] [--kernel K] [--vm-timeout S] [PYTEST ARGS...]

`pytest` boots one VM with --cmb --iommu --switch and runs `pytest -m vm` in it.

--kernel K (or NVMET_P2P_VM_KERNEL=K) picks the kernel: a path to a vmlinuz, or a release
or release prefix (`6.1`, `7.3.4+deb13-amd64`) naming the newest installed match.  The
kernel booted is printed on stderr.  KVM is used only with NVMET_P2P_VM_KVM=1;
NVMET_P2P_VM_TIMEOUT overrides the default hard timeouts (600 s for run, 1800 s for pytest).
"""

from __future__ import annotations

import argparse
import codecs
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from nvmet_p2p.errors import VMError

# The checkout being run, not a fixed path: a clean clone anywhere boots its own code.
REPO_ROOT = Path(__file__).resolve().parents[2]

GiB = 1 << 30
MiB = 1 << 20

# Serial numbers let guest code tell the emulated NVMe devices apart without relying on
# BDFs, which move when devices are added.
CMB_NVME_SERIAL = "nvmetp2p-cmb"
SWITCH_NVME_SERIALS = ("nvmetp2p-sw0", "nvmetp2p-sw1")

# Exit code reported when the hard timeout fired (the same as coreutils timeout(1)).
TIMEOUT_EXIT = 124
# pytest's "no tests were collected".
PYTEST_NO_TESTS = 5

_OUTPUT = "output.log"
_RC = "rc"
_STARTED = "started"
_CACHED_ROOT_TAG = "nvmetp2p_root"
_OUT = "out"  # what the guest leaves here is copied to run(out_dir=...)
_POLL_S = 0.2
# The rc file is renamed into place after the output is complete on the (sync-mounted)
# host directory; a guest still powering off this long after that is simply killed.
_SHUTDOWN_GRACE_S = 3.0


@dataclass(frozen=True)
class Result:
    """What a script run in the VM produced."""

    returncode: int
    output: str
    boot_seconds: float | None = None  # host time from launch until the script started
    total_seconds: float = 0.0
    timed_out: bool = False


KERNEL_ENV = "NVMET_P2P_VM_KERNEL"
MODULES_DIR = Path("/lib/modules")
BOOT_DIR = Path("/boot")


@dataclass(frozen=True)
class Kernel:
    """A kernel image the VM can boot, with the build config next to it (if any)."""

    image: Path
    release: str
    config: Path | None = None

    @property
    def p2pdma(self) -> bool:
        return self.config is not None and _config_has(self.config, "CONFIG_PCI_P2PDMA=y")

    def describe(self) -> str:
        if self.config is None:
            what = "no config found"
        else:
            what = "PCI P2PDMA" if self.p2pdma else "no PCI P2PDMA"
        return f"{self.release} ({self.image}, {what})"


def _config_has(config: Path, line: str) -> bool:
    try:
        with open(config, encoding="utf-8", errors="replace") as f:
            return any(raw.rstrip("\n") == line for raw in f)
    except OSError:
        return False


def kernel_at(image: Path, modules_dir: Path = MODULES_DIR, boot_dir: Path = BOOT_DIR) -> Kernel:
    """Describe an image by its path: <modules>/<release>/vmlinuz or <boot>/vmlinuz-<release>."""
    if image.name == "vmlinuz":
        release = image.parent.name
    else:
        release = image.name.removeprefix("vmlinuz-")
    candidates = [image.parent / "config", image.parent / f"config-{release}",
                  modules_dir / release / "config", boot_dir / f"config-{release}"]
    config = next((c for c in candidates if c.is_file()), None)
    return Kernel(image, release, config)


def installed_kernels(modules_dir: Path = MODULES_DIR,
                      boot_dir: Path = BOOT_DIR) -> list[Kernel]:
    """Every bootable kernel, oldest first: <boot>/vmlinuz-<release> (Debian 12's layout)
    and <modules>/<release>/vmlinuz (Debian 13's, where tools/vm-kernel.sh installs)."""
    found: dict[str, Kernel] = {}
    for image in boot_dir.glob("vmlinuz-*"):
        k = kernel_at(image, modules_dir, boot_dir)
        found[k.release] = k
    for image in modules_dir.glob("*/vmlinuz"):
        k = kernel_at(image, modules_dir, boot_dir)
        found.setdefault(k.release, k)  # the same release in /boot: keep that one
    return sorted(found.values(), key=lambda k: _version_key(k.release))


def find_kernel(boot_dir: Path = BOOT_DIR) -> Path:
    """The newest /boot/vmlinuz-* (the Debian linux-image-amd64 kernel)."""
    kernels = sorted(boot_dir.glob("vmlinuz-*"), key=lambda p: _version_key(p.name))
    if not kernels:
        raise VMError(f"no kernel in {boot_dir} (install linux-image-amd64: tools/setup.sh)")
    return kernels[-1]


def select_kernel(spec: str | None = None, modules_dir: Path = MODULES_DIR,
                  boot_dir: Path = BOOT_DIR, environ: dict[str, str] | None = None,
                  log: TextIO | None = None) -> Kernel:
    """The kernel to boot.

    `spec` (else $NVMET_P2P_VM_KERNEL) is a path to an image, or a release or release
    prefix ("6.1" matches 6.1.0-57-amd64, not 6.10.x) naming the newest installed match.
    Without one: the newest installed kernel with CONFIG_PCI_P2PDMA=y, else the newest
    /boot kernel, which is said on `log` (stderr) because P2P tests then skip.
    """
    env = os.environ if environ is None else environ
    if not spec:
        spec = env.get(KERNEL_ENV) or None
    kernels = installed_kernels(modules_dir, boot_dir)
    if spec:
        if "/" in spec:
            image = Path(spec)
            if not image.is_file():
                raise VMError(f"kernel {spec}: no such file")
            return kernel_at(image, modules_dir, boot_dir)
        matches = [k for k in kernels if _release_matches(k.release, spec)]
        if not matches:
            have = ", ".join(k.release for k in kernels) or "none"
            raise VMError(f"no installed kernel matches {spec!r} (installed: {have})")
        return matches[-1]
    p2p = [k for k in kernels if k.p2pdma]
    if p2p:
        return p2p[-1]
    fallback = kernel_at(find_kernel(boot_dir), modules_dir, boot_dir)
    print(f"[vm] no installed kernel has CONFIG_PCI_P2PDMA=y (tools/vm-kernel.sh installs one);"
          f" falling back to {fallback.image}", file=log or sys.stderr)
    return fallback


def _release_matches(release: str, spec: str) -> bool:
    # A prefix must end at a component boundary: "6.1" is 6.1.0-57-amd64 but not 6.10.2.
    return release == spec or (release.startswith(spec) and release[len(spec)] in ".-+~_")


def _version_key(name: str) -> list[tuple[int, object]]:
    # Numeric-aware ordering so vmlinuz-6.10 sorts after vmlinuz-6.9.
    parts = name.replace("-", ".").split(".")
    return [(0, int(p)) if p.isdigit() else (1, p) for p in parts]


def kvm_enabled(environ: dict[str, str] | None = None) -> bool:
    """KVM only on request: nested KVM hangs after kernel decompression on our machines."""
    env = os.environ if environ is None else environ
    return env.get("NVMET_P2P_VM_KVM") == "1"


def find_vng() -> Path:
    """vng from the interpreter's own venv first, then PATH."""
    local = Path(sys.executable).parent / "vng"
    if local.exists():
        return local
    found = shutil.which("vng")
    if found is None:
        raise VMError("virtme-ng (vng) not found; run tools/setup.sh")
    return Path(found)


@dataclass
class VM:
    """One VM configuration; every run() boots a fresh VM from it."""

    # A Path is the image itself; a str is a select_kernel() spec (path, release or prefix);
    # None: select_kernel() ($NVMET_P2P_VM_KERNEL, else the newest kernel with P2PDMA).
    kernel: Path | str | None = None
    memory: str = "2G"
    cpus: int = 2
    nvme_cmb: bool = False
    nvme_size: int = GiB
    cmb_size_mb: int = 64
    iommu: bool = False
    pcie_switch: bool = False
    switch_nvme_size: int = 64 * MiB
    qemu_opts: list[str] = field(default_factory=list)
    append: list[str] = field(default_factory=list)
    kvm: bool | None = None  # None: the NVMET_P2P_VM_KVM environment variable decides
    repo: Path = REPO_ROOT
    scratch_parent: Path | None = None  # None: <repo>/.vm (gitignored)
    keep_scratch: bool = False
    verbose: bool = False  # kernel console into <scratch>/vng.log, for boot failures
    # Re-export / with 9p cache=loose and bind /usr and the repo from it: vng's root has
    # no cache, and Python startup (thousands of stats) is ~3x faster with one.
    cached_root: bool = True

    # -- command line -------------------------------------------------------------------

    def device_opts(self, scratch: Path) -> list[str]:
        """QEMU arguments for the emulated devices; disk images live in `scratch`."""
        opts: list[str] = []
        if self.cached_root:
            opts += ["-fsdev", ("local,id=nvmetp2proot,path=/,security_model=none,readonly=on,"
                     "multidevs=remap"),
                     "-device", f"virtio-9p-pci,fsdev=nvmetp2proot,mount_tag={_CACHED_ROOT_TAG}"]
        # intel-iommu first: QEMU wants the IOMMU created before the devices it translates.
        if self.iommu:
            opts += ["-device", "intel-iommu,caching-mode=on"]
        if self.nvme_cmb:
            opts += _nvme_opts("nvm0", scratch / "nvme-cmb.img", CMB_NVME_SERIAL,
                               cmb_size_mb=self.cmb_size_mb)
        if self.pcie_switch:
            # root port -> switch upstream port -> two downstream ports, an NVMe under
            # each: a real switch in sysfs for topology code, the first one with a CMB.
            opts += ["-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1",
                     "-device", "x3130-upstream,id=swup0,bus=rp0"]
            for i, serial in enumerate(SWITCH_NVME_SERIALS):
                opts += ["-device",
                         f"xio3130-downstream,id=swdn{i},bus=swup0,chassis=2,slot={i}"]
                opts += _nvme_opts(f"swnvm{i}", scratch / f"nvme-sw{i}.img", serial,
                                   cmb_size_mb=self.cmb_size_mb if i == 0 else 0,
                                   bus=f"swdn{i}")
        return opts + list(self.qemu_opts)

    def kernel_append(self) -> list[str]:
        extra = ["intel_iommu=on", "iommu=pt"] if self.iommu else []
        return extra + list(self.append)

    def images(self, scratch: Path) -> dict[Path, int]:
        """The sparse backing images device_opts() refers to, with their sizes."""
        imgs: dict[Path, int] = {}
        if self.nvme_cmb:
            imgs[scratch / "nvme-cmb.img"] = self.nvme_size
        if self.pcie_switch:
            for i in range(len(SWITCH_NVME_SERIALS)):
                imgs[scratch / f"nvme-sw{i}.img"] = self.switch_nvme_size
        return imgs

    def boot_kernel(self) -> Kernel:
        """The kernel run() boots."""
        if isinstance(self.kernel, Path):
            return kernel_at(self.kernel)
        return select_kernel(self.kernel)

    def vng_args(self, scratch: Path, exec_cmd: str, kernel: Kernel | None = None) -> list[str]:
        """The complete vng command line (without the vng binary itself)."""
        rwdir = scratch / "rw"
        args = [
            "--run", str((kernel or self.boot_kernel()).image),
            "--force-9p",  # virtiofsd fails on our machines
            "--memory", self.memory,
            "--cpus", str(self.cpus),
            "--cwd", str(self.repo),
            f"--rwdir={rwdir}",
        ]
        use_kvm = kvm_enabled() if self.kvm is None else self.kvm
        if not use_kvm:
            args.append("--disable-kvm")
        if self.verbose:
            args.append("--verbose")
        for item in self.kernel_append():
            args += ["--append", item]
        dev = self.device_opts(scratch)
        if dev:
            args.append("--qemu-opts=" + shlex.join(dev))
        args += ["--exec", exec_cmd]
        return args

    def wrapper_script(self, rwdir: Path) -> str:
        """The guest-side wrapper: environment, output capture, exit code."""
        venv_bin = self.repo / ".venv" / "bin"
        q = shlex.quote
        return "\n".join([
            "#!/bin/bash",
            "export NVMET_P2P_IN_VM=1",
            f"export NVMET_P2P_VM_RWDIR={q(str(rwdir))}",
            f"export NVMET_P2P_VM_OUT={q(str(rwdir / _OUT))}",
            f"export PATH={q(str(venv_bin))}:/usr/local/sbin:/usr/local/bin:$PATH",
            f"export PYTHONPATH={q(str(self.repo))}${{PYTHONPATH:+:$PYTHONPATH}}",
            # The root filesystem is read-only in the guest; unbuffered so the host can
            # relay progress as it happens.
            "export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1",
            *(self._cached_root_lines(rwdir) if self.cached_root else []),
            f"cd {q(str(self.repo))} || exit 1",
            f"cat /proc/uptime > {q(str(rwdir / _STARTED))}",
            f"bash {q(str(rwdir / 'script.sh'))} >> {q(str(rwdir / _OUTPUT))} 2>&1 < /dev/null",
            f"echo $? > {q(str(rwdir / _RC))}.tmp",
            f"mv {q(str(rwdir / _RC))}.tmp {q(str(rwdir / _RC))}",
            "",
        ])

    def _cached_root_lines(self, rwdir: Path) -> list[str]:
        q = shlex.quote
        repo, rw, log = q(str(self.repo)), q(str(rwdir)), q(str(rwdir / _OUTPUT))
        fast = "/run/nvmetp2p-root"
        # The rw dir may live inside the repo: park it, bind the repo over, put it back.
        return [
            f"mkdir -p {fast} /run/nvmetp2p-rw",
            (f"if mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=524288 "
            f"{_CACHED_ROOT_TAG} {fast}; then"),
            (f"  mount --bind {rw} /run/nvmetp2p-rw && mount --bind {fast}/usr /usr &&"
            f" mount --bind {fast}{repo} {repo} && mount --bind /run/nvmetp2p-rw {rw}"
            f" || echo '[vm] cached root: bind mounts failed' >> {log}"),
            f"else echo '[vm] cached root: 9p mount failed, using the uncached root' >> {log}; fi",
        ]

    # -- running ------------------------------------------------------------------------

    def run(self, script: str, timeout: float, stream: TextIO | None = None,
            out_dir: Path | None = None) -> Result:
        """Boot a fresh VM, run `script` (bash) in it from the repo root, power off.

        `stream` receives the script's output as it is produced.  QEMU is killed after
        `timeout` seconds whatever happens; the result then has returncode 124.  Files the
        script writes under $NVMET_P2P_VM_OUT are copied into `out_dir` afterwards.
        """
        kernel = self.boot_kernel()
        print(f"[vm] kernel {kernel.describe()}", file=sys.stderr)
        vng = find_vng()
        parent = self.scratch_parent or self.repo / ".vm"
        parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="vm-", dir=parent))
        try:
            return self._run_in(scratch, vng, kernel, script, timeout, stream)
        finally:
            if out_dir is not None and (scratch / "rw" / _OUT).is_dir():
                shutil.copytree(scratch / "rw" / _OUT, out_dir, dirs_exist_ok=True)
            if not self.keep_scratch:
                shutil.rmtree(scratch, ignore_errors=True)

    def _run_in(self, scratch: Path, vng: Path, kernel: Kernel, script: str, timeout: float,
                stream: TextIO | None) -> Result:
        rwdir = scratch / "rw"
        rwdir.mkdir()
        (rwdir / _OUT).mkdir()
        for img, size in self.images(scratch).items():
            with open(img, "wb") as f:
                f.truncate(size)  # sparse
        (rwdir / "script.sh").write_text(script)
        wrapper = rwdir / "wrapper.sh"
        wrapper.write_text(self.wrapper_script(rwdir))
        cmd = [str(vng)] + self.vng_args(scratch, f"bash {shlex.quote(str(wrapper))}", kernel)
        env = dict(os.environ)
        # vng runs virtme-run through PATH.
        env["PATH"] = f"{vng.parent}:{env.get('PATH', '')}"

        start = time.monotonic()
        deadline = start + timeout
        with open(scratch / "vng.log", "wb") as vng_log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=vng_log,
                                    stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, cwd=self.repo)
            tail = _Tail(rwdir / _OUTPUT, stream)
            boot_seconds = None
            done_at = None
            timed_out = False
            try:
                while proc.poll() is None:
                    now = time.monotonic()
                    if boot_seconds is None and (rwdir / _STARTED).exists():
                        boot_seconds = now - start
                    if done_at is None and (rwdir / _RC).exists():
                        done_at = now
                    tail.pump()
                    if done_at is not None and now > done_at + _SHUTDOWN_GRACE_S:
                        break  # everything is on the host already; don't wait for poweroff
                    if now > deadline:
                        timed_out = True
                        break
                    time.sleep(_POLL_S)
            finally:
                _kill_group(proc)
        tail.pump()
        total = time.monotonic() - start
        if boot_seconds is None and (rwdir / _STARTED).exists():
            boot_seconds = total
        output = tail.text()
        rc_file = rwdir / _RC
        if timed_out:
            note = f"\n[vm] hard timeout after {timeout:.0f} s: QEMU killed\n"
            if stream is not None:
                stream.write(note)
                stream.flush()
            return Result(TIMEOUT_EXIT, output + note, boot_seconds, total, timed_out=True)
        if not rc_file.exists():
            vng_tail = (scratch / "vng.log").read_text(errors="replace")[-3000:]
            stage = "finishing" if boot_seconds is not None else "starting"
            raise VMError(
                f"the VM exited (vng rc {proc.returncode}) before {stage} the script "
                f"after {total:.0f} s\n--- script output ---\n{output[-3000:]}"
                f"\n--- vng output ---\n{vng_tail}")
        return Result(int(rc_file.read_text().strip()), output, boot_seconds, total)


def _nvme_opts(drive_id: str, image: Path, serial: str, cmb_size_mb: int,
               bus: str | None = None) -> list[str]:
    dev = f"nvme,serial={serial},drive={drive_id}"
    if cmb_size_mb:
        dev += f",cmb_size_mb={cmb_size_mb}"
    if bus:
        dev += f",bus={bus}"
    return ["-drive", f"file={image},if=none,id={drive_id},format=raw", "-device", dev]


def _kill_group(proc: subprocess.Popen) -> None:
    # vng -> virtme-run -> qemu share the session started for vng; kill them all.
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired as e:
        raise VMError(f"vng (pid {proc.pid}) survived SIGKILL") from e


class _Tail:
    """Follows a file the guest appends to, relaying complete characters to a stream."""

    def __init__(self, path: Path, stream: TextIO | None):
        self.path = path
        self.stream = stream
        self.pos = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chunks: list[str] = []

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        self.pos += len(data)
        text = self.decoder.decode(data)
        self.chunks.append(text)
        if self.stream is not None and text:
            self.stream.write(text)
            self.stream.flush()

    def text(self) -> str:
        return "".join(self.chunks) + self.decoder.decode(b"", final=True)


# -- CLI --------------------------------------------------------------------------------

def pytest_script(pytest_args: list[str], repo: Path = REPO_ROOT) -> str:
    """The guest command that runs the vm-marked tests from the repo root."""
    args = ["python", "-m", "pytest", "-m", "vm", "-p", "no:cacheprovider", *pytest_args]
    if not any(_names_tests(a, repo) for a in pytest_args):
        args.append("tests")
    return shlex.join(args) + "\n"


def _names_tests(arg: str, repo: Path) -> bool:
    # A positional that names a test path; option values like `-k expr` look like neither.
    if arg.startswith("-"):
        return False
    return ("::" in arg or arg.endswith(".py") or "/" in arg or (repo / arg).exists())


def _split_pytest_cli(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    # Our options only lead; everything after them (or after `--`) belongs to pytest,
    # whose own options (-k, -x, --timeout ...) must pass through untouched.
    opts = argparse.Namespace(allow_empty=False, vm_timeout=_env_timeout(1800.0),
                              verbose=False, kernel=None)
    rest = list(argv)
    while rest:
        a = rest[0]
        if a == "--":
            rest.pop(0)
            break
        if a == "--allow-empty":
            opts.allow_empty = True
        elif a == "--vm-verbose":
            opts.verbose = True
        elif a.startswith("--vm-timeout="):
            opts.vm_timeout = float(a.split("=", 1)[1])
        elif a == "--vm-timeout" and len(rest) > 1:
            rest.pop(0)
            opts.vm_timeout = float(rest[0])
        elif a.startswith("--kernel="):
            opts.kernel = a.split("=", 1)[1]
        elif a == "--kernel" and len(rest) > 1:
            rest.pop(0)
            opts.kernel = rest[0]
        else:
            break
        rest.pop(0)
    return opts, rest


def _env_timeout(default: float) -> float:
    return float(os.environ.get("NVMET_P2P_VM_TIMEOUT", default))


def _raise_on_sigterm() -> None:
    # An outer `timeout` sends SIGTERM to us only; turn it into an exception so the
    # finally-blocks kill QEMU instead of leaving it running.
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _raise_on_sigterm()
    if argv and argv[0] == "pytest":
        opts, pytest_args = _split_pytest_cli(argv[1:])
        # Every device any vm test needs: the CMB NVMe on the root bus stays 0000:00:0b.0
        # (first NVMe in BDF order; the cached-root 9p device takes 00:0a.0), the switch's NVMe after it.
        vm = VM(nvme_cmb=True, iommu=True, pcie_switch=True, verbose=opts.verbose,
                kernel=opts.kernel)
        return _run_cli(vm, pytest_script(pytest_args, vm.repo), opts.vm_timeout,
                        pytest_allow_empty=opts.allow_empty)
    parser = argparse.ArgumentParser(prog="python -m nvmet_p2p.testbed.vm")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="boot the VM and run a command in it")
    run.add_argument("--cmb", action="store_true", help="add a QEMU NVMe with a 64 MiB CMB")
    run.add_argument("--iommu", action="store_true", help="add intel-iommu (for VFIO)")
    run.add_argument("--switch", action="store_true",
                     help="add a PCIe switch with an NVMe under each of two downstream ports")
    run.add_argument("--memory", default="2G")
    run.add_argument("--cpus", type=int, default=2)
    run.add_argument("--timeout", type=float, default=_env_timeout(600.0),
                     help="hard limit in seconds; QEMU is killed after it")
    run.add_argument("--keep", action="store_true", help="keep the scratch directory")
    run.add_argument("--out", type=Path, metavar="DIR",
                     help="copy what the command writes under $NVMET_P2P_VM_OUT into DIR")
    run.add_argument("--vm-verbose", action="store_true",
                     help="kernel console into the scratch vng.log")
    run.add_argument("--kernel", metavar="K",
                     help=f"vmlinuz path, or release (prefix) like 6.1; default ${KERNEL_ENV},"
                          " else the newest installed kernel with CONFIG_PCI_P2PDMA=y")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD...")
    sub.add_parser("pytest", help="run the vm-marked tests in one VM (leading --allow-empty,"
                   " --kernel K, --vm-timeout S, --vm-verbose; the rest goes to pytest)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("run: no command given (use: run [opts] -- CMD...)")
    vm = VM(nvme_cmb=args.cmb, iommu=args.iommu, pcie_switch=args.switch,
            memory=args.memory, cpus=args.cpus, keep_scratch=args.keep,
            verbose=args.vm_verbose, kernel=args.kernel)
    return _run_cli(vm, shlex.join(command) + "\n", args.timeout, out_dir=args.out)


def _run_cli(vm: VM, script: str, timeout: float, pytest_allow_empty: bool | None = None,
             out_dir: Path | None = None) -> int:
    """Run and report; `pytest_allow_empty` is None for commands that are not pytest."""
    try:
        result = vm.run(script, timeout, stream=sys.stdout, out_dir=out_dir)
    except VMError as e:
        print(f"[vm] {e}", file=sys.stderr)
        return 125
    boot = "?" if result.boot_seconds is None else f"{result.boot_seconds:.1f}"
    # Diagnostics go to stderr: the guest's last stdout line (pytest's summary) stays last.
    print(f"[vm] boot {boot} s, total {result.total_seconds:.1f} s, exit {result.returncode}",
          file=sys.stderr)
    if pytest_allow_empty is not None and result.returncode == PYTEST_NO_TESTS:
        if pytest_allow_empty:
            return 0
        print("[vm] pytest collected no tests (pass --allow-empty to accept)", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
