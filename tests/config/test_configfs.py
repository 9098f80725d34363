"""Unit tests of the configuration tree: kernel rules, hooks, nvmetcli JSON, atomic save."""

from __future__ import annotations

import json
import os
import pathlib
import stat

import pytest

from nvmet_p2p.config import jsonfile
from nvmet_p2p.config.values import nqn_format_warning
from nvmet_p2p.configfs import (
    ConfigError,
    Root,
    TreeHooks,
    attr_choices,
    attr_groups,
    get_attr,
    list_attrs,
    lookup,
    set_attr,
)

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "nvmetcli"
SUB = "nqn.2024-01.io.example:disk1"
SUB2 = "nqn.2024-01.io.example:disk2"
HOST = "nqn.2014-08.org.nvmexpress:uuid:2b1e0c4c-4a5e-4b8e-9f3d-2f0b5c7a1e11"
HOST2 = "nqn.2024-01.io.example:client"


class Spy(TreeHooks):
    """Records every hook call; can veto enable / link."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.veto_enable = False
        self.veto_link = False

    def ns_enable(self, subsys, ns):
        self.calls.append(("ns_enable", subsys.nqn, ns.nsid))
        if self.veto_enable:
            raise ConfigError("backend refused: no such file; fix device_path")

    def ns_disable(self, subsys, ns):
        self.calls.append(("ns_disable", subsys.nqn, ns.nsid))

    def port_add_subsys(self, port, subsys):
        self.calls.append(("port_add_subsys", port.portid, subsys.nqn))
        if self.veto_link:
            raise ConfigError("cannot listen: address in use; pick another addr_trsvcid")

    def port_remove_subsys(self, port, subsys):
        self.calls.append(("port_remove_subsys", port.portid, subsys.nqn))

    def subsys_hosts_changed(self, subsys):
        self.calls.append(("subsys_hosts_changed", subsys.nqn))

    def port_changed(self, port):
        self.calls.append(("port_changed", port.portid))

    def subsys_queues_changed(self, subsys):
        self.calls.append(("subsys_queues_changed", subsys.nqn))

    def discovery_changed(self):
        self.calls.append(("discovery_changed",))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


@pytest.fixture
def spy() -> Spy:
    return Spy()


@pytest.fixture
def root(spy: Spy) -> Root:
    return Root(spy)


def rdma_port(root: Root, portid: int = 1):
    port = root.create_port(portid)
    port.addr_trtype = "rdma"
    port.addr_adrfam = "ipv4"
    port.addr_traddr = "10.0.0.1"
    return port


def ready_ns(root: Root, nsid: int = 1, nqn: str = SUB):
    subsys = root.subsystems.get(nqn) or root.create_subsystem(nqn)
    ns = subsys.create_namespace(nsid)
    ns.device_path = f"/tmp/ns{nsid}.img"
    return subsys, ns


def refused(match: str):
    return pytest.raises(ConfigError, match=match)


# -- NQNs, ids, names -------------------------------------------------------------------

@pytest.mark.parametrize("nqn", [
    "nqn.2014-08.org.nvmexpress:uuid:2b1e0c4c-4a5e-4b8e-9f3d-2f0b5c7a1e11",
    "nqn.2024-01.io.example:disk1",
    "nqn.2014-08.org.nvmexpress:NVMf:uuid:7f6e5d4c-3b2a-4190-8f7e-6d5c4b3a2918",
    "nqn.2016-06.io.spdk:cnode1",
])
def test_valid_nqns_accepted(root, nqn):
    assert root.create_subsystem(nqn).nqn == nqn
    assert root.create_host(nqn).nqn == nqn


@pytest.mark.parametrize("nqn", [
    "blktests-subsystem-1",  # blktests and lab configurations use such names
    "iqn.2024-01.io.example:x",
    "nqn.2024-13.io.example:x",
    "nqn.2024-01.io.example",
    "nqn.24-01.io.example:x",
    "nqn.2014-08.org.nvmexpress:uuid:not-a-uuid",
    "nqn.2024-01.io.example:a b",
])
def test_nqns_off_the_format_accepted_with_a_warning(root, nqn, caplog):
    """The kernel target takes any directory name as an NQN; so do we, and say so."""
    assert root.create_subsystem(nqn).nqn == nqn
    assert root.create_host(nqn).nqn == nqn
    assert len(root.warnings()) == 2
    assert all(nqn_format_warning(nqn) in w for w in root.warnings())
    assert "accepted, as the kernel target does" in caplog.text


def test_nqns_in_the_format_have_no_warning(root):
    root.create_subsystem(SUB)
    root.create_host(HOST)
    assert root.warnings() == []


@pytest.mark.parametrize("nqn, fix", [
    ("nqn.2024-01.io.example:a/b", "'/' or NUL"),
    ("nqn.2024-01.io.example:a\0b", "'/' or NUL"),
    ("", "cannot name a configfs directory"),
    ("..", "cannot name a configfs directory"),
    ("nqn.2024-01.io.example:\udc80", "lone surrogate"),
    ("nqn.2024-01.io.example:" + "x" * 201, "shorten it"),
    (42, "must be a string"),
])
def test_bad_nqns_refused_with_fix(root, nqn, fix):
    with refused(fix):
        root.create_subsystem(nqn)
    with refused(fix):
        root.create_host(nqn)
    assert root.is_empty()


def test_nqn_length_counts_utf8_bytes(root):
    base = "nqn.2024-01.io.example:"
    ok = base + "é" * ((223 - len(base)) // 2)
    assert len(ok.encode()) <= 223
    root.create_subsystem(ok)
    with refused("at most 223 bytes"):
        root.create_subsystem(ok + "é")


def test_discovery_nqn_cannot_be_a_subsystem(root):
    with refused("discovery subsystem.*pick another NQN"):
        root.create_subsystem("nqn.2014-08.org.nvmexpress.discovery")


def test_duplicates_refused(root):
    root.create_subsystem(SUB)
    root.create_host(HOST)
    root.create_port(1)
    with refused("already exists"):
        root.create_subsystem(SUB)
    with refused("already exists"):
        root.create_host(HOST)
    with refused("pick another port id"):
        root.create_port(1)
    root.subsystems[SUB].create_namespace(3)
    with refused("pick another NSID"):
        root.subsystems[SUB].create_namespace(3)


@pytest.mark.parametrize("nsid", [0, 0xFFFFFFFF, -1, 1 << 32])
def test_nsid_range(root, nsid):
    subsys = root.create_subsystem(SUB)
    with refused(r"use 1\.\.4294967294"):
        subsys.create_namespace(nsid)


def test_nsid_bounds_accepted(root):
    subsys = root.create_subsystem(SUB)
    subsys.create_namespace(1)
    subsys.create_namespace(0xFFFFFFFE)
    assert sorted(subsys.namespaces) == [1, 0xFFFFFFFE]


@pytest.mark.parametrize("portid", [-1, 65536, "1", True])
def test_portid_range(root, portid):
    with refused(r"0\.\.65535"):
        root.create_port(portid)


def test_referral_names(root):
    port = root.create_port(1)
    for bad in ("", "a/b", "a b"):
        with refused("non-empty word"):
            port.create_referral(bad)
    port.create_referral("r1")
    with refused("pick another name"):
        port.create_referral("r1")


# -- defaults ------------------------------------------------------------------------

def test_subsystem_defaults(root):
    s = root.create_subsystem(SUB)
    assert s.attr_allow_any_host is False
    assert s.attr_model == "nvmet-p2p"
    assert s.attr_version == "1.3"
    assert s.attr_firmware == "0.1.0"
    assert (s.attr_cntlid_min, s.attr_cntlid_max, s.attr_qid_max) == (1, 0xFFEF, 128)
    assert len(s.attr_serial) == 16 and int(s.attr_serial, 16) >= 0
    other = root.create_subsystem(SUB2)
    assert other.attr_serial != s.attr_serial
    assert s.allowed_hosts == [] and dict(s.namespaces) == {}


def test_namespace_defaults(root):
    ns = root.create_subsystem(SUB).create_namespace(1)
    assert ns.enable is False and ns.buffered_io is False
    assert ns.p2pmem == "1" and ns.ana_grpid == 1 and ns.device_path == ""
    assert ns.device_block_size == 512 and ns.device_size is None
    assert ns.device_backend == "auto" and ns.device_create is False
    assert ns.device_nguid == "00000000-0000-0000-0000-000000000000"
    assert len(ns.device_uuid) == 36


def test_port_defaults(root):
    port = root.create_port(3)
    assert port.addr_trtype == "" and port.addr_treq == "not specified"
    assert port.param_inline_data_size == 4096 and port.param_max_queue_size == 128
    assert port.attr_allow_p2pmem is False
    assert port.addr_trsvcid == ""  # no transport yet
    port.addr_trtype = "rdma"
    assert port.addr_trsvcid == "4420" and port.addr_tsas == "connected"
    port.addr_trtype = "tcp"
    assert port.addr_trsvcid == "4420" and port.addr_tsas == "none"
    port.addr_trsvcid = "4421"
    assert port.addr_trsvcid == "4421"


def test_transport_default_params_resolve(root):
    port = root.create_port(1)
    port.param_inline_data_size = -1
    port.param_max_queue_size = "-1"
    assert port.resolved_inline_data_size() == 4096
    assert port.resolved_max_queue_size() == 128
    port.param_inline_data_size = 16384
    assert port.resolved_inline_data_size() == 16384


# -- value validation --------------------------------------------------------------

@pytest.mark.parametrize("group, name, value, fix", [
    ("attr", "cntlid_min", "0", r"use 1\.\.65519"),
    ("attr", "cntlid_max", "65520", r"use 1\.\.65519"),
    ("attr", "qid_max", "129", r"use 1\.\.128"),
    ("attr", "qid_max", "0", r"use 1\.\.128"),
    ("attr", "serial", "", "give 1..20 ASCII"),
    ("attr", "serial", "x" * 21, "at most 20"),
    ("attr", "serial", "caf\u00e9", "printable ASCII"),
    ("attr", "model", "m" * 41, "at most 40"),
    ("attr", "firmware", "123456789", "at most 8"),
    ("attr", "version", "one", "major.minor"),
    ("attr", "ieee_oui", "0x1000000", "0x000000..0xffffff"),
    ("attr", "allow_any_host", "maybe", "use 0 or 1"),
    ("attr", "pi_enable", "1", "set pi_enable to 0"),
])
def test_subsystem_attr_validation(root, group, name, value, fix):
    s = root.create_subsystem(SUB)
    before = list_attrs(s, group)
    with refused(fix):
        set_attr(s, group, name, value)
    assert list_attrs(s, group) == before


def test_subsystem_attr_text_forms(root):
    s = root.create_subsystem(SUB)
    set_attr(s, "attr", "version", "1.4.0")
    assert get_attr(s, "attr", "version") == "1.4"
    set_attr(s, "attr", "version", "2.0.1")
    assert s.attr_version == "2.0.1"
    set_attr(s, "attr", "ieee_oui", "0x1b36")
    assert get_attr(s, "attr", "ieee_oui") == "0x001b36" and s.attr_ieee_oui == 0x1B36
    set_attr(s, "attr", "allow_any_host", "y")
    assert get_attr(s, "attr", "allow_any_host") == "1" and s.attr_allow_any_host is True
    s.attr_qid_max = 4
    assert get_attr(s, "attr", "qid_max") == "4"


def test_cntlid_min_max_order(root):
    s = root.create_subsystem(SUB)
    s.attr_cntlid_max = 100
    with refused("raise cntlid_max first"):
        s.attr_cntlid_min = 101
    s.attr_cntlid_min = 100
    with refused("lower cntlid_min first"):
        s.attr_cntlid_max = 99
    assert (s.attr_cntlid_min, s.attr_cntlid_max) == (100, 100)


def test_namespace_value_validation(root):
    ns = root.create_subsystem(SUB).create_namespace(1)
    with refused("8-4-4-4-12"):
        ns.device_uuid = "1234"
    ns.device_uuid = "5D2F7C9A-1E3B-4C6D-8A9F-0B1C2D3E4F50"
    assert ns.device_uuid == "5d2f7c9a-1e3b-4c6d-8a9f-0b1c2d3e4f50"
    ns.device_nguid = "3a:1b:5c:7d:9e:0f:4a:2b:8c:4d:6e:8f:0a:1b:2c:3d"
    assert ns.device_nguid == "3a1b5c7d-9e0f-4a2b-8c4d-6e8f0a1b2c3d"
    with refused("32 hex digits"):
        ns.device_nguid = "zz"
    with refused("remove it"):
        ns.device_nguid = "3a1b5c7d9e0f4a2b8c4d6e8f0a1b2c3dff"
    with refused(r"use 1\.\.128"):
        ns.ana_grpid = 0
    with refused("use 512 or 4096"):
        ns.device_block_size = 1024
    ns.device_block_size = "4096"
    assert ns.device_block_size == 4096
    with refused("one of 'auto'"):
        ns.device_backend = "nbd"
    with refused("K, M, G or T"):
        ns.device_size = "lots"
    ns.device_size = "64M"
    assert ns.device_size == 64 << 20 and get_attr(ns, "device", "size") == str(64 << 20)
    ns.device_size = "1GiB"
    assert ns.device_size == 1 << 30
    ns.device_size = ""
    assert ns.device_size is None
    ns.device_path = "(null)"  # what an unset kernel device_path reads back as
    assert ns.device_path == ""


@pytest.mark.parametrize("value, stored", [
    ("0", "0"), ("1", "1"), ("off", "0"), (True, "1"),
    ("0000:03:00.0", "0000:03:00.0"), ("0000:AF:1F.7", "0000:af:1f.7"),
])
def test_p2pmem_values(root, value, stored):
    ns = root.create_subsystem(SUB).create_namespace(1)
    ns.p2pmem = value
    assert ns.p2pmem == stored and get_attr(ns, "", "p2pmem") == stored


@pytest.mark.parametrize("value", ["03:00.0", "2", "0000:03:00", "nvme0"])
def test_p2pmem_bad_values(root, value):
    ns = root.create_subsystem(SUB).create_namespace(1)
    with refused("use 0 .off., 1 .auto. or a PCI address"):
        ns.p2pmem = value


@pytest.mark.parametrize("group, name, value, fix", [
    ("addr", "trtype", "fc", "use rdma, tcp or loop"),
    ("addr", "trtype", "ib", "use one of"),
    ("addr", "adrfam", "ipv5", "use one of"),
    ("addr", "treq", "maybe", "use one of"),
    ("addr", "traddr", "10.0.0.1 10.0.0.2", "single word"),
    ("addr", "trsvcid", "4" * 40, "longer than 31"),
    ("param", "inline_data_size", "16385", r"0\.\.16384 or -1"),
    ("param", "max_queue_size", "8", r"16\.\.1024 or -1"),
    ("param", "max_queue_size", "big", "write digits"),
    ("param", "pi_enable", "1", "set pi_enable to 0"),
])
def test_port_attr_validation(root, group, name, value, fix):
    port = root.create_port(1)
    with refused(fix):
        set_attr(port, group, name, value)


def test_tsas_follows_trtype(root):
    port = root.create_port(1)
    port.addr_trtype = "tcp"
    with refused("no TLS"):
        port.addr_tsas = "tls1.3"
    port.addr_tsas = "none"
    port.addr_trtype = "rdma"
    assert port.addr_tsas == "connected"
    with refused("offers only 'connected'"):
        port.addr_tsas = "none"
    port.addr_trtype = "loop"
    assert port.addr_tsas == ""


# -- locks: enabled namespaces, enabled ports, enabled referrals --------------------

NS_WRITES = [("device", "path", "/tmp/other"), ("device", "uuid", "5d2f7c9a-1e3b-4c6d-8a9f-0b1c2d3e4f50"),
             ("device", "nguid", "3a1b5c7d-9e0f-4a2b-8c4d-6e8f0a1b2c3d"),
             ("device", "size", "1M"), ("device", "block_size", "4096"),
             ("device", "backend", "file"), ("device", "create", "1"), ("ana", "grpid", "2"),
             ("", "buffered_io", "1"), ("", "p2pmem", "0")]


@pytest.mark.parametrize("group, name, value", NS_WRITES)
def test_namespace_attrs_refused_while_enabled(root, group, name, value):
    _, ns = ready_ns(root)
    ns.enable = True
    before = list_attrs(ns, group)
    with refused("disable the namespace first"):
        set_attr(ns, group, name, value)
    assert list_attrs(ns, group) == before
    ns.enable = False
    set_attr(ns, group, name, value)


def test_enable_needs_a_device(root, spy):
    ns = root.create_subsystem(SUB).create_namespace(1)
    with refused("set device_path"):
        ns.enable = True
    ns.device_backend = "memory"
    with refused("set device_size"):
        ns.enable = True
    ns.device_size = 1000
    with refused("multiple of device_block_size"):
        ns.enable = True
    assert "ns_enable" not in spy.names()
    ns.device_size = "1M"
    ns.enable = True
    assert ns.enable is True
    ns.enable = False
    ns.device_backend = "file"
    ns.device_path = "/tmp/new.img"
    ns.device_size = None
    ns.device_create = True
    with refused("device_create needs device_size"):
        ns.enable = True


IDENTITY_WRITES = [("serial", "SN-2"), ("model", "other model"), ("firmware", "2.0"),
                   ("ieee_oui", "0x001b44"), ("version", "1.4")]


@pytest.mark.parametrize("name, value", IDENTITY_WRITES)
def test_identity_refused_once_a_host_identified(root, spy, name, value):
    s = root.create_subsystem(SUB)
    set_attr(s, "attr", name, value)  # writable until a host identifies a controller
    assert not s.discovered
    s.mark_discovered()
    known = get_attr(s, "attr", name)
    with refused(rf"^subsystem {SUB} has been identified by a host, so attr_{name} cannot "
                 rf"change \(hosts know it as '{known}'\); delete and re-create the "
                 "subsystem to change it$"):
        set_attr(s, "attr", name, known)  # even the same value, as the kernel
    assert get_attr(s, "attr", name) == known
    # what is not part of the identity stays writable
    s.attr_allow_any_host = True
    s.attr_cntlid_min = 5
    s.attr_qid_max = 4
    root.delete_subsystem(SUB)
    again = root.create_subsystem(SUB)
    assert not again.discovered
    set_attr(again, "attr", name, value)


def test_qid_max_change_reported(root, spy):
    s = root.create_subsystem(SUB)
    s.attr_qid_max = 4
    s.attr_qid_max = 4  # unchanged: no hook
    s.mark_discovered()  # the queue limit is not part of the identity
    s.attr_qid_max = 128
    assert spy.calls == [("subsys_queues_changed", SUB)] * 2


def ready_port(root, portid=1):
    port = rdma_port(root, portid)
    root.subsystems.get(SUB) or root.create_subsystem(SUB)
    port.link_subsystem(SUB)
    return port


@pytest.mark.parametrize("group, name, value", [
    ("addr", "trtype", "tcp"), ("addr", "adrfam", "ipv6"), ("addr", "traddr", "10.0.0.2"),
    ("addr", "trsvcid", "4421"), ("addr", "treq", "required"),
    ("param", "inline_data_size", "0"), ("param", "max_queue_size", "64"),
])
def test_port_attrs_refused_while_linked(root, group, name, value):
    port = ready_port(root)
    with refused("unlink its subsystems first"):
        set_attr(port, group, name, value)
    port.unlink_subsystem(SUB)
    set_attr(port, group, name, value)
    assert get_attr(port, group, name) == value


def test_allow_p2pmem_writable_while_linked(root, spy):
    port = ready_port(root)
    spy.calls.clear()
    port.attr_allow_p2pmem = True
    assert get_attr(port, "attr", "allow_p2pmem") == "1"
    assert spy.calls == [("port_changed", 1)]


def test_referral_locked_while_enabled(root, spy):
    ref = root.create_port(1).create_referral("r")
    ref.addr_trtype = "rdma"
    ref.portid = 2
    assert ref.addr_portid == 2 and get_attr(ref, "addr", "portid") == "2"
    spy.calls.clear()
    ref.enable = True
    assert spy.calls == [("discovery_changed",)]
    with refused("disable the referral first"):
        ref.addr_traddr = "10.0.0.9"
    ref.enable = False
    ref.addr_traddr = "10.0.0.9"


# -- port enable checks (what nvmet_enable_port would reject) -------------------------

@pytest.mark.parametrize("setup, fix", [
    ({}, "set it to rdma, tcp or loop"),
    ({"addr_trtype": "rdma"}, "set it to ipv4 or ipv6 or ib"),
    ({"addr_trtype": "tcp", "addr_adrfam": "ib"}, "set it to ipv4 or ipv6"),
    ({"addr_trtype": "rdma", "addr_adrfam": "ipv4", "addr_traddr": "host"}, "not an ipv4"),
    ({"addr_trtype": "rdma", "addr_adrfam": "ipv6", "addr_traddr": "10.0.0.1"}, "fix addr_adrfam"),
    ({"addr_trtype": "tcp", "addr_adrfam": "ipv4", "addr_traddr": "0.0.0.0",
      "addr_trsvcid": "nvme"}, "e.g. 4420"),
])
def test_first_link_checks_address(root, spy, setup, fix):
    port = root.create_port(1)
    for key, value in setup.items():
        setattr(port, key, value)
    root.create_subsystem(SUB)
    with refused(fix):
        port.link_subsystem(SUB)
    assert port.subsystems == [] and "port_add_subsys" not in spy.names()


def test_loop_and_ipv6_ports_link(root):
    root.create_subsystem(SUB)
    loop = root.create_port(1)
    loop.addr_trtype = "loop"
    loop.link_subsystem(SUB)
    tcp = root.create_port(2)
    tcp.addr_trtype, tcp.addr_adrfam, tcp.addr_traddr = "tcp", "ipv6", "::"
    tcp.link_subsystem(SUB)
    assert loop.subsystems == [SUB] == tcp.subsystems


# -- links, hosts, access -----------------------------------------------------------

def test_link_rules(root, spy):
    port = rdma_port(root)
    with refused("create it before linking"):
        port.link_subsystem(SUB)
    root.create_subsystem(SUB)
    port.link_subsystem(SUB)
    with refused("already linked"):
        port.link_subsystem(SUB)
    with refused("not linked.*linked: " + SUB):
        port.unlink_subsystem(SUB2)
    assert spy.names() == ["port_changed"] * 3 + ["port_add_subsys", "discovery_changed"]


def test_link_veto_leaves_no_link(root, spy):
    port = rdma_port(root)
    root.create_subsystem(SUB)
    spy.veto_link = True
    with refused("address in use"):
        port.link_subsystem(SUB)
    assert port.subsystems == []
    assert "discovery_changed" not in spy.names()
    port.addr_trsvcid = "4421"  # still unlinked, so still writable
    spy.veto_link = False
    port.link_subsystem(SUB)
    assert port.subsystems == [SUB]


def test_allowed_hosts_rules(root, spy):
    s = root.create_subsystem(SUB)
    with refused("create it under /hosts first"):
        s.add_allowed_host(HOST)
    root.create_host(HOST)
    spy.calls.clear()
    s.add_allowed_host(HOST)
    assert spy.calls == [("subsys_hosts_changed", SUB), ("discovery_changed",)]
    with refused("already allowed"):
        s.add_allowed_host(HOST)
    assert s.allows_host(HOST) and not s.allows_host(HOST2)
    with refused("remove them from allowed_hosts first"):
        s.attr_allow_any_host = True
    s.remove_allowed_host(HOST)
    with refused("not in the allowed_hosts"):
        s.remove_allowed_host(HOST)
    s.attr_allow_any_host = True
    assert s.allows_host(HOST2)
    root.create_host(HOST2)
    with refused("set allow_any_host to 0"):
        s.add_allowed_host(HOST2)


def test_allowed_hosts_is_a_copy(root):
    s = root.create_subsystem(SUB)
    root.create_host(HOST)
    s.add_allowed_host(HOST)
    s.allowed_hosts.clear()
    assert s.allowed_hosts == [HOST]
    with pytest.raises(TypeError):
        root.subsystems["x"] = s  # type: ignore[index]


def test_delete_host_still_allowed_refused(root):
    s = root.create_subsystem(SUB)
    root.create_host(HOST)
    s.add_allowed_host(HOST)
    with refused(f"still allowed by {SUB}; remove it from their allowed_hosts first"):
        root.delete_host(HOST)
    s.remove_allowed_host(HOST)
    root.delete_host(HOST)
    assert dict(root.hosts) == {}


def test_delete_linked_subsystem_refused(root):
    port = ready_port(root)
    with refused("linked to port 1; unlink it from those ports first"):
        root.delete_subsystem(SUB)
    port.unlink_subsystem(SUB)
    root.delete_subsystem(SUB)


def test_delete_missing_objects_name_what_exists(root):
    root.create_subsystem(SUB)
    with refused(f"existing: {SUB}"):
        root.delete_subsystem(SUB2)
    with refused("existing: .none."):
        root.delete_port(9)
    with refused("existing: .none."):
        root.delete_host(HOST)
    with refused("existing: .none."):
        root.subsystems[SUB].delete_namespace(1)


def test_deleted_object_refuses_changes(root):
    s, ns = ready_ns(root)
    s.delete_namespace(1)
    with refused("was deleted"):
        ns.device_path = "/tmp/x"


def test_unknown_attribute_names_listed(root):
    s, ns = ready_ns(root)
    port = root.create_port(1)
    with refused("unknown attribute 'bogus'.*valid: allow_any_host, cntlid_max"):
        set_attr(s, "attr", "bogus", "1")
    with refused("no attribute group 'nope'; groups: 'device', 'ana', ''"):
        get_attr(ns, "nope", "x")
    with refused("has no attribute 'device_pth'; valid: device_path"):
        ns.device_pth = "/tmp/x"
    with refused("valid: adrfam, traddr, treq, trsvcid, trtype, tsas"):
        get_attr(port, "addr", "portid")


def test_generic_access(root):
    s, ns = ready_ns(root)
    port = root.create_port(1)
    ref = port.create_referral("r")
    assert attr_groups(s) == ["attr"]
    assert attr_groups(ns) == ["device", "ana", ""]
    assert attr_groups(port) == ["addr", "param", "attr"]
    assert attr_groups(ref) == ["addr", ""]
    assert attr_groups(root.create_host(HOST)) == []
    assert list_attrs(ns, "") == {"enable": "0", "buffered_io": "0", "p2pmem": "1"}
    assert set(list_attrs(port, "param")) == {"inline_data_size", "max_queue_size", "pi_enable"}
    assert attr_choices(port, "addr", "trtype") == ["rdma", "tcp", "loop"]
    assert attr_choices(ref, "addr", "trtype") == ["rdma", "tcp", "loop", "fc"]
    assert attr_choices(port, "addr", "treq") == ["not specified", "required", "not required"]
    assert attr_choices(ns, "", "enable") == ["0", "1"]
    assert attr_choices(ns, "device", "backend")[0] == "auto"
    assert attr_choices(s, "attr", "serial") is None


def test_lookup(root):
    s, ns = ready_ns(root)
    root.create_host(HOST)
    s.add_allowed_host(HOST)
    port = ready_port(root)
    ref = port.create_referral("r")
    assert lookup(root, "/") is root
    assert lookup(root, f"/subsystems/{SUB}") is s
    assert lookup(root, f"/subsystems/{SUB}/namespaces/1") is ns
    assert lookup(root, f"/subsystems/{SUB}/allowed_hosts/{HOST}") is root.hosts[HOST]
    assert lookup(root, f"/ports/1/subsystems/{SUB}") is s
    assert lookup(root, "/ports/1/referrals/r") is ref
    assert list(lookup(root, "/ports")) == [1]
    with refused("no '2' under /subsystems/.*/namespaces; there: 1"):
        lookup(root, f"/subsystems/{SUB}/namespaces/2")
    with refused("there: hosts, ports, subsystems"):
        lookup(root, "/targets")


# -- hooks: order, veto, teardown -----------------------------------------------------

def test_enable_veto_keeps_namespace_disabled(root, spy):
    _, ns = ready_ns(root)
    spy.veto_enable = True
    with refused("fix device_path"):
        ns.enable = True
    assert ns.enable is False and get_attr(ns, "", "enable") == "0"
    ns.device_path = "/tmp/fixed"  # still writable: it never became enabled
    spy.veto_enable = False
    ns.enable = True
    ns.enable = True  # already enabled: no second hook call
    assert spy.names().count("ns_enable") == 2


def test_delete_and_clear_call_hooks_in_reverse_dependency_order(root, spy):
    s, ns = ready_ns(root)
    ns.enable = True
    root.create_host(HOST)
    s.add_allowed_host(HOST)
    port = ready_port(root)
    ref = port.create_referral("r")
    ref.enable = True
    spy.calls.clear()
    root.clear()
    assert spy.calls == [
        ("port_remove_subsys", 1, SUB), ("discovery_changed",),
        ("discovery_changed",),  # referral disabled
        ("ns_disable", SUB, 1),
        ("subsys_hosts_changed", SUB), ("discovery_changed",),
    ]
    assert root.is_empty()


def test_port_attribute_changes_reported(root, spy):
    port = root.create_port(1)
    port.addr_trtype = "rdma"
    port.addr_trtype = "rdma"  # unchanged: no hook
    set_attr(port, "param", "inline_data_size", "8192")
    assert spy.calls == [("port_changed", 1), ("port_changed", 1)]


def test_allow_any_host_change_reported(root, spy):
    s = root.create_subsystem(SUB)
    s.attr_allow_any_host = True
    assert spy.calls == [("subsys_hosts_changed", SUB), ("discovery_changed",)]


# -- JSON: nvmetcli fixtures, round trips, errors --------------------------------------

@pytest.mark.parametrize("name", ["rdma.json", "loop.json"])
def test_nvmetcli_file_loads_unchanged(name, tmp_path):
    path = FIXTURES / name
    root = Root.load(path)
    assert root.to_dict() == json.loads(path.read_text())
    out = tmp_path / name
    root.save(out)
    assert out.read_bytes() == path.read_bytes()  # byte for byte, as nvmetcli writes it
    assert os.stat(out).st_mode & 0o777 == 0o600


def test_rdma_fixture_contents():
    root = Root.load(FIXTURES / "rdma.json")
    s = root.subsystems["nqn.2014-08.com.example:nvme-rdma-disk1"]
    assert s.attr_serial == "9a3c5e7f1b2d4068" and s.attr_model == "Linux"
    assert [ns.enable for ns in s.namespaces.values()] == [True, False]
    assert s.namespaces[1].device_path == "/var/lib/nvmet/disk1.img"
    port = root.ports[1]
    assert port.addr_trtype == "rdma" and port.param_inline_data_size == -1
    assert port.resolved_inline_data_size() == 4096
    assert port.referrals["peer-target"].enable is True
    assert port.referrals["peer-target"].portid == 2
    assert s.allows_host("nqn.2014-08.com.example:client-b")


def test_load_calls_hooks_in_dependency_order(spy):
    root = Root.load(FIXTURES / "rdma.json", hooks=spy)
    assert root.hooks is spy
    names = spy.names()
    assert names.index("ns_enable") < names.index("port_add_subsys")
    assert names.index("subsys_hosts_changed") < names.index("port_add_subsys")
    assert names.count("ns_enable") == 1


def test_extensions_saved_only_when_not_default(root):
    _, ns = ready_ns(root)
    port = rdma_port(root)
    d = root.to_dict()
    assert set(d["subsystems"][0]["namespaces"][0]) == {"ana", "ana_grpid", "device",
                                                         "enable", "nsid"}
    assert set(d["subsystems"][0]["namespaces"][0]["device"]) == {"nguid", "path", "uuid"}
    assert "attr" not in d["ports"][0]
    ns.device_backend, ns.device_size, ns.device_block_size = "memory", "64M", 4096
    ns.device_create, ns.buffered_io, ns.p2pmem = True, True, "0000:03:00.0"
    port.attr_allow_p2pmem = True
    d = root.to_dict()
    nsd = d["subsystems"][0]["namespaces"][0]
    assert nsd["device"] == {"nguid": ns.device_nguid, "path": "/tmp/ns1.img",
                             "uuid": ns.device_uuid, "backend": "memory",
                             "size": str(64 << 20), "block_size": "4096", "create": "1"}
    assert nsd["buffered_io"] == 1 and nsd["p2pmem"] == "0000:03:00.0"
    assert d["ports"][0]["attr"] == {"allow_p2pmem": "1"}
    again = Root()
    again.restore(d)
    assert again.to_dict() == d


def test_save_restore_save_identical(root, tmp_path):
    s, ns = ready_ns(root)
    ns.enable = True
    root.create_host(HOST)
    s.add_allowed_host(HOST)
    port = ready_port(root)
    port.create_referral("r").addr_trtype = "tcp"
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    root.save(a)
    Root.load(a).save(b)
    assert a.read_bytes() == b.read_bytes()


def test_restore_accepts_json_value_variants():
    doc = {"subsystems": [{"nqn": SUB, "attr": {"allow_any_host": 1, "qid_max": 8},
                           "namespaces": [{"nsid": "2", "enable": True,
                                           "device": {"path": "/tmp/a", "size": 4096},
                                           "resv": {"enable": "0"}}],
                           "passthru": [{"device": {"path": "(null)"}, "enable": 0}]}],
           "ports": [{"portid": "5", "addr": {"trtype": "loop"}, "param": {"mdts": "-1"},
                      "subsystems": [SUB]}]}
    root = Root()
    assert root.restore(doc) == []
    s = root.subsystems[SUB]
    assert s.attr_allow_any_host is True and s.attr_qid_max == 8
    assert s.namespaces[2].enable and s.namespaces[2].device_size == 4096
    assert root.ports[5].subsystems == [SUB]


def test_restore_reports_every_error_with_json_path():
    doc = {"hosts": [{"nqn": "bad/x"}, {}],
           "subsystems": [{"nqn": SUB, "attr": {"serial": "", "colour": "blue"},
                           "allowed_hosts": ["nqn.2024-01.io.example:nobody"],
                           "namespaces": [{"nsid": 1, "device": {"path": "/tmp/a"}},
                                          {"nsid": 2, "device": {"path": 7}, "enable": 1}]}],
           "ports": [{"portid": 1, "addr": {"trtype": "fc"}, "subsystems": [SUB],
                      "ana_groups": [{"grpid": 2, "ana": {"state": "optimized"}}]}],
           "extra": 1}
    seen: list[str] = []
    errors = Root().restore(doc, source="cfg.json", on_error=seen.append)
    assert errors == seen
    text = "\n".join(errors)
    for expected in [
        "cfg.json: (top).extra: unknown key 'extra'; valid: hosts, ports, subsystems",
        "cfg.json: hosts[0].nqn: host NQN 'bad/x' contains '/' or NUL",
        "cfg.json: hosts[1]: 'nqn' is missing",
        "cfg.json: subsystems[0].attr.serial: ",
        "cfg.json: subsystems[0].attr.colour: unknown attribute 'colour'",
        "cfg.json: subsystems[0].allowed_hosts[0]: no host nqn.2024-01.io.example:nobody",
        "cfg.json: subsystems[0].namespaces[1].device.path: ",
        "cfg.json: subsystems[0].namespaces[1].enable: cannot enable",
        "cfg.json: ports[0].addr.trtype: ",
        "cfg.json: ports[0].ana_groups[0]: only the default ANA group 1",
        "cfg.json: ports[0].subsystems[0]: cannot enable port 1",
    ]:
        assert expected in text, expected
    assert len(errors) == 11


def test_restore_default_raises_one_error_listing_all():
    doc = {"subsystems": [{"nqn": "x/1"}, {"nqn": "y/1"}]}
    with pytest.raises(ConfigError) as info:
        Root().restore(doc, source="s.json")
    msg = str(info.value)
    assert msg.startswith("2 error(s) in s.json:")
    assert "subsystems[0].nqn" in msg and "subsystems[1].nqn" in msg


def test_restore_refuses_non_empty_tree(root):
    root.create_host(HOST)
    with refused("clear.. it first"):
        root.restore({})


def test_restore_type_errors():
    errors = Root().restore({"hosts": {}, "subsystems": ["x"],
                             "ports": [{"portid": True}, {"portid": 1, "addr": []}]},
                            on_error=lambda m: None)
    text = "\n".join(errors)
    assert "hosts: expected a list, found dict" in text
    assert "subsystems[0]: expected an object, found str" in text
    assert "ports[0].portid: expected an integer, found True" in text
    assert "ports[1].addr: expected an object" in text


def test_ana_grpid_must_agree():
    doc = {"subsystems": [{"nqn": SUB, "namespaces": [
        {"nsid": 1, "ana": {"grpid": "1"}, "ana_grpid": 2}]}]}
    errors = Root().restore(doc, on_error=lambda m: None)
    assert errors == [("<dict>: subsystems[0].namespaces[0].ana_grpid: ana_grpid 2 "
                       "disagrees with ana.grpid 1; make them equal")]


def test_load_errors_name_file_and_problem(tmp_path, spy):
    missing = tmp_path / "missing.json"
    with refused(f"{missing}: cannot read the configuration: No such file"):
        Root.load(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"hosts": [\n  {"nqn": }\n]}\n')
    with refused(f"{broken}: line 2 column 11: not valid JSON"):
        Root.load(broken)
    half = tmp_path / "half.json"
    doc = json.loads((FIXTURES / "rdma.json").read_text())
    doc["ports"][0]["addr"]["traddr"] = "not-an-ip"
    half.write_text(json.dumps(doc))
    with refused(f"{half}: ports\\[0\\].subsystems\\[0\\]: cannot enable port 1"):
        Root.load(half, hooks=spy)
    # A failed load tears down what it had brought up.
    assert spy.names().count("ns_enable") == spy.names().count("ns_disable") == 1


def test_atomic_save_failure_keeps_old_file(root, tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    root.create_host(HOST)
    root.save(target)
    old = target.read_bytes()
    root.create_subsystem(SUB)

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jsonfile.os, "fsync", broken_fsync)
    with refused(f"{target}: cannot save the configuration: .*No space left"):
        root.save(target)
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup", "config.json"]  # no temp
    monkeypatch.undo()
    root.save(target)
    assert SUB in target.read_text()


def test_save_creates_the_directory_keeps_the_mode_and_rotates_backups(root, tmp_path):
    target = tmp_path / "etc" / "nvmet-p2p" / "config.json"
    root.save(target)  # as nvmetcli creates /etc/nvmet
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    os.chmod(target, 0o640)
    for i in range(jsonfile.BACKUPS + 3):
        root.create_host(f"nqn.2024-01.io.example:h{i}")
        root.save(target)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640  # bare saveconfig keeps it
    backups = sorted((target.parent / "backup").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert len(backups) == jsonfile.BACKUPS
    assert len(json.loads(backups[-1].read_text())["hosts"]) == jsonfile.BACKUPS + 2


def test_saving_the_same_configuration_again_keeps_the_backups(root, tmp_path):
    target = tmp_path / "config.json"
    root.save(target)
    root.create_host("nqn.2024-01.io.example:h0")
    root.save(target)
    before = target.stat().st_mtime_ns
    for _ in range(3):  # e.g. the shell's auto_save_on_exit after a look around
        root.save(target)
    assert target.stat().st_mtime_ns == before
    assert len(list((tmp_path / "backup").iterdir())) == 1
    root.create_host("nqn.2024-01.io.example:h1")
    root.save(target)
    assert len(list((tmp_path / "backup").iterdir())) == 2
    assert "h1" in target.read_text()


def test_save_where_the_directory_cannot_be_fails_cleanly(root, tmp_path):
    (tmp_path / "file").write_text("")
    with refused("cannot save the configuration"):
        root.save(tmp_path / "file" / "config.json")
