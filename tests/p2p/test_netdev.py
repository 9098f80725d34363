"""Address lookups over rtnetlink (pyroute2) on this machine's own interfaces."""

from __future__ import annotations

import socket

import pytest
from pyroute2 import IPRoute

from nvmet_p2p.p2p import netdev
from nvmet_p2p.p2p.netdev import netdev_of_addr


def _addresses() -> list[tuple[str, str]]:
    """(address, interface) of every address here, as `ip addr` lists them."""
    with IPRoute() as ipr:
        return [(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"),
                 socket.if_indextoname(m["index"])) for m in ipr.get_addr()]


def test_loopback_is_lo() -> None:
    assert netdev_of_addr("127.0.0.1") == "lo"


def test_every_address_here_maps_to_its_interface() -> None:
    found = _addresses()
    assert found, "no addresses at all: rtnetlink answered nothing"
    for addr, ifname in found:
        assert netdev_of_addr(addr) == ifname, addr


def test_ipv6_addresses_compare_as_addresses() -> None:
    if not any(":" in a for a, _ in _addresses()):
        pytest.skip("no IPv6 address on this machine")
    assert netdev_of_addr("0:0:0:0:0:0:0:1") == netdev_of_addr("::1") == "lo"


@pytest.mark.parametrize("addr", ["192.0.2.254", "not an address", "", "2001:db8::dead"])
def test_an_address_nobody_holds_is_none(addr: str) -> None:
    assert netdev_of_addr(addr) is None


def test_without_rtnetlink_nothing_holds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*a: object, **k: object) -> None:
        raise PermissionError(13, "netlink refused")
    monkeypatch.setattr(netdev, "IPRoute", refused)
    assert netdev_of_addr("127.0.0.1") is None
