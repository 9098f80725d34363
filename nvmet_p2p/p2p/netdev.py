"""Which RDMA device serves an address: the lookups `explain` needs for a configuration.

A configured rdma port names only an IP address; the RDMA device that rdma_cm would bind
to it is the one with a GID on the network interface holding that address.  These
lookups ask the kernel over rtnetlink (pyroute2: RTM_GETADDR, RTM_GETLINK) and read
sysfs `class/infiniband/*/ports/*/gid_attrs/ndevs/*`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

NetdevOfAddr = Callable[[str], "str | None"]


class RdmaPort(Protocol):
    """What the lookup reads of a port (a configfs Port fits)."""

    @property
    def portid(self) -> int: ...

    @property
    def addr_traddr(self) -> str: ...


def netdev_of_addr(addr: str) -> str | None:
    """The network interface holding IP address `addr` on this machine, or None.

    Addresses compare as addresses, not as text (`fd00::2` is `fd00:0::2`).  IPv4 holds
    the interface's own address in IFA_LOCAL (IFA_ADDRESS is the peer on a point-to-point
    link); IPv6 has IFA_ADDRESS only.
    """
    try:
        want = ipaddress.ip_address(addr)
    except ValueError:
        return None
    try:
        with IPRoute() as ipr:
            for msg in ipr.get_addr():
                local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if local is None or ipaddress.ip_address(local) != want:
                    continue
                links = ipr.get_links(msg["index"])
                return links[0].get_attr("IFLA_IFNAME") if links else None
    except (OSError, NetlinkError):  # no rtnetlink here: nothing is known to hold it
        return None
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
