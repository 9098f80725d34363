"""Builder for synthetic sysfs trees in a temporary directory, for the P2P topology tests.

It lays out what the topology model reads from a real /sys, with the same shapes:
``devices/pciDDDD:BB/<bdf>/<bdf>/...`` nesting for bridges, ``vendor``/``device``/``class``
files, a ``config`` file with a PCIe capability and an ACS extended capability (behind an
AER capability, so the extended list is really walked), ``bus/pci/devices`` symlinks,
``class/{infiniband,net,block}`` links, soft-RoCE devices under ``devices/virtual`` and
``p2pmem`` directories.  Every link is relative, as in sysfs, so the tree can be moved.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

# PCIe device/port types (PCIe capability register bits 7:4)
PCIE_ENDPOINT = 0x0
PCIE_ROOT_PORT = 0x4
PCIE_SWITCH_UPSTREAM = 0x5
PCIE_SWITCH_DOWNSTREAM = 0x6
PCIE_RC_ENDPOINT = 0x9

CLASS_HOST_BRIDGE = 0x060000
CLASS_PCI_BRIDGE = 0x060400
CLASS_NVME = 0x010802
CLASS_ETHERNET = 0x020000
CLASS_INFINIBAND = 0x020700

ACS_ALL_CAPS = 0x007F  # every ACS feature implemented (capability register)


@dataclass(frozen=True)
class RootBus:
    domain: int
    bus: int
    path: Path


@dataclass(frozen=True)
class Fn:
    """One PCI function in the tree; ``secondary_bus`` is set for bridges."""

    bdf: str
    path: Path
    secondary_bus: int | None = None
    domain: int = 0


def make_config(
    vendor: int,
    device: int,
    class_code: int,
    *,
    pcie_type: int | None,
    acs_ctrl: int | None,
    bus: int = 0,
    secondary_bus: int | None = None,
    length: int = 4096,
) -> bytes:
    """Config space bytes: header, PM -> PCIe capability, AER -> ACS extended capability."""
    cfg = bytearray(4096)
    struct.pack_into("<HH", cfg, 0x00, vendor, device)
    cfg[0x09:0x0C] = class_code.to_bytes(3, "little")
    if secondary_bus is not None:
        cfg[0x0E] = 0x01  # type 1 header
        cfg[0x18:0x1B] = bytes((bus, secondary_bus, secondary_bus))
    if pcie_type is not None:
        struct.pack_into("<H", cfg, 0x06, 1 << 4)  # status: capability list present
        cfg[0x34] = 0x40
        cfg[0x40:0x42] = bytes((0x01, 0x50))  # power management, next at 0x50
        cfg[0x50:0x52] = bytes((0x10, 0x00))  # PCI Express, last
        struct.pack_into("<H", cfg, 0x52, 0x0002 | pcie_type << 4)
    if acs_ctrl is not None:
        struct.pack_into("<I", cfg, 0x100, 0x0001 | 1 << 16 | 0x148 << 20)  # AER -> 0x148
        struct.pack_into("<I", cfg, 0x148, 0x000D | 1 << 16)  # ACS, last
        struct.pack_into("<HH", cfg, 0x14C, ACS_ALL_CAPS, acs_ctrl)
    return bytes(cfg[:length])


class SysfsTree:
    """A writable fake /sys rooted at ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.devices = self.root / "devices"
        self.pci_links = self.root / "bus/pci/devices"
        for d in (self.devices, self.pci_links):
            d.mkdir(parents=True, exist_ok=True)
        self._next_bus: dict[int, int] = {}

    # - PCI -

    def root_bus(self, domain: int = 0, bus: int = 0) -> RootBus:
        path = self.devices / f"pci{domain:04x}:{bus:02x}"
        path.mkdir(parents=True, exist_ok=True)
        self._next_bus[domain] = max(self._next_bus.get(domain, 0), bus + 1)
        return RootBus(domain, bus, path)

    def function(
        self,
        parent: RootBus | Fn,
        dev: int,
        fn: int = 0,
        *,
        vendor: int,
        device: int,
        class_code: int,
        pcie_type: int | None = PCIE_ENDPOINT,
        acs_ctrl: int | None = None,
        bridge: bool = False,
        config_len: int = 4096,
    ) -> Fn:
        """Add a function on ``parent``'s bus (a root bus or a bridge's secondary bus)."""
        if isinstance(parent, RootBus):
            domain, bus = parent.domain, parent.bus
        else:
            assert parent.secondary_bus is not None, f"{parent.bdf} is not a bridge"
            domain, bus = parent.domain, parent.secondary_bus
        bdf = f"{domain:04x}:{bus:02x}:{dev:02x}.{fn}"
        path = parent.path / bdf
        path.mkdir(parents=True)
        secondary = None
        if bridge:
            secondary = self._next_bus[domain]
            self._next_bus[domain] += 1
        (path / "vendor").write_text(f"0x{vendor:04x}\n")
        (path / "device").write_text(f"0x{device:04x}\n")
        (path / "class").write_text(f"0x{class_code:06x}\n")
        (path / "config").write_bytes(
            make_config(
                vendor, device, class_code, pcie_type=pcie_type, acs_ctrl=acs_ctrl,
                bus=bus, secondary_bus=secondary, length=config_len,
            )
        )
        (self.pci_links / bdf).symlink_to(os.path.relpath(path, self.pci_links))
        return Fn(bdf, path, secondary, domain)

    def host_bridge(self, rb: RootBus, vendor: int = 0x8086, device: int = 0x29C0) -> Fn:
        """The devfn 00.0 host bridge the kernel's whitelist looks at (default: QEMU q35)."""
        return self.function(
            rb, 0, vendor=vendor, device=device, class_code=CLASS_HOST_BRIDGE, pcie_type=None
        )

    def root_port(self, rb: RootBus, dev: int, fn: int = 0, *, acs_ctrl: int | None = None,
                  vendor: int = 0x8086, device: int = 0x2030) -> Fn:
        return self.function(
            rb, dev, fn, vendor=vendor, device=device, class_code=CLASS_PCI_BRIDGE,
            pcie_type=PCIE_ROOT_PORT, acs_ctrl=acs_ctrl, bridge=True,
        )

    def switch(self, port: Fn, downstream: int, *, acs_ctrl: int | None = None,
               usp_acs_ctrl: int | None = None) -> tuple[Fn, list[Fn]]:
        """A PCIe switch below ``port``: its upstream port and ``downstream`` DSPs."""
        usp = self.function(
            port, 0, vendor=0x104C, device=0x8232, class_code=CLASS_PCI_BRIDGE,
            pcie_type=PCIE_SWITCH_UPSTREAM, acs_ctrl=usp_acs_ctrl, bridge=True,
        )
        dsps = [
            self.function(
                usp, i, vendor=0x104C, device=0x8233, class_code=CLASS_PCI_BRIDGE,
                pcie_type=PCIE_SWITCH_DOWNSTREAM, acs_ctrl=acs_ctrl, bridge=True,
            )
            for i in range(downstream)
        ]
        return usp, dsps

    def endpoint(self, parent: RootBus | Fn, dev: int = 0, fn: int = 0, *, vendor: int = 0x1B36,
                 device: int = 0x0010, class_code: int = CLASS_NVME,
                 pcie_type: int | None = PCIE_ENDPOINT, acs_ctrl: int | None = None,
                 config_len: int = 4096) -> Fn:
        return self.function(
            parent, dev, fn, vendor=vendor, device=device, class_code=class_code,
            pcie_type=pcie_type, acs_ctrl=acs_ctrl, config_len=config_len,
        )

    # - class devices -

    def _class_link(self, cls: str, name: str, target: Path) -> Path:
        links = self.root / "class" / cls
        links.mkdir(parents=True, exist_ok=True)
        (links / name).symlink_to(os.path.relpath(target, links))
        return links / name

    def infiniband(self, name: str, fn: Fn) -> Path:
        """A hardware RDMA device: a child of its PCI function with a `device` link."""
        path = fn.path / "infiniband" / name
        path.mkdir(parents=True)
        (path / "device").symlink_to("../..")
        return self._class_link("infiniband", name, path)

    def netdev(self, name: str, fn: Fn | None = None) -> Path:
        """A netdev on a PCI function, or a virtual one (dummy, veth) when ``fn`` is None."""
        if fn is None:
            path = self.devices / "virtual/net" / name
            path.mkdir(parents=True)
        else:
            path = fn.path / "net" / name
            path.mkdir(parents=True)
            (path / "device").symlink_to("../..")
        return self._class_link("net", name, path)

    def block(self, name: str, fn: Fn | None = None, ctrl: str = "nvme0") -> Path:
        """A disk below ``fn`` (as nvme/<ctrl>/<name>), or a virtual one (loop) if None."""
        if fn is None:
            path = self.devices / "virtual/block" / name
        else:
            path = fn.path / "nvme" / ctrl / name
        path.mkdir(parents=True)
        (path / "dev").write_text("259:0\n")
        return self._class_link("block", name, path)

    def partition(self, disk: Path, name: str) -> Path:
        path = Path(os.path.realpath(disk)) / name
        path.mkdir()
        (path / "partition").write_text("1\n")
        return self._class_link("block", name, path)

    def rxe(self, name: str, netdev: str, *, under: Fn | None = None,
            parent_file: bool = True) -> Path:
        """A soft-RoCE device on ``netdev``.  Current kernels put it under devices/virtual
        with no `device` link; old ones parented it on the NIC (``under``)."""
        if under is None:
            path = self.devices / "virtual/infiniband" / name
            path.mkdir(parents=True)
        else:
            path = under.path / "infiniband" / name
            path.mkdir(parents=True)
            (path / "device").symlink_to("../..")
        if parent_file:
            (path / "parent").write_text(f"{netdev}\n")
        ndevs = path / "ports/1/gid_attrs/ndevs"
        ndevs.mkdir(parents=True)
        (ndevs / "0").write_text(f"{netdev}\n")
        return self._class_link("infiniband", name, path)

    def p2pmem(self, fn: Fn, size: int, available: int | None = None, *,
               published: bool = True, allocate: bool = True) -> Path:
        path = fn.path / "p2pmem"
        path.mkdir()
        (path / "size").write_text(f"{size}\n")
        (path / "available").write_text(f"{size if available is None else available}\n")
        (path / "published").write_text(f"{int(published)}\n")
        if allocate:
            (path / "allocate").write_bytes(b"")
        return path
