"""Kernel p2pmem in the VM: our topology verdict against the kernel's, and P2P-flagged
block I/O from the bdev backend over the loop transport (the CPU plays the NIC).

On a kernel with CONFIG_PCI_P2PDMA (the VM's default 7.x kernel) the kernel NVMe driver
publishes both QEMU CMBs as p2pmem (the root-bus controller's and the one behind the
switch).  For every (p2pmem provider, kernel NVMe namespace) pair, an O_DIRECT write and
read between the provider's pages and the namespace is what the kernel decides; our
`Topology` must decide the same (success <-> a supported map type; EINVAL <-> not
supported), for the reason the kernel logged.  On Debian 6.1 there is no p2pmem: the tests
check that, and that every decision says so.

Run: python -m nvmet_p2p.testbed.vm pytest -s tests/p2p/test_p2pmem_vm.py
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
import struct
from pathlib import Path

import pytest

from nvmet_p2p.backends import open_backend
from nvmet_p2p.core.target import Target
from nvmet_p2p.errors import ConfigError
from nvmet_p2p.host.loop import LoopHost
from nvmet_p2p.p2p.policy import P2PPolicy
from nvmet_p2p.p2p.topology import MAP_NOT_SUPPORTED, Topology, published_p2pmem
from nvmet_p2p.testbed.guest import cmb_nvme_bdf, pci_driver, wait_for
from nvmet_p2p.transports.loop import LoopTransport
from tests.support.backend_io import pattern
from tests.support.kernel_p2p import kernel_nvme_disks, kernel_p2pdma, o_direct_verdict

pytestmark = [pytest.mark.vm, pytest.mark.without_p2pdma]

NQN = "nqn.2026-12.io.nvmet-p2p:p2pmem-vm"
PORTID = 1
BLKGETSIZE64 = 0x80081272
VERDICT_SPAN = 1 << 20  # the verdicts write the last MiB of each disk; the data tests not
NO_PROVIDER = ("no P2P memory provider is available (no published p2pmem, no NVMe CMB with "
               "WDS and RDS)")
# What the kernel logs (drivers/pci/p2pdma.c) when it refuses a pair, and the words of
# our reasons for the same cause.
KERNEL_CAUSES = {
    "do not share an upstream bridge or whitelisted host bridge": "host bridge",
    "ACS redirect is set between the client and provider": "ACS",
}


def disk_bytes(dev: str) -> int:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return struct.unpack("=Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def verdicts() -> list[tuple]:
    """(ours, the kernel's) for every (provider, disk) pair, the kernel asked once each
    (it caches a pair's map type, and logs a refusal only the first time)."""
    if not kernel_p2pdma():
        return []
    providers = [p.bdf for p in published_p2pmem() if p.published]
    disks = kernel_nvme_disks()
    topology = Topology("/sys")
    out = []
    for prov in providers:
        for bdf, dev in disks.items():
            ours = topology.distance(prov, [bdf])
            theirs = o_direct_verdict(prov, dev, bdf, disk_bytes(dev) - VERDICT_SPAN)
            out.append((ours, theirs))
    print("\nP2PMEM VERDICTS (provider -> namespace: ours | kernel)")
    for ours, theirs in out:
        kernel = "ok" if theirs.ok else errno.errorcode.get(theirs.errno or 0, theirs.errno)
        print(f"  {theirs.provider} -> {theirs.disk} ({theirs.client}): {ours.map_type} "
              f"distance {ours.distance} | {kernel} {theirs.log}")
    return out


def test_without_p2pdma_there_is_no_p2pmem_and_decisions_say_so():
    if kernel_p2pdma():
        pytest.skip("this kernel has CONFIG_PCI_P2PDMA (the 6.1 group checks the other case)")
    assert published_p2pmem() == [], "p2pmem in sysfs on a kernel without CONFIG_PCI_P2PDMA"
    assert P2PPolicy().candidates([]) == []


def test_topology_verdict_equals_the_kernels_for_every_pair(verdicts):
    if not kernel_p2pdma():
        pytest.skip("kernel without CONFIG_PCI_P2PDMA: no p2pmem to judge (Debian 6.1)")
    assert len({v.provider for _, v in verdicts}) >= 2, "both QEMU CMBs should be p2pmem"
    assert len({v.disk for _, v in verdicts}) >= 3, "three kernel NVMe namespaces expected"
    causes_seen = 0
    for ours, theirs in verdicts:
        pair = f"{theirs.provider} -> {theirs.disk} ({theirs.client})"
        supported = ours.map_type != MAP_NOT_SUPPORTED
        assert theirs.ok == supported, f"{pair}: ours {ours.to_json()}, kernel {theirs}"
        if supported:
            continue
        assert theirs.errno == errno.EINVAL, f"{pair}: {theirs}"
        logged = [(k, w) for k, w in KERNEL_CAUSES.items() for line in theirs.log if k in line]
        for kernel_words, our_words in logged:
            assert any(our_words in r for r in ours.reasons), (pair, kernel_words, ours.reasons)
        causes_seen += bool(logged)
    refused = sum(not v.ok for _, v in verdicts)
    assert refused == 0 or causes_seen, "the kernel logged no reason for any refusal"


def test_own_controller_p2pmem_is_distance_0_and_works(verdicts):
    if not kernel_p2pdma():
        pytest.skip("kernel without CONFIG_PCI_P2PDMA: no p2pmem (Debian 6.1)")
    own = [(o, k) for o, k in verdicts if k.provider == k.client]
    assert own and all(k.ok and o.distance == 0 for o, k in own), own


class LoopTarget:
    """A target with one kernel NVMe namespace (bdev) on a loop port with allow_p2pmem=1."""

    def __init__(self, policy: P2PPolicy) -> None:
        self.loop = asyncio.new_event_loop()
        self.policy = policy
        self.target = Target(loop=self.loop, open_backend=open_backend, p2p=policy)
        self.transport = LoopTransport(self.target)
        root = self.target.root
        self.subsys = root.create_subsystem(NQN)
        self.subsys.attr_allow_any_host = True
        port = root.create_port(PORTID)
        port.addr_trtype = "loop"
        port.attr_allow_p2pmem = True
        port.link_subsystem(NQN)
        self.hosts: list[LoopHost] = []

    def add_ns(self, nsid: int, dev: str, p2pmem: str = "1"):
        ns = self.subsys.create_namespace(nsid)
        ns.device_backend, ns.device_path, ns.p2pmem = "bdev", dev, p2pmem
        ns.enable = True
        return self.target.get_subsys(NQN).ns[nsid]

    def connect(self) -> LoopHost:
        host = LoopHost(self.target, self.transport, PORTID)
        self.hosts.append(host)
        return host.connect(NQN, queue_size=32)

    def close(self) -> None:
        for h in self.hosts:
            h.disconnect()
        self.target.shutdown()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
        self.policy.close()


@pytest.fixture
def lt():
    t = LoopTarget(P2PPolicy())
    yield t
    t.close()


def read_disk(dev: str, offset: int, n: int) -> bytes:
    """What is on the disk, read O_DIRECT into system memory (not through the target)."""
    buf = mmap.mmap(-1, n)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [buf], offset)
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()


def test_bdev_namespace_p2p_from_its_controllers_p2pmem(lt):
    bdf = cmb_nvme_bdf()
    dev = kernel_nvme_disks()[bdf]
    ns = lt.add_ns(1, dev)
    host = lt.connect()
    d = lt.target.controllers()[-1].p2p_ns_map[1]
    sizes = [(0, 4096), (64, 65536), (2048, 1 << 20)]
    for i, (slba, n) in enumerate(sizes):
        data = pattern(n, 50 + i)
        host.write(1, slba, data)
        assert host.read(1, slba, n // 512) == data
        assert read_disk(dev, slba * 512, n) == data  # on the media, read around us
    total = 2 * sum(n for _, n in sizes)
    st = ns.stats
    print(f"\nP2PMEM BDEV {dev} ({bdf}): {d.text()}; stats {st}")
    if not kernel_p2pdma():  # Debian 6.1: everything works, in system memory, and says why
        assert not d.p2p and d.reason == NO_PROVIDER
        assert st["sysmem_bytes_by_reason"] == {NO_PROVIDER: total} and st["p2p_bytes"] == 0
        return
    assert d.p2p and d.provider == f"p2pmem {bdf}" and d.distance == 0, d.text()
    assert st["p2p_bytes"] == total and st["sysmem_bytes"] == 0
    assert ns.backend.p2p_ios == {"read": len(sizes), "write": len(sizes)}


def test_switch_namespace_pinned_across_the_host_bridge_is_refused(lt, verdicts):
    if not kernel_p2pdma():
        pytest.skip("kernel without CONFIG_PCI_P2PDMA: nothing to pin (Debian 6.1)")
    root_bdf = cmb_nvme_bdf()
    across = [(o, k) for o, k in verdicts
              if k.provider == root_bdf and k.client.split(":")[1] != "00"]
    assert across, "no namespace behind the switch"
    ours, kernel = across[0]
    assert kernel.errno == errno.EINVAL  # the kernel refuses this pair...
    with pytest.raises(ConfigError) as e:  # ...and so does enabling a namespace pinned to it
        lt.add_ns(1, kernel.disk, p2pmem=root_bdf)
    msg = str(e.value)
    print(f"\nP2PMEM PINNED REFUSAL: {msg}")
    assert msg.startswith(f"namespace 1 of {NQN}: p2pmem {root_bdf}: ")
    assert all(r in msg for r in ours.reasons), (msg, ours.reasons)


def test_unbinding_the_providers_driver_closes_the_provider(caplog):
    """The kernel does not wait for our mapping when the NVMe driver unbinds: it revokes
    it (a later touch is SIGBUS, docs/p2p-kernel-facts.md).  The provider notices at the
    next allocation, closes, and its chunks' views are revoked, so nothing touches it."""
    if not kernel_p2pdma():
        pytest.skip("kernel without CONFIG_PCI_P2PDMA: no p2pmem to unbind (Debian 6.1)")
    from nvmet_p2p.cmb import KernelP2pmemProvider, copy_into
    bdf = cmb_nvme_bdf()
    dev = Path("/sys/bus/pci/devices") / bdf
    assert pci_driver(bdf) == "nvme"
    before = next(p for p in published_p2pmem() if p.bdf == bdf)
    prov = KernelP2pmemProvider("/sys", bdf, size=1 << 20)
    try:
        chunk = prov.alloc(4096)
        copy_into(chunk, b"before the unbind", prov.access)
        (dev / "driver/unbind").write_text(bdf)
        try:
            wait_for(lambda: not (dev / "p2pmem").exists() or None, 30, "p2pmem to go")
            with caplog.at_level(logging.WARNING, logger="nvmet_p2p.cmb"):
                assert prov.alloc(4096) is None
            assert prov.closed and "event=p2pmem_revoked" in caplog.text
            with pytest.raises(ValueError):
                chunk.view[0]
        finally:
            Path("/sys/bus/pci/drivers/nvme/bind").write_text(bdf)
            wait_for(lambda: bdf in kernel_nvme_disks() or None, 60, f"{bdf}'s namespace")
    finally:
        prov.close()
    after = next(p for p in published_p2pmem() if p.bdf == bdf)
    assert after.published and after.available == before.available  # the pool is back
