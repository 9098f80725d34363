"""The P2P data path end to end in the VM: loop transport -> target -> VFIO NVMe backend,
with the data of keyed READ/WRITE commands in QEMU's NVMe CMB (64 MiB, BAR2).

Run: python -m nvmet_p2p.testbed.vm pytest -s tests/test_p2p_vm.py

A write through the allow_p2pmem=1 port is copied by the CPU into a CMB chunk and the
controller moves it from its CMB to the media (a P2P-flagged NVMe Write); it is read back
through a second port with allow_p2pmem=0 (system memory, bounced through the backend's
DMA pool) and compared.  Also: per-request fallback when the CMB is nearly full, the
switched-off reasons, `nvmet-p2p p2p explain --config` in the VM, and 4 KiB QD32 read IOPS
with P2P vs system memory (printed, and written to $NVMET_P2P_FIGURES, default
/tmp/p2p_vm_figures.json).  The controller goes back to its kernel driver at teardown.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import pytest

from nvmet_p2p.backends import open_backend
from nvmet_p2p.core.p2pmem import REASON_EXHAUSTED
from nvmet_p2p.core.target import Target
from nvmet_p2p.host.loop import LoopHost
from nvmet_p2p.p2p.policy import P2PPolicy
from nvmet_p2p.testbed.guest import cmb_nvme_bdf, on_vfio, setup_rxe
from nvmet_p2p.transports.loop import LoopTransport
from nvmet_p2p.wire.command import IoOpcode, Sqe
from tests.support.backend_io import pattern

pytestmark = pytest.mark.vm

SYS = Path("/sys/bus/pci/devices")
NQN = "nqn.2026-01.io.nvmet-p2p:p2p-vm"
P2P_PORT, SYS_PORT = 1, 2
IO_TIMEOUT_S = 30.0  # TCG guests are slow; a healthy completion takes milliseconds
BENCH_S = 3.0
QD = 32
FIGURES: dict = {}


class VmTarget:
    """A target with the QEMU NVMe (through VFIO) as namespace 1, on two loop ports."""

    def __init__(self, bdf: str) -> None:
        self.bdf = bdf
        self.loop = asyncio.new_event_loop()
        self.p2p = P2PPolicy()
        self.target = Target(loop=self.loop, open_backend=open_backend, p2p=self.p2p)
        self.transport = LoopTransport(self.target)
        root = self.target.root
        subsys = root.create_subsystem(NQN)
        subsys.attr_allow_any_host = True
        self.ns_cfg = subsys.create_namespace(1)
        self.ns_cfg.device_backend = "vfio-nvme"
        self.ns_cfg.device_path = bdf
        self.ns_cfg.enable = True
        for portid, allow in ((P2P_PORT, True), (SYS_PORT, False)):
            port = root.create_port(portid)
            port.addr_trtype = "loop"
            port.attr_allow_p2pmem = allow
            port.link_subsystem(NQN)
        self.hosts: list[LoopHost] = []

    def connect(self, portid: int) -> LoopHost:
        host = LoopHost(self.target, self.transport, portid)
        self.hosts.append(host)
        return host.connect(NQN, queue_size=64)

    @property
    def ns(self):
        return self.target.get_subsys(NQN).ns[1]

    @property
    def cmb(self):
        return self.ns.backend.cmb

    def reenable(self, **attrs) -> None:
        """Disable namespace 1, change its attributes, enable it (reopens the device)."""
        self.ns_cfg.enable = False
        for name, value in attrs.items():
            setattr(self.ns_cfg, name, value)
        self.ns_cfg.enable = True

    def close(self) -> None:
        for h in self.hosts:
            h.disconnect()
        self.target.shutdown()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
        self.p2p.close()


@pytest.fixture(scope="module")
def vt():
    try:
        bdf = cmb_nvme_bdf()
    except Exception as e:  # noqa: BLE001 - any lookup failure means "not this VM"
        pytest.skip(f"no QEMU NVMe with a CMB: {e}")
    if not (SYS / bdf / "iommu_group").exists():
        pytest.skip(f"{bdf} has no IOMMU group (the VM needs intel-iommu)")
    try:
        with on_vfio(bdf, VmTarget) as t:
            yield t
    finally:
        out = Path(os.environ.get("NVMET_P2P_FIGURES", "/tmp/p2p_vm_figures.json"))
        out.write_text(json.dumps(FIGURES, indent=2) + "\n")
        print("\nP2P VM FIGURES", json.dumps(FIGURES, indent=2))


@pytest.mark.without_p2pdma
def test_decision_uses_the_cmb(vt):
    cmb = vt.cmb
    assert cmb is not None, vt.ns.backend.cmb_reason
    host = vt.connect(P2P_PORT)
    ctrl = vt.target.controllers()[-1]
    d = ctrl.p2p_ns_map[1]
    assert d.p2p, d.text()
    assert d.provider == cmb.name and d.provider_bdf == vt.bdf and d.distance == 0
    assert host.active_ns() == [1]


@pytest.mark.without_p2pdma
def test_writes_pass_through_the_cmb_to_the_media(vt):
    p2p_host, sys_host = vt.connect(P2P_PORT), vt.connect(SYS_PORT)
    ns, cmb = vt.ns, vt.cmb
    st0 = dict(ns.stats)
    backend_p2p0 = ns.backend.stats["p2p"]
    allocs0 = cmb.counters()["allocs"]
    total = 0
    cases = [(0, 4096), (1000, 65536), (5000, 512), (9000, 1 << 20)]
    for i, (slba, n) in enumerate(cases):
        data = pattern(n, i)
        p2p_host.write(1, slba, data)
        assert sys_host.read(1, slba, n // 512) == data  # through system memory
        assert p2p_host.read(1, slba, n // 512) == data  # media -> CMB -> host
        total += 2 * n
    assert ns.stats["p2p_bytes"] - st0["p2p_bytes"] == total
    assert ns.stats["p2p_reqs"] - st0["p2p_reqs"] == 2 * len(cases)
    assert ns.stats["sysmem_by_reason"]["port 2: allow_p2pmem is off"] >= len(cases)
    assert cmb.counters()["allocs"] - allocs0 == 2 * len(cases)
    assert cmb.counters()["allocated"] == 0
    assert ns.backend.stats["p2p"] - backend_p2p0 >= 2 * len(cases)  # MDTS splits add
    FIGURES["p2p_bytes_after_verify"] = ns.stats["p2p_bytes"]


def test_nearly_full_cmb_falls_back_per_request(vt):
    host = vt.connect(P2P_PORT)
    q = host.io[min(host.io)]
    ns, cmb = vt.ns, vt.cmb
    # Hold all but 256 KiB of the CMB, then put eight 64 KiB writes in flight at once.
    held = []
    for order in range(25, 17, -1):  # 32 MiB ... 256 KiB
        c = cmb.alloc(1 << order)
        assert c is not None, cmb.counters()
        held.append(c)
    assert cmb.counters()["available"] == 256 << 10
    try:
        st0 = dict(ns.stats)
        ex0 = ns.stats.get("sysmem_by_reason", {}).get(REASON_EXHAUSTED, 0)
        datas = [pattern(65536, 50 + i) for i in range(8)]
        pend = [q.submit(Sqe(opcode=IoOpcode.WRITE, nsid=1, cdw10=20000 + i * 128,
                             cdw12=127), data=d) for i, d in enumerate(datas)]
        for p in pend:
            cqe, _ = q.wait(p, IO_TIMEOUT_S)
            assert cqe.status == 0
        assert ns.stats["p2p_reqs"] - st0["p2p_reqs"] == 4
        assert ns.stats["p2p_bytes"] - st0["p2p_bytes"] == 4 * 65536
        assert ns.stats["sysmem_by_reason"][REASON_EXHAUSTED] - ex0 == 4
    finally:
        for c in held:
            c.free()
    sys_host = vt.connect(SYS_PORT)
    for i, d in enumerate(datas):
        assert sys_host.read(1, 20000 + i * 128, 128) == d
    assert cmb.counters()["allocated"] == 0


def _read_iops(host: LoopHost, seconds: float) -> tuple[float, int]:
    """4 KiB random reads kept QD deep for `seconds`; (IOPS, completed)."""
    q = host.io[min(host.io)]
    rng = random.Random(7)
    span = (64 << 20) // 4096

    def one():
        return q.submit(Sqe(opcode=IoOpcode.READ, nsid=1, cdw10=rng.randrange(span) * 8,
                            cdw12=7), read_len=4096)
    pend = deque(one() for _ in range(QD))
    done = 0
    t0 = time.monotonic()
    stop = t0 + seconds
    while pend:
        cqe, _ = q.wait(pend.popleft(), IO_TIMEOUT_S)
        assert cqe.status == 0
        done += 1
        if time.monotonic() < stop:
            pend.append(one())
    return done / (time.monotonic() - t0), done


def test_measure_4k_qd32_read_iops_p2p_vs_system_memory(vt):
    p2p_host, sys_host = vt.connect(P2P_PORT), vt.connect(SYS_PORT)
    ns = vt.ns
    _read_iops(p2p_host, 0.3)  # warm-up: TCG translates the code paths once
    _read_iops(sys_host, 0.3)
    b0, r0 = ns.stats["p2p_bytes"], ns.stats["p2p_reqs"]
    p2p_iops, p2p_done = _read_iops(p2p_host, BENCH_S)
    assert ns.stats["p2p_reqs"] - r0 == p2p_done  # every one of them went through the CMB
    assert ns.stats["p2p_bytes"] - b0 == p2p_done * 4096
    b1 = ns.stats["p2p_bytes"]
    sys_iops, _ = _read_iops(sys_host, BENCH_S)
    assert ns.stats["p2p_bytes"] == b1  # none of these did
    FIGURES["read_4k_qd32"] = {"p2p_iops": round(p2p_iops), "sysmem_iops": round(sys_iops),
                               "p2p_reqs": p2p_done, "p2p_bytes": p2p_done * 4096}
    FIGURES["ns_stats"] = {k: v for k, v in ns.stats.items()}
    FIGURES["cmb"] = vt.cmb.counters()


def test_p2pmem_0_means_system_memory(vt):
    for h in vt.hosts:
        h.disconnect()
    vt.hosts.clear()
    vt.reenable(p2pmem="0")
    try:
        host = vt.connect(P2P_PORT)
        data = pattern(8192, 77)
        host.write(1, 30000, data)
        assert host.read(1, 30000, 16) == data
        st = vt.ns.stats
        assert st["p2p_reqs"] == 0
        assert st["sysmem_by_reason"] == {"namespace 1: p2pmem is 0": 2}
        assert vt.cmb.counters()["allocs"] == 0
    finally:
        for h in vt.hosts:
            h.disconnect()
        vt.hosts.clear()
        vt.reenable(p2pmem="1")


def test_explain_config_in_the_vm(vt, tmp_path):
    setup_rxe()
    doc = {
        "hosts": [],
        "ports": [
            {"portid": 1, "addr": {"trtype": "rdma", "adrfam": "ipv4", "traddr": "192.0.2.1",
                                   "trsvcid": "4420"},
             "attr": {"allow_p2pmem": "1"}, "subsystems": [NQN]},
            {"portid": 2, "addr": {"trtype": "loop"}, "attr": {"allow_p2pmem": "1"},
             "subsystems": [NQN]},
        ],
        "subsystems": [{"nqn": NQN, "attr": {"allow_any_host": "1"}, "namespaces": [
            {"nsid": 1, "enable": 1, "device": {"path": vt.bdf, "backend": "vfio-nvme"}},
            {"nsid": 2, "enable": 1, "device": {"path": "scratch", "backend": "memory",
                                                "size": "1M"}},
        ]}],
    }
    cfg = tmp_path / "nvmet.json"
    cfg.write_text(json.dumps(doc))
    cp = subprocess.run([sys.executable, "-m", "nvmet_p2p.cli", "p2p", "explain", "--config",
                         str(cfg)], capture_output=True, text=True, timeout=120, check=False)
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    FIGURES["explain"] = lines
    rxe = ("system memory: rxe0 is not a PCI device (soft-RoCE); it cannot be used for "
           "peer-to-peer DMA")
    assert lines == [
        f"port 1 {NQN} ns 1: {rxe}",
        f"port 1 {NQN} ns 2: {rxe}",
        (f"port 2 {NQN} ns 1: P2P memory from nvme-cmb of {vt.bdf} (probed when the "
         "namespace is enabled) (bus_addr, distance 0)"),
        (f"port 2 {NQN} ns 2: system memory: namespace 2: memory scratch is not a PCI "
         "device; it cannot be used for peer-to-peer DMA"),
    ]
