"""The kernel target as the anchor for our P2P decision: the same namespace, the same rxe.

Runs only inside the test VM, on a kernel with CONFIG_PCI_P2PDMA (the default 7.x).  The
kernel target (nvmet) serves the root-bus CMB NVMe's namespace with `p2pmem` = 1 on an
rdma port over rxe0, and the Linux host connects and does I/O; then nvmet-p2p serves the
same namespace with allow_p2pmem=1 on the same rxe0.  Both must refuse P2P memory for the
same cause: rxe0 moves data with the CPU, it is no PCI device that could reach a BAR.

The kernel says it by omission: nvmet-rdma names a P2P client for a controller only when
ib_dma_pci_p2p_dma_supported() (false for rxe, which uses virtual DMA), and without one
nvmet_setup_p2p_ns_map() looks for no provider at all: neither "using p2pmem on ..." nor
"no peer-to-peer memory is available ..." is logged, although the namespace was enabled
with p2pmem (its own controller's p2pmem is reachable from it), and ftrace shows every
buffer allocated (nvmet_req_alloc_sgls) without a p2pmem search or allocation
(pci_p2pmem_find_many, pci_p2pmem_alloc_sgl).  Ours names the cause.  Both decisions are
printed ("KERNEL ANCHOR ...").
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nvmet_p2p.testbed import guest, libnvme_host
from nvmet_p2p.testbed.kernel_target import KernelTarget
from tests.support import vm_target as vt
from tests.support.kernel_p2p import FunctionCalls, KernelLog, kernel_nvme_disks, kernel_p2pdma

pytestmark = [pytest.mark.vm, pytest.mark.without_p2pdma]

KERNEL_NQN = "nqn.2026-12.io.nvmet-p2p:anchor-kernel"
OURS_NQN = "nqn.2026-12.io.nvmet-p2p:anchor-ours"
KERNEL_PORT, OURS_PORT = 4450, 4451
IO_BYTES = 1 << 20
RXE_REASON = f"{guest.RXE_DEV} is not a PCI device (soft-RoCE); it cannot be used for " \
             "peer-to-peer DMA"


@pytest.fixture(scope="module")
def disk() -> str:
    if not kernel_p2pdma():
        pytest.skip("kernel without CONFIG_PCI_P2PDMA: nvmet has no p2pmem attribute "
                    "(Debian 6.1)")
    guest.setup_rxe()
    return kernel_nvme_disks()[guest.cmb_nvme_bdf()]


def host_io(subnqn: str, trsvcid: int) -> None:
    """Connect the Linux host (libnvme), write and read back 1 MiB O_DIRECT, disconnect."""
    guest.modprobe("nvme-rdma")
    libnvme_host.connect(subnqn, guest.TRADDR, trsvcid, nr_io_queues=1)
    try:
        dev = guest.namespace_block_device(subnqn)
        guest.sh("dd", "if=/dev/urandom", f"of={dev}", "bs=64k", f"count={IO_BYTES >> 16}",
                 "oflag=direct", timeout=120)
        guest.sh("dd", f"if={dev}", "of=/dev/null", "bs=64k", f"count={IO_BYTES >> 16}",
                 "iflag=direct", timeout=120)
    finally:
        libnvme_host.disconnect(subnqn)


KERNEL_FUNCTIONS = ("nvmet_req_alloc_sgls", "pci_p2pmem_find_many", "pci_p2pmem_alloc_sgl")


@pytest.fixture(scope="module")
def kernel_decision(disk: str) -> tuple[list[str], dict[str, int]]:
    """The kernel target's log lines and buffer calls, from namespace enable to the I/O."""
    klog = KernelLog()
    calls = FunctionCalls(*KERNEL_FUNCTIONS)
    try:
        with KernelTarget(KERNEL_NQN, disk, trsvcid=KERNEL_PORT, p2pmem="1") as kt:
            # enable with p2pmem=1 succeeded: p2pmem reachable from the namespace exists
            assert (kt.ns_dir / "p2pmem").read_text().strip() == "1"
            calls.start()
            try:
                host_io(KERNEL_NQN, KERNEL_PORT)
            finally:
                counts = dict(calls.stop())
        lines = [ln for ln in klog.lines() if ln.startswith(("nvmet", "nvme "))]
    finally:
        klog.close()
    print(f"\nKERNEL ANCHOR kernel nvmet on {disk}: calls {counts}, log {lines}")
    return lines, counts


@pytest.fixture(scope="module")
def ours(disk: str, kernel_decision: tuple, tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[tuple[dict, dict]]:
    port = vt.rdma_port(1, OURS_PORT, [OURS_NQN])
    port["attr"] = {"allow_p2pmem": "1"}
    cfg = vt.config([port], [vt.subsystem(OURS_NQN, [vt.bdev_ns(1, disk)])])
    with vt.VmTarget(cfg, tmp_path_factory.mktemp("anchor")) as tgt:
        explained = [d for d in tgt.rpc("p2p_explain") if d["subnqn"] == OURS_NQN]
        host_io(OURS_NQN, OURS_PORT)
        ns = tgt.status()["subsystems"][OURS_NQN]["namespaces"][0]
        print(f"\nKERNEL ANCHOR nvmet-p2p on {disk}: {explained[0]['text']}")
        yield explained[0], ns["stats"]
    assert tgt.returncode == 0, tgt.log_tail()


def test_both_targets_refuse_p2p_memory_for_rxe_for_the_same_cause(disk, kernel_decision,
                                                                    ours):
    # the kernel: the controller was made and served I/O in system memory, without looking
    # for a provider: it had no P2P client to judge
    lines, calls = kernel_decision
    assert any(ln.startswith("nvmet: Created nvm controller") for ln in lines), lines
    assert not any("using p2pmem" in ln or "peer-to-peer memory is available" in ln
                   for ln in lines), lines
    assert calls.get("nvmet_req_alloc_sgls", 0) >= 2 * IO_BYTES // (64 << 10), calls
    assert not calls.get("pci_p2pmem_find_many") and not calls.get("pci_p2pmem_alloc_sgl")
    # ours: the same client refused, before any provider is looked at
    decision, stats = ours
    assert not decision["p2p"] and decision["reason"] == RXE_REASON, decision
    assert decision["clients"][0] == guest.RXE_DEV
    assert stats["p2p_bytes"] == 0
    # the host's writes and reads (and what it read scanning the disk), all for that reason
    assert list(stats["sysmem_bytes_by_reason"]) == [RXE_REASON], stats
    assert stats["sysmem_bytes"] >= 2 * IO_BYTES, stats
