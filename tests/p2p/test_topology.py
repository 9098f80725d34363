"""The P2P topology model against synthetic sysfs trees (host) and the VM's real /sys.

Distances are checked by hand against the kernel's calc_map_type_and_dist(): it walks the
provider's chain upward (dist_a counts steps) and, for each step, the client's chain from the
bottom (dist_b); the first function found on both chains is the common one and the distance
is dist_a + dist_b.  With none in common both chains are walked to the end: the distance is
then the number of functions on the provider's chain plus those on the client's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from nvmet_p2p.control import p2p_cli
from nvmet_p2p.p2p.topology import (
    ACS_CR,
    ACS_EC,
    ACS_RR,
    ACS_UF,
    MAP_BUS_ADDR,
    MAP_NOT_SUPPORTED,
    MAP_THRU_HOST_BRIDGE,
    Client,
    CpuSpec,
    P2pmemInfo,
    Topology,
    UnknownDeviceError,
    parse_config,
    published_p2pmem,
)
from nvmet_p2p.pci import normalize_bdf
from nvmet_p2p.testbed import guest
from tests.support.sysfs_tree import (
    CLASS_ETHERNET,
    PCIE_RC_ENDPOINT,
    PCIE_ROOT_PORT,
    SysfsTree,
    make_config,
)

INTEL_CPU = "GenuineIntel:6"
ZEN3_CPU = "AuthenticAMD:25"
ACS_LINUX_DEFAULT = 0x1D  # SV | RR | CR | UF: what pci_std_enable_acs() sets with an IOMMU

SOFT_ROCE_REASON = "rxe0 is not a PCI device (soft-RoCE); it cannot be used for peer-to-peer DMA"


def nic(tree: SysfsTree, parent, dev: int = 0, fn: int = 0, **kw):
    return tree.endpoint(parent, dev, fn, vendor=0x15B3, device=0x1017,
                         class_code=CLASS_ETHERNET, **kw)


@pytest.fixture
def switch_tree(tmp_path: Path):
    """q35 host bridge; root port 00:01.0 -> switch (USP 01:00.0, DSPs 02:00.0 and 02:01.0);
    NVMe 03:00.0 (nvme0n1) under DSP0, NIC 04:00.0 (mlx5_0, eth0) under DSP1."""

    def build(dsp_acs: int | None = None, hb_device: int = 0x29C0):
        t = SysfsTree(tmp_path / "sys")
        rb = t.root_bus()
        t.host_bridge(rb, device=hb_device)
        rp = t.root_port(rb, 1)
        usp, (dsp0, dsp1) = t.switch(rp, 2, acs_ctrl=dsp_acs)
        nvme = t.endpoint(dsp0)
        card = nic(t, dsp1)
        t.infiniband("mlx5_0", card)
        t.netdev("eth0", card)
        t.block("nvme0n1", nvme)
        return t, {"rp": rp, "usp": usp, "dsp0": dsp0, "dsp1": dsp1, "nvme": nvme, "nic": card}

    return build


# --- reading sysfs --------------------------------------------------------------------------


def test_tree_shape_is_read_from_resolved_paths(switch_tree):
    t, d = switch_tree()
    topo = Topology(t.root, cpu=INTEL_CPU)
    assert [x.bdf for x in topo.upstream_chain(d["nic"].bdf)] == [
        "0000:04:00.0", "0000:02:01.0", "0000:01:00.0", "0000:00:01.0"]
    rp = topo.pci_dev("00:01.0")
    assert rp.upstream is None and rp.pcie_type == PCIE_ROOT_PORT
    assert rp.root_bus.name == "pci0000:00"
    hb = topo.host_bridge(rp.root_bus)
    assert hb is not None and hb.ids == "8086:29c0"


def test_acs_control_is_found_behind_another_extended_capability():
    cfg = make_config(0x104C, 0x8233, 0x060400, pcie_type=6, acs_ctrl=ACS_LINUX_DEFAULT)
    assert parse_config(cfg) == (6, ACS_LINUX_DEFAULT, True)
    no_acs = make_config(0x1B36, 0x0010, 0x010802, pcie_type=0, acs_ctrl=None)
    assert parse_config(no_acs) == (0, None, True)


def test_looping_extended_capability_list_terminates():
    cfg = bytearray(make_config(1, 2, 0x060400, pcie_type=6, acs_ctrl=None))
    cfg[0x100:0x104] = (0x0001 | 1 << 16 | 0x100 << 20).to_bytes(4, "little")  # next = itself
    assert parse_config(bytes(cfg)) == (6, None, True)


def test_header_only_config_is_flagged_not_guessed():
    assert parse_config(make_config(1, 2, 0x060400, pcie_type=6, acs_ctrl=ACS_RR, length=64)) == (
        None, None, False)


def test_bdf_spellings():
    assert normalize_bdf("03:00.0") == "0000:03:00.0"
    assert normalize_bdf("10000:E0:06.0") == "10000:e0:06.0"  # VMD domains are wider
    assert normalize_bdf("03:00.8") is None
    assert normalize_bdf("eth0") is None


def test_cpuinfo_parsing(tmp_path: Path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\n\n"
                    "processor\t: 1\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n")
    cpu = CpuSpec.from_cpuinfo(info)
    assert cpu == CpuSpec("AuthenticAMD", 23) and cpu.supports_p2pdma
    assert not CpuSpec.from_cpuinfo(tmp_path / "missing").supports_p2pdma
    assert CpuSpec.parse("AuthenticAMD:0x17").supports_p2pdma
    assert not CpuSpec.parse("AuthenticAMD:21").supports_p2pdma  # 0x15: pre-Zen
    assert not CpuSpec.parse("HygonGenuine:24").supports_p2pdma  # the kernel checks AMD only
    with pytest.raises(ValueError):
        CpuSpec.parse("AuthenticAMD")


# --- distance and map type ------------------------------------------------------------------


def test_nic_and_nvme_behind_one_switch(switch_tree):
    t, d = switch_tree()
    dec = Topology(t.root, cpu=INTEL_CPU).distance(d["nvme"].bdf, ["mlx5_0"])
    # provider chain: nvme(0) dsp0(1) usp(2); client chain: nic(0) dsp1(1) usp(2) -> 2 + 2
    assert (dec.map_type, dec.distance) == (MAP_BUS_ADDR, 4)
    assert dec.clients[0].path == (
        "0000:03:00.0", "0000:02:00.0", "0000:01:00.0", "0000:02:01.0", "0000:04:00.0")
    assert dec.reasons == () and dec.supported


@pytest.mark.parametrize("cpu,hb,expected", [
    (INTEL_CPU, 0x29C0, MAP_NOT_SUPPORTED),
    (INTEL_CPU, 0x2020, MAP_THRU_HOST_BRIDGE),  # Skylake-E: whitelisted
    (ZEN3_CPU, 0x29C0, MAP_THRU_HOST_BRIDGE),
])
def test_acs_redirect_on_downstream_ports(switch_tree, cpu, hb, expected):
    t, d = switch_tree(dsp_acs=ACS_LINUX_DEFAULT, hb_device=hb)
    dec = Topology(t.root, cpu=cpu).distance(d["nvme"].bdf, [d["nic"].bdf])
    assert dec.map_type == expected
    # The kernel keeps the switch distance when ACS sends the traffic up to the root.
    assert dec.distance == (None if expected == MAP_NOT_SUPPORTED else 4)
    assert dec.clients[0].acs_redirect == ("0000:02:00.0", "0000:02:01.0")
    text = "\n".join(dec.reasons)
    assert "ACS redirect is set on 0000:02:00.0, 0000:02:01.0" in text
    assert "pci=disable_acs_redir=0000:02:00.0;0000:02:01.0" in text
    if expected == MAP_NOT_SUPPORTED:
        assert "host bridge 8086:29c0 (0000:00:00.0) is not in the P2PDMA whitelist" in text


@pytest.mark.parametrize("ctrl,redirects", [
    (ACS_UF | 0x1, False),  # source validation + upstream forwarding alone do not redirect
    (ACS_RR, True),
    (ACS_CR, True),
    (ACS_EC, True),
])
def test_which_acs_bits_redirect(switch_tree, ctrl, redirects):
    t, d = switch_tree(dsp_acs=ctrl)
    dec = Topology(t.root, cpu=INTEL_CPU).distance(d["nvme"].bdf, [d["nic"].bdf])
    assert (dec.map_type == MAP_BUS_ADDR) is not redirects


def test_acs_on_the_common_upstream_port_counts(tmp_path: Path):
    # The kernel tests the common function too (it is the last one on the provider's walk).
    t = SysfsTree(tmp_path)
    rb = t.root_bus()
    t.host_bridge(rb)
    usp, (dsp0, dsp1) = t.switch(t.root_port(rb, 1), 2, usp_acs_ctrl=ACS_RR)
    a, b = t.endpoint(dsp0), t.endpoint(dsp1)
    dec = Topology(t.root, cpu=ZEN3_CPU).distance(a.bdf, [b.bdf])
    assert dec.clients[0].acs_redirect == (usp.bdf,)
    assert (dec.map_type, dec.distance) == (MAP_THRU_HOST_BRIDGE, 4)


def two_root_ports(tmp_path: Path, hb_device: int):
    t = SysfsTree(tmp_path)
    rb = t.root_bus()
    t.host_bridge(rb, device=hb_device)
    nvme = t.endpoint(t.root_port(rb, 1))
    rp2 = t.root_port(rb, 2)
    _, (dsp,) = t.switch(rp2, 1)
    card = nic(t, dsp)
    t.infiniband("mlx5_0", card)
    return t, nvme, card


def test_two_root_ports_on_a_whitelisted_intel_host_bridge(tmp_path: Path):
    t, nvme, _card = two_root_ports(tmp_path, 0x2020)
    dec = Topology(t.root, cpu=INTEL_CPU).distance(nvme.bdf, ["mlx5_0"])
    # nothing in common: provider chain [nvme, rp1] = 2, client chain [nic, dsp, usp, rp2] = 4
    assert (dec.map_type, dec.distance) == (MAP_THRU_HOST_BRIDGE, 6)
    assert dec.clients[0].path == (
        "0000:01:00.0", "0000:00:01.0", "pci0000:00", "0000:00:02.0", "0000:02:00.0",
        "0000:03:00.0", "0000:04:00.0")
    assert any("whitelist has host bridge 8086:2020" in r for r in dec.reasons)


def test_non_whitelisted_host_bridge_intel_cpu_vs_amd_zen(tmp_path: Path):
    t, nvme, card = two_root_ports(tmp_path, 0x29C0)
    intel = Topology(t.root, cpu=INTEL_CPU).distance(nvme.bdf, [card.bdf])
    assert (intel.map_type, intel.distance) == (MAP_NOT_SUPPORTED, None)
    assert any("8086:29c0" in r and "not in the P2PDMA whitelist" in r
               and "GenuineIntel family 0x6" in r for r in intel.reasons)
    amd = Topology(t.root, cpu=ZEN3_CPU).distance(nvme.bdf, [card.bdf])
    assert (amd.map_type, amd.distance) == (MAP_THRU_HOST_BRIDGE, 6)
    old_amd = Topology(t.root, cpu="AuthenticAMD:21").distance(nvme.bdf, [card.bdf])
    assert old_amd.map_type == MAP_NOT_SUPPORTED


def two_host_bridges(tmp_path: Path, device: int):
    t = SysfsTree(tmp_path)
    ends = []
    for bus in (0x00, 0x80):
        rb = t.root_bus(0, bus)
        t.host_bridge(rb, device=device)
        ends.append(t.endpoint(t.root_port(rb, 1)))
    return t, ends


def test_same_host_bridge_only_entries(tmp_path: Path):
    t, (a, b) = two_host_bridges(tmp_path, 0x3C00)
    topo = Topology(t.root, cpu=INTEL_CPU)
    across = topo.distance(a.bdf, [b.bdf])
    assert across.map_type == MAP_NOT_SUPPORTED
    assert any("whitelisted only for devices under the same host bridge" in r
               for r in across.reasons)
    assert across.clients[0].path[2:4] == ("pci0000:00", "pci0000:80")
    # two root ports under the one 0x3c00 host bridge are fine
    c = t.endpoint(t.root_port(t.root_bus(0, 0), 2))
    assert topo.distance(a.bdf, [c.bdf]).map_type == MAP_THRU_HOST_BRIDGE


def test_two_whitelisted_host_bridges(tmp_path: Path):
    t, (a, b) = two_host_bridges(tmp_path, 0x2030)
    dec = Topology(t.root, cpu=INTEL_CPU).distance(a.bdf, [b.bdf])
    assert (dec.map_type, dec.distance) == (MAP_THRU_HOST_BRIDGE, 4)


def test_host_bridge_may_be_a_root_port_or_missing(tmp_path: Path):
    t = SysfsTree(tmp_path / "rp")
    rb = t.root_bus()
    a = t.endpoint(t.root_port(rb, 1, device=0x2030))  # Skylake: no 00.0, root port first
    b = t.endpoint(t.root_port(rb, 2, device=0x2030))
    assert Topology(t.root, cpu=INTEL_CPU).distance(a.bdf, [b.bdf]).map_type == MAP_THRU_HOST_BRIDGE

    t = SysfsTree(tmp_path / "none")
    rb = t.root_bus()
    a = t.endpoint(rb, 3, vendor=0x8086, device=0x2020)  # first is an endpoint at 03.0
    b = t.endpoint(rb, 4)
    dec = Topology(t.root, cpu=INTEL_CPU).distance(a.bdf, [b.bdf])
    assert dec.map_type == MAP_NOT_SUPPORTED
    assert any("has no host bridge at 00.0 and no root port first" in r for r in dec.reasons)


def test_functions_of_one_device_and_the_same_function(switch_tree):
    t, d = switch_tree()
    f1 = t.endpoint(d["dsp0"], 0, 1)
    topo = Topology(t.root, cpu=INTEL_CPU)
    nvme = d["nvme"].bdf
    # fn0 -> dsp0 (dist_a 1); fn1 -> dsp0 (dist_b 1)
    assert (topo.distance(nvme, [f1.bdf]).map_type, topo.distance(nvme, [f1.bdf]).distance) == (
        MAP_BUS_ADDR, 2)
    same = topo.distance(nvme, [nvme])
    assert (same.map_type, same.distance, same.clients[0].path) == (MAP_BUS_ADDR, 0, (nvme,))
    by_disk = topo.distance(nvme, ["nvme0n1"])
    assert (by_disk.clients[0].client.bdf, by_disk.distance) == (nvme, 0)


def test_functions_of_one_root_bus_device_go_through_the_host_bridge(tmp_path: Path):
    # Integrated endpoints have no upstream bridge: the kernel finds nothing in common and
    # counts 1 + 1 through the host bridge.
    t = SysfsTree(tmp_path)
    rb = t.root_bus()
    t.host_bridge(rb)
    f0 = t.endpoint(rb, 4, 0, pcie_type=PCIE_RC_ENDPOINT)
    f1 = t.endpoint(rb, 4, 1, pcie_type=PCIE_RC_ENDPOINT)
    dec = Topology(t.root, cpu=ZEN3_CPU).distance(f0.bdf, [f1.bdf])
    assert (dec.map_type, dec.distance) == (MAP_THRU_HOST_BRIDGE, 2)
    assert dec.clients[0].path == (f0.bdf, "pci0000:00", f1.bdf)


# --- clients --------------------------------------------------------------------------------


@pytest.mark.parametrize("old_kernel_layout", [False, True])
def test_rxe_is_never_a_pci_client(switch_tree, old_kernel_layout):
    t, d = switch_tree()
    t.rxe("rxe0", "eth0", under=d["nic"] if old_kernel_layout else None)
    topo = Topology(t.root, cpu=ZEN3_CPU)
    client = topo.resolve_client("rxe0")
    assert client.bdf is None and client.via == "eth0"
    assert client.reason == SOFT_ROCE_REASON
    dec = topo.distance(d["nvme"].bdf, ["rxe0", "nvme0n1"])
    assert (dec.map_type, dec.distance) == (MAP_NOT_SUPPORTED, None)
    assert dec.reasons == (SOFT_ROCE_REASON,)
    assert dec.clients[1].map_type == MAP_BUS_ADDR  # the namespace itself was fine


def test_siw_and_unnamed_virtual_rdma(switch_tree):
    t, d = switch_tree()
    t.rxe("siw0", "eth0", parent_file=False)
    t.rxe("roce_lab", "eth0", parent_file=False)
    topo = Topology(t.root)
    assert "(soft-iWARP)" in (topo.resolve_client("siw0").reason or "")
    assert "(software RDMA)" in (topo.resolve_client("roce_lab").reason or "")
    assert topo.resolve_client("mlx5_0").bdf == d["nic"].bdf


def test_file_backed_namespace_client(switch_tree):
    t, d = switch_tree()
    dec = Topology(t.root, cpu=ZEN3_CPU).distance(d["nvme"].bdf, ["mlx5_0", "/srv/ns1.img"])
    assert (dec.map_type, dec.distance) == (MAP_NOT_SUPPORTED, None)
    assert dec.clients[0].map_type == MAP_BUS_ADDR
    assert dec.clients[1].client.kind == "file"
    assert any("file-backed namespace cannot be used for peer-to-peer DMA" in r
               for r in dec.reasons)


def test_block_and_net_resolution(switch_tree):
    t, d = switch_tree()
    t.partition(t.root / "class/block/nvme0n1", "nvme0n1p1")
    t.block("loop0")
    t.netdev("dummy0")
    topo = Topology(t.root)
    assert topo.resolve_client("nvme0n1p1").bdf == d["nvme"].bdf
    assert topo.resolve_client("/dev/nvme0n1").bdf == d["nvme"].bdf
    assert topo.resolve_client("eth0") == Client("eth0", "net", d["nic"].bdf)
    for virtual in ("loop0", "dummy0"):
        c = topo.resolve_client(virtual)
        assert c.bdf is None and "is not a PCI device" in (c.reason or "")


def test_unknown_names_raise(switch_tree):
    t, _d = switch_tree()
    topo = Topology(t.root)
    with pytest.raises(UnknownDeviceError, match="no PCI device 0000:09:00.0"):
        topo.resolve_client("09:00.0")
    with pytest.raises(UnknownDeviceError, match="named 'eth9'"):
        topo.resolve_client("eth9")
    with pytest.raises(UnknownDeviceError, match="no PCI device 0000:09:00.0"):
        topo.distance("09:00.0", ["mlx5_0"])


def test_several_clients_sum_and_any_unsupported_spoils_all(tmp_path: Path):
    t, _nvme, card = two_root_ports(tmp_path, 0x29C0)
    _, (dsp0, dsp1) = t.switch(t.root_port(t.root_bus(), 3), 2)
    near_a, near_b = t.endpoint(dsp0), nic(t, dsp1)
    topo = Topology(t.root, cpu=INTEL_CPU)
    ok = topo.distance(near_a.bdf, [near_b.bdf, near_a.bdf])
    assert (ok.map_type, ok.distance) == (MAP_BUS_ADDR, 4 + 0)
    bad = topo.distance(near_a.bdf, [near_b.bdf, card.bdf])  # card needs the q35 host bridge
    assert (bad.map_type, bad.distance) == (MAP_NOT_SUPPORTED, None)
    assert [c.map_type for c in bad.clients] == [MAP_BUS_ADDR, MAP_NOT_SUPPORTED]
    amd = Topology(t.root, cpu=ZEN3_CPU).distance(near_a.bdf, [near_b.bdf, card.bdf])
    # card: provider chain [ep, dsp0, usp, rp3] = 4 + client chain [nic, dsp, usp, rp2] = 4
    assert (amd.map_type, amd.distance) == (MAP_THRU_HOST_BRIDGE, 4 + 8)


def test_no_clients_is_not_supported(switch_tree):
    t, d = switch_tree()
    dec = Topology(t.root).distance(d["nvme"].bdf, [])
    assert (dec.map_type, dec.distance) == (MAP_NOT_SUPPORTED, None)


def test_results_are_cached_per_provider_and_client(switch_tree):
    t, d = switch_tree()
    topo = Topology(t.root, cpu=INTEL_CPU)
    first = topo.distance(d["nvme"].bdf, [d["nic"].bdf])
    # Turning ACS on afterwards does not change a cached answer, as in the kernel's xarray.
    (d["dsp1"].path / "config").write_bytes(
        make_config(0x104C, 0x8233, 0x060400, pcie_type=6, acs_ctrl=ACS_RR))
    again = topo.distance(d["nvme"].bdf, [d["nic"].bdf])
    assert again.clients[0] is first.clients[0]
    fresh = Topology(t.root, cpu=INTEL_CPU).distance(d["nvme"].bdf, [d["nic"].bdf])
    assert fresh.map_type == MAP_NOT_SUPPORTED


def test_unreadable_config_space_warns(tmp_path: Path):
    t = SysfsTree(tmp_path)
    rb = t.root_bus()
    t.host_bridge(rb)
    rp = t.function(rb, 1, vendor=0x8086, device=0x2030, class_code=0x060400,
                    pcie_type=PCIE_ROOT_PORT, bridge=True, config_len=64)
    a, b = t.endpoint(rp, 0, 0), t.endpoint(rp, 0, 1)
    dec = Topology(t.root, cpu=INTEL_CPU).distance(a.bdf, [b.bdf])
    assert (dec.map_type, dec.distance) == (MAP_BUS_ADDR, 2)
    assert dec.warnings == (
        (f"{rp.bdf}: config space beyond the 64-byte header is not readable (run as root); "
        "its ACS redirect bits were assumed clear"),)


# --- providers ------------------------------------------------------------------------------


def test_published_p2pmem_parsing(switch_tree):
    t, d = switch_tree()
    t.p2pmem(d["nvme"], 64 << 20, 60 << 20)
    t.p2pmem(d["nic"], 1 << 20, published=False, allocate=False)
    broken = t.endpoint(d["dsp0"], 0, 2)
    (t.p2pmem(broken, 4096) / "size").write_text("garbage\n")
    assert published_p2pmem(t.root) == [
        P2pmemInfo("0000:03:00.0", 64 << 20, 60 << 20, True, True),
        P2pmemInfo("0000:04:00.0", 1 << 20, 1 << 20, False, False),
    ]
    assert published_p2pmem(t.root / "nowhere") == []


def test_nearest_provider_prefers_distance_and_spreads_ties(tmp_path: Path):
    t = SysfsTree(tmp_path)
    rb = t.root_bus()
    t.host_bridge(rb)
    _, dsps = t.switch(t.root_port(rb, 1), 3)
    card = nic(t, dsps[0])
    t.infiniband("mlx5_0", card)
    p1, p2 = t.endpoint(dsps[1]), t.endpoint(dsps[2])  # both 4 from the NIC
    far = t.endpoint(t.root_port(rb, 2))  # through the host bridge: 2 + 3
    topo = Topology(t.root, cpu=ZEN3_CPU)
    providers = [far.bdf, p2.bdf, p1.bdf]

    picks = {topo.nearest_provider(providers, ["mlx5_0"], random.Random(s))[0] for s in range(40)}
    assert picks == {p1.bdf, p2.bdf}
    again = [topo.nearest_provider(providers, ["mlx5_0"], random.Random(7))[0] for _ in range(3)]
    assert len(set(again)) == 1

    # a provider that is also the client wins outright (distance 0 + ...)
    bdf, dec = topo.nearest_provider(providers, [p1.bdf], random.Random(1))
    assert (bdf, dec.distance) == (p1.bdf, 0)
    infos = [P2pmemInfo(p2.bdf, 1, 1, True)]
    assert topo.nearest_provider(infos, ["mlx5_0"])[0] == p2.bdf


def test_nearest_provider_none(switch_tree):
    t, d = switch_tree()
    topo = Topology(t.root, cpu=INTEL_CPU)
    assert topo.nearest_provider([], ["mlx5_0"]) == (
        None, ["no peer-to-peer memory provider is published"])
    t.rxe("rxe0", "eth0")
    bdf, reasons = topo.nearest_provider([d["nvme"].bdf], ["rxe0"])
    assert bdf is None and reasons == [f"provider {d['nvme'].bdf}: {SOFT_ROCE_REASON}"]


# --- CLI ------------------------------------------------------------------------------------


def test_cli_text(switch_tree, capsys):
    t, _d = switch_tree(dsp_acs=ACS_LINUX_DEFAULT)
    rc = p2p_cli.main(["p2p", "distance", "--sysfs-root", str(t.root), "--cpu", ZEN3_CPU,
                       "--provider", "03:00.0", "--client", "mlx5_0"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.splitlines()[:3] == [
        "provider 0000:03:00.0: thru_host_bridge, distance 4",
        "  client mlx5_0 (0000:04:00.0): thru_host_bridge, distance 4",
        "    path 0000:03:00.0 -> 0000:02:00.0 -> 0000:01:00.0 -> 0000:02:01.0 -> 0000:04:00.0",
    ]
    assert "pci=disable_acs_redir=0000:02:00.0;0000:02:01.0" in out


def test_cli_json_and_not_supported_exit(switch_tree, capsys):
    t, d = switch_tree()
    t.rxe("rxe0", "eth0")
    rc = p2p_cli.main(["p2p", "distance", "--sysfs-root", str(t.root), "--cpu", INTEL_CPU,
                       "--provider", d["nvme"].bdf, "--client", "rxe0", "--client",
                       "nvme0n1", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == p2p_cli.EXIT_NOT_SUPPORTED
    assert {"map_type", "distance", "clients", "reasons"} <= doc.keys()
    assert (doc["map_type"], doc["distance"], doc["reasons"]) == (
        MAP_NOT_SUPPORTED, None, [SOFT_ROCE_REASON])
    assert [c["map_type"] for c in doc["clients"]] == [MAP_NOT_SUPPORTED, MAP_BUS_ADDR]
    assert doc["clients"][1]["path"] == [d["nvme"].bdf]


@pytest.mark.parametrize("argv,message", [
    (["--provider", "09:00.0", "--client", "mlx5_0"], "no PCI device 0000:09:00.0"),
    (["--provider", "03:00.0", "--client", "ib9"], "named 'ib9'"),
    (["--provider", "nvme0n1", "--client", "mlx5_0"], "'nvme0n1' is not a PCI address"),
    (["--provider", "03:00.0", "--client", "mlx5_0", "--cpu", "Intel"], "VENDOR:FAMILY"),
])
def test_cli_errors_are_one_line(switch_tree, capsys, argv, message):
    t, _ = switch_tree()
    rc = p2p_cli.main(["p2p", "distance", "--sysfs-root", str(t.root), *argv])
    err = capsys.readouterr().err
    assert rc == p2p_cli.EXIT_ERROR
    assert message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


# --- the VM's real /sys ---------------------------------------------------------------------

@pytest.mark.vm
def test_qemu_nvme_in_the_vm():
    nvmes = guest.qemu_nvmes()
    assert nvmes, "the VM has no QEMU NVMe (1b36:0010)"
    nvme = nvmes[0]
    topo = Topology("/sys")
    dev = topo.pci_dev(nvme)
    assert dev.config_readable  # the guest runs tests as root

    same = topo.distance(nvme, [nvme])
    assert (same.map_type, same.distance) == (MAP_BUS_ADDR, 0)

    # Any other function on the root bus: no common upstream bridge, so both chains count
    # (1 + 1 for two integrated functions) through QEMU's host bridge, which is q35's
    # 8086:29c0 (or i440fx's 8086:1237): neither is whitelisted, so the CPU decides.
    hb = topo.host_bridge(dev.root_bus)
    assert hb is not None and hb.ids in ("8086:29c0", "8086:1237")
    top = topo.upstream_chain(nvme)[-1]
    sibling = next(p.name for p in sorted(dev.root_bus.iterdir())
                   if normalize_bdf(p.name) and p.name not in (top.bdf, hb.bdf))
    expected_distance = len(topo.upstream_chain(nvme)) + len(topo.upstream_chain(sibling))

    zen = Topology("/sys", cpu=ZEN3_CPU).distance(nvme, [sibling])  # the host's EPYC
    assert (zen.map_type, zen.distance) == (MAP_THRU_HOST_BRIDGE, expected_distance)
    intel = Topology("/sys", cpu=INTEL_CPU).distance(nvme, [sibling])
    assert (intel.map_type, intel.distance) == (MAP_NOT_SUPPORTED, None)
    assert any(f"host bridge {hb.ids}" in r and "not in the P2PDMA whitelist" in r
               for r in intel.reasons)
    # Under TCG the guest sees QEMU's CPU model (qemu64: AuthenticAMD family 0xf, pre-Zen),
    # not the host's; whatever it is, the guest's own CPU must follow the same rule.
    guest_view = topo.distance(nvme, [sibling])
    assert guest_view.map_type == (
        MAP_THRU_HOST_BRIDGE if topo.cpu.supports_p2pdma else MAP_NOT_SUPPORTED)


def lspci_acs_redirects(bdf: str) -> bool | None:
    """What lspci decodes from ACSCtl: True/False, or None without an ACS capability."""
    out = guest.sh("lspci", "-vvv", "-s", bdf).stdout
    line = next((x for x in out.splitlines() if "ACSCtl:" in x), None)
    if line is None:
        return None
    return any(f"{flag}+" in line for flag in ("ReqRedir", "CmpltRedir", "EgressCtrl"))


@pytest.mark.vm
def test_qemu_switch_in_the_vm():
    """Needs the switch: python -m nvmet_p2p.testbed.vm run --switch -- python -m pytest -m vm
    tests/p2p/test_topology.py -k switch"""
    topo = Topology("/sys")
    behind = [b for b in guest.qemu_nvmes() if len(topo.upstream_chain(b)) == 4]
    if len(behind) < 2:
        pytest.skip("no PCIe switch with two NVMe (boot the VM with --switch)")
    a, b = behind[:2]
    dec = topo.distance(a, [b])
    # nvme -> DSP -> USP <- DSP <- nvme, as in the kernel's own comment
    assert dec.distance == 4
    usp = topo.pci_dev(dec.clients[0].path[2])
    assert usp.pcie_type == 0x5  # switch upstream port
    expected = tuple(x for x in dec.clients[0].path if lspci_acs_redirects(x))
    assert set(dec.clients[0].acs_redirect) == set(expected)
    assert dec.map_type == (MAP_BUS_ADDR if not expected else
                            MAP_THRU_HOST_BRIDGE if topo.cpu.supports_p2pdma else
                            MAP_NOT_SUPPORTED)
