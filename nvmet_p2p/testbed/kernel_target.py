"""The Linux kernel NVMe-oF target (nvmet) configured through configfs, inside the VM.

Used as the reference to compare nvmet-p2p against, and to prove the VM harness: one
subsystem with one namespace, one port, and either any host or a list of allowed hosts.
Attribute and directory names are the kernel's (drivers/nvme/target/configfs.c).  Setup
is a context manager; teardown runs in reverse order and may be called any number of
times, even after a half-finished setup.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from nvmet_p2p.errors import VMError

CONFIGFS_NVMET = Path("/sys/kernel/config/nvmet")
_TRANSPORT_MODULES = {"rdma": "nvmet-rdma", "tcp": "nvmet-tcp", "loop": "nvme-loop"}


class KernelTarget:
    """nvmet serving `device_path` as namespace `nsid` of `subnqn` on traddr:trsvcid."""

    def __init__(self, subnqn: str, device_path: str | os.PathLike[str],
                 trsvcid: int = 4420, traddr: str = "192.0.2.1", trtype: str = "rdma",
                 adrfam: str = "ipv4", nsid: int = 1, port_id: int = 1,
                 allowed_hosts: Sequence[str] = (), buffered_io: bool | None = None,
                 p2pmem: str | None = None, root: Path = CONFIGFS_NVMET):
        self.subnqn = subnqn
        self.device_path = str(device_path)
        self.trsvcid = trsvcid
        self.traddr = traddr
        self.trtype = trtype
        self.adrfam = adrfam
        self.nsid = nsid
        self.port_id = port_id
        self.allowed_hosts = list(allowed_hosts)
        self.buffered_io = buffered_io
        self.p2pmem = p2pmem  # the namespace's p2pmem: "1", "0" or a provider's BDF
        self.root = root

    # configfs paths, named as the kernel names them
    @property
    def subsys_dir(self) -> Path:
        return self.root / "subsystems" / self.subnqn

    @property
    def ns_dir(self) -> Path:
        return self.subsys_dir / "namespaces" / str(self.nsid)

    @property
    def port_dir(self) -> Path:
        return self.root / "ports" / str(self.port_id)

    @property
    def port_subsys_link(self) -> Path:
        return self.port_dir / "subsystems" / self.subnqn

    def _host_dir(self, hostnqn: str) -> Path:
        return self.root / "hosts" / hostnqn

    def _allowed_link(self, hostnqn: str) -> Path:
        return self.subsys_dir / "allowed_hosts" / hostnqn

    def setup(self) -> None:
        """Build the configfs tree; on any failure undo what was built and raise VMError."""
        try:
            self._load_modules()
            self._setup()
        except (OSError, subprocess.SubprocessError) as e:
            self.teardown()
            raise VMError(f"kernel target {self.subnqn}: {e}") from e

    def _load_modules(self) -> None:
        if self.root != CONFIGFS_NVMET:
            return  # a test tree, not the kernel's
        for mod in ("configfs", "nvmet", _TRANSPORT_MODULES[self.trtype]):
            subprocess.run(["modprobe", mod], check=True, capture_output=True, timeout=60)
        mount_configfs()
        if not self.root.exists():
            raise VMError(f"{self.root} missing: is configfs mounted?")

    def _setup(self) -> None:
        # configfs creates the attribute files and group directories on mkdir.
        self.subsys_dir.mkdir(parents=True, exist_ok=True)
        _write(self.subsys_dir / "attr_allow_any_host", "0" if self.allowed_hosts else "1")
        for hostnqn in self.allowed_hosts:
            self._host_dir(hostnqn).mkdir(parents=True, exist_ok=True)
            link = self._allowed_link(hostnqn)
            link.parent.mkdir(exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(self._host_dir(hostnqn))
        self.ns_dir.mkdir(parents=True, exist_ok=True)
        _write(self.ns_dir / "device_path", self.device_path)
        if self.buffered_io is not None:
            # Files on tmpfs (the VM's /tmp, /dev/shm) refuse O_DIRECT: they need buffered_io=1.
            _write(self.ns_dir / "buffered_io", "1" if self.buffered_io else "0")
        if self.p2pmem is not None:
            # only with CONFIG_PCI_P2PDMA; enable then fails unless the namespace's device
            # takes P2P pages and p2pmem it can reach exists (nvmet_p2pmem_ns_enable)
            _write(self.ns_dir / "p2pmem", self.p2pmem)
        _write(self.ns_dir / "enable", "1")
        self.port_dir.mkdir(parents=True, exist_ok=True)
        _write(self.port_dir / "addr_trtype", self.trtype)
        _write(self.port_dir / "addr_adrfam", self.adrfam)
        _write(self.port_dir / "addr_traddr", self.traddr)
        _write(self.port_dir / "addr_trsvcid", str(self.trsvcid))
        self.port_subsys_link.parent.mkdir(exist_ok=True)
        if not self.port_subsys_link.is_symlink():
            # Linking the subsystem into the port is what starts the listener.
            self.port_subsys_link.symlink_to(self.subsys_dir)

    def teardown(self) -> None:
        """Remove what setup() made, children first; absent pieces are skipped."""
        _unlink(self.port_subsys_link)
        _rmdir(self.port_dir)
        if (self.ns_dir / "enable").exists():
            _write(self.ns_dir / "enable", "0")
        _rmdir(self.ns_dir)
        for hostnqn in self.allowed_hosts:
            _unlink(self._allowed_link(hostnqn))
        _rmdir(self.subsys_dir)
        for hostnqn in self.allowed_hosts:
            _rmdir(self._host_dir(hostnqn))

    def __enter__(self) -> Self:
        self.setup()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.teardown()


def mount_configfs(mountpoint: Path = CONFIGFS_NVMET.parent) -> None:
    """Mount configfs unless it already is (the VM's init does not mount it)."""
    with open("/proc/mounts") as f:
        if any(line.split()[1:3] == [str(mountpoint), "configfs"] for line in f):
            return
    subprocess.run(["mount", "-t", "configfs", "configfs", str(mountpoint)], check=True,
                   capture_output=True, timeout=60)


def _write(path: Path, value: str) -> None:
    # One write() per attribute, as configfs expects; the kernel's refusal is the error.
    with open(path, "w") as f:
        f.write(value)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
