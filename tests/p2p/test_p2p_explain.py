"""`nvmet-p2p p2p explain`: a decision for every port x namespace, offline from a
configuration file over a synthetic sysfs tree, and live from a daemon's control socket."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from nvmet_p2p import cli
from nvmet_p2p.backends import open_backend
from nvmet_p2p.backends.bdev import P2P_NEEDS as BDEV_NEEDS
from nvmet_p2p.backends.vfio_nvme.backend import VfioNvmeBackend
from nvmet_p2p.config.tree import Root
from nvmet_p2p.control.rpc import RpcServer
from nvmet_p2p.core.target import Target
from nvmet_p2p.p2p.explain import explain_config
from nvmet_p2p.p2p.netdev import rdma_device_of_netdev
from nvmet_p2p.p2p.policy import P2PPolicy
from nvmet_p2p.transports.loop import LoopTransport
from tests.support.p2p_machine import AMD_ZEN, INTEL, NOT_PCI, Machine

NQN = "nqn.2026-01.io.nvmet-p2p:explain"
ADDRS = {"192.0.2.1": "dummy0", "198.51.100.7": "eth0"}


@pytest.fixture
def m(tmp_path: Path) -> Machine:
    m = Machine(tmp_path / "sys")
    # the hardware NIC's GID table names its netdev, as rdma_cm sees it
    ndevs = Path(m.root) / "class/infiniband/mlx5_0/ports/1/gid_attrs/ndevs"
    ndevs.mkdir(parents=True)
    (ndevs / "0").write_text("eth0\n")
    (ndevs / "1").mkdir()  # an unreadable (unpopulated) entry is skipped, not fatal
    m.tree.block("nvme9n1", m.peer1_fn)
    return m


def port(portid: int, trtype: str, traddr: str = "", allow: bool = True) -> dict:
    addr = {"trtype": trtype, "adrfam": "ipv4" if traddr else "", "traddr": traddr,
            "trsvcid": "4420" if traddr else ""}
    return {"portid": portid, "addr": addr, "attr": {"allow_p2pmem": "1" if allow else "0"},
            "subsystems": [NQN]}


def namespace(nsid: int, backend: str, path: str, enable: bool = True, **extra: Any) -> dict:
    device = {"path": path, "backend": backend}
    if backend == "memory":
        device["size"] = "1M"
    return {"nsid": nsid, "enable": int(enable), "device": device, **extra}


def config(m: Machine) -> dict:
    return {
        "hosts": [],
        "ports": [port(1, "rdma", "192.0.2.1"), port(2, "loop"),
                  port(3, "rdma", "198.51.100.7"), port(4, "tcp", "192.0.2.1"),
                  port(5, "loop", allow=False), port(6, "rdma", "203.0.113.9")],
        "subsystems": [{"nqn": NQN, "attr": {"allow_any_host": "1"}, "namespaces": [
            namespace(1, "vfio-nvme", m.nvme),
            namespace(2, "memory", "mem"),
            namespace(3, "bdev", "/dev/nvme9n1"),
            namespace(4, "vfio-nvme", m.peer2, enable=False),
            namespace(5, "vfio-nvme", m.far, p2pmem=m.peer2),
        ]}],
    }


def root_of(doc: dict) -> Root:
    root = Root()
    root.restore(doc, source="test")
    return root


def cmb(bdf: str) -> str:
    return f"nvme-cmb of {bdf} (probed when the namespace is enabled)"


def test_offline_decision_for_every_port_and_namespace(m):
    out = explain_config(root_of(config(m)), sysfs_root=m.root, cpu=INTEL,
                         netdev_of=ADDRS.get)
    by = {(d.portid, d.nsid): d for d in out}
    assert [(d.portid, d.nsid) for d in out] == [(p, n) for p in range(1, 7)
                                                 for n in range(1, 6)]
    rxe = f"rxe0 is not a PCI device (soft-RoCE); it {NOT_PCI}"
    assert all(by[1, n].reason == rxe for n in (1, 2, 3, 5))
    # loop: no DMA client, the namespace's own CMB at distance 0
    d = by[2, 1]
    assert d.p2p and d.provider == cmb(m.nvme) and d.distance == 0
    assert d.map_type == "bus_addr" and d.clients == [m.nvme]
    assert d.text() == (f"port 2 {NQN} ns 1: P2P memory from {cmb(m.nvme)} (bus_addr, "
                        "distance 0)")
    assert by[2, 2].reason == f"namespace 2: memory mem is not a PCI device; it {NOT_PCI}"
    # a kernel NVMe namespace under peer1: O_DIRECT cannot pin the pages of a CMB our own
    # driver maps, and no kernel p2pmem is published here
    assert by[2, 3].reason == (
        f"no usable P2P memory provider: {cmb(m.nvme)}, {cmb(m.far)}: the bdev "
        f"/dev/nvme9n1 backend cannot use nvme-cmb memory: {BDEV_NEEDS}")
    assert by[2, 3].provider is None
    assert all(by[p, 4].reason == "namespace 4 is not enabled" for p in range(1, 7))
    # pinned to peer2, whose namespace is disabled: its CMB is no candidate
    assert by[2, 5].reason.startswith(f"namespace 5: pinned provider {m.peer2} publishes no "
                                      "P2P memory: it has no p2pmem in sysfs and no CMB ")
    # a hardware RDMA NIC on the same switch: NIC -> CMB 4 + NVMe -> own CMB 0
    d = by[3, 1]
    assert d.p2p and d.clients == ["mlx5_0", m.nvme] and d.distance == 4
    # tcp: the kernel copies between socket buffers and the chunk, so no DMA client either
    assert by[4, 1].p2p and by[4, 1].clients == [m.nvme] and by[4, 1].distance == 0
    assert by[5, 1].reason == "port 5: allow_p2pmem is off"
    assert by[6, 1].reason == ("port 6: no network interface has address 203.0.113.9, so "
                               "its RDMA device is unknown")


def test_offline_far_namespace_needs_amd_or_a_whitelisted_bridge(m):
    doc = config(m)
    doc["subsystems"][0]["namespaces"][4].pop("p2pmem")
    doc["subsystems"][0]["namespaces"][0]["enable"] = 0  # only far's own CMB is left
    intel = {(d.portid, d.nsid): d for d in explain_config(
        root_of(doc), sysfs_root=m.root, cpu=INTEL, netdev_of=ADDRS.get)}
    # the loop port: far's own CMB is at distance 0, no host bridge involved
    assert intel[2, 5].p2p and intel[2, 5].distance == 0
    # NIC under the switch -> far's CMB under another root port: through the host bridge
    assert not intel[3, 5].p2p
    assert "is not in the P2PDMA whitelist" in intel[3, 5].reason
    amd = {(d.portid, d.nsid): d for d in explain_config(
        root_of(doc), sysfs_root=m.root, cpu=AMD_ZEN, netdev_of=ADDRS.get)}
    assert amd[3, 5].p2p and amd[3, 5].map_type == "thru_host_bridge"


def test_published_kernel_p2pmem_is_a_candidate(m):
    m.tree.p2pmem(m.peer1_fn, 1 << 20)
    doc = config(m)
    doc["subsystems"][0]["namespaces"][0]["enable"] = 0
    doc["subsystems"][0]["namespaces"][4]["p2pmem"] = m.peer1
    out = {(d.portid, d.nsid): d for d in explain_config(
        root_of(doc), sysfs_root=m.root, cpu=AMD_ZEN, netdev_of=ADDRS.get)}
    # the kernel NVMe namespace under peer1: O_DIRECT from peer1's own p2pmem
    d = out[2, 3]
    assert d.p2p and d.provider == f"p2pmem {m.peer1}" and d.distance == 0
    # our NVMe driver pinned to it: its PRPs need a bus address, which p2pmem does not show
    assert out[2, 5].reason == (
        f"namespace 5: pinned provider {m.peer1} cannot be used: p2pmem {m.peer1}: the "
        f"vfio-nvme {m.far} backend cannot use p2pmem memory: {VfioNvmeBackend.p2p_needs}")


def test_rdma_device_of_netdev(m):
    assert rdma_device_of_netdev(m.root, "dummy0") == "rxe0"
    assert rdma_device_of_netdev(m.root, "eth0") == "mlx5_0"
    assert rdma_device_of_netdev(m.root, "eth1") is None


# -- the command ---------------------------------------------------------------------------

@pytest.fixture
def config_file(m, tmp_path) -> Path:
    path = tmp_path / "nvmet.json"
    path.write_text(json.dumps(config(m)))
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["p2p", "explain", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_offline_text_is_one_log_line_per_pair(m, config_file, capsys):
    rc, out, _ = run(capsys, "--config", str(config_file), "--sysfs-root", m.root,
                     "--cpu", INTEL)
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 30
    assert lines[5] == (f"port 2 {NQN} ns 1: P2P memory from {cmb(m.nvme)} (bus_addr, "
                        "distance 0)")
    assert lines[8] == f"port 2 {NQN} ns 4: system memory: namespace 4 is not enabled"
    assert lines[15] == (f"port 4 {NQN} ns 1: P2P memory from {cmb(m.nvme)} (bus_addr, "
                         "distance 0)")  # tcp: CPU copies, like loop


def test_cli_offline_json(m, config_file, capsys):
    rc, out, _ = run(capsys, "--config", str(config_file), "--sysfs-root", m.root,
                     "--cpu", INTEL, "--json")
    assert rc == 0
    doc = json.loads(out)
    assert len(doc) == 30
    first = next(d for d in doc if d["portid"] == 2 and d["nsid"] == 1)
    assert first["decision"] == "p2p" and first["provider_bdf"] == m.nvme
    assert first["distance"] == 0 and first["clients"] == [m.nvme]
    assert {"portid", "subnqn", "nsid", "p2p", "provider", "distance", "reason",
            "text"} <= set(first)


@pytest.mark.parametrize("args,message", [
    (["--config", "/nonexistent/nvmet.json"], "/nonexistent/nvmet.json"),
    (["--cpu", "Intel"], "is not VENDOR:FAMILY"),
    (["--rpc-socket", "/nonexistent/nvmet-p2p.sock"], "/nonexistent/nvmet-p2p.sock"),
])
def test_cli_errors_say_what_is_wrong(m, config_file, capsys, args, message):
    if args[0] == "--cpu":
        args = ["--config", str(config_file), "--sysfs-root", m.root, *args]
    rc, out, err = run(capsys, *args)
    assert rc == 1 and out == ""
    assert err.startswith("nvmet-p2p p2p explain: ") and message in err


def test_cli_needs_exactly_one_source(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["p2p", "explain"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["p2p", "explain", "--config", "x", "--rpc-socket", "y"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# -- live, through the daemon's control socket -----------------------------------------------

class _Daemon:
    """What RpcServer needs of the daemon: a target, its P2P policy (and a config path)."""

    def __init__(self, target: Target, p2p: P2PPolicy) -> None:
        self.target, self.p2p = target, p2p
        self.config_path = None


def test_cli_live_asks_the_daemon(m, tmp_path, capsys):
    loop = asyncio.new_event_loop()
    policy = P2PPolicy(m.root, cpu=INTEL)
    target = Target(loop=loop, open_backend=open_backend, p2p=policy)
    LoopTransport(target)
    root = target.root
    subsys = root.create_subsystem(NQN)
    subsys.attr_allow_any_host = True
    ns = subsys.create_namespace(1)
    ns.device_backend, ns.device_path, ns.device_size = "memory", "mem", 1 << 20
    ns.enable = True
    p = root.create_port(7)
    p.addr_trtype = "loop"
    p.attr_allow_p2pmem = True
    p.link_subsystem(NQN)
    sock = str(tmp_path / "rpc.sock")
    server = RpcServer(_Daemon(target, policy), sock)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        rc, out, err = run(capsys, "--rpc-socket", sock)
        rc_json, out_json, _ = run(capsys, "--rpc-socket", sock, "--json")
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(server.close())
        target.shutdown()
        loop.close()
    assert rc == 0, err
    assert out == (f"port 7 {NQN} ns 1: system memory: namespace 1: memory mem is not a PCI "
                   f"device; it {NOT_PCI}; payload so far: 0 bytes P2P, 0 in system "
                   f"memory\n")
    assert rc_json == 0
    assert [(d["portid"], d["nsid"], d["p2p"]) for d in json.loads(out_json)] == [(7, 1, False)]
