"""Which RDMA device serves an address: the lookups `explain` needs for a configuration.

A configured rdma port names only an IP address; the RDMA device that rdma_cm would bind
to it is the one with a GID on the network interface holding that address.  These
lookups read `ip -j addr` (or, without iproute2, SIOCGIFADDR) and sysfs
`class/infiniband/*/ports/*/gid_attrs/ndevs/*`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

IP_TIMEOUT_S = 5.0  # `ip -j addr` answers in milliseconds; a hung one must not hang explain
SIOCGIFADDR = 0x8915

NetdevOfAddr = Callable[[str], "str | None"]


class RdmaPort(Protocol):
    """What the lookup reads of a port (a configfs Port fits)."""

    @property
    def portid(self) -> int: ...

    @property
    def addr_traddr(self) -> str: ...


def netdev_of_addr(addr: str) -> str | None:
    """The network interface holding IP address `addr` on this machine, or None."""
    try:
        cp = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True,
                            timeout=IP_TIMEOUT_S, check=False)
        links = json.loads(cp.stdout) if cp.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        links = None
    if links is not None:
        for link in links:
            if any(a.get("local") == addr for a in link.get("addr_info", ())):
                return link.get("ifname")
        return None
    return _netdev_of_ipv4_ioctl(addr)


def _netdev_of_ipv4_ioctl(addr: str) -> str | None:
    # Without iproute2: SIOCGIFADDR per interface (IPv4 only).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()))
            except OSError:
                continue
            if socket.inet_ntoa(res[20:24]) == addr:
                return name
    return None


def rdma_device_of_netdev(sysfs_root: str | os.PathLike[str], netdev: str) -> str | None:
    """The RDMA device one of whose GIDs is on `netdev` (what rdma_cm binds to), or None."""
    for ndev in sorted(Path(sysfs_root).glob("class/infiniband/*/ports/*/gid_attrs/ndevs/*")):
        try:
            if ndev.read_text().strip() == netdev:
                return ndev.parents[4].name  # <dev>/ports/<n>/gid_attrs/ndevs/<i>
        except OSError:
            continue  # unpopulated GID entries read as EINVAL
    return None


def rdma_client(port: RdmaPort, sysfs_root: str | os.PathLike[str], netdev_of: NetdevOfAddr,
                ) -> tuple[str | None, str | None]:
    """(RDMA device, None) for an rdma port, or (None, why not)."""
    addr = port.addr_traddr
    if not addr:
        return None, f"port {port.portid}: addr_traddr is not set"
    netdev = netdev_of(addr)
    if netdev is None:
        return None, (f"port {port.portid}: no network interface has address {addr}, so "
                      f"its RDMA device is unknown")
    dev = rdma_device_of_netdev(sysfs_root, netdev)
    if dev is None:
        return None, (f"port {port.portid}: no RDMA device has a GID on {netdev} (the "
                      f"interface holding {addr})")
    return dev, None
