"""Proof that the soft-RoCE VM has what the other VM tests rely on.

rxe0 on dummy0, the QEMU NVMe with its 64 MiB CMB in BAR2, IOMMU groups for VFIO, and the
kernel's own NVMe-oF target serving a namespace over RDMA to the kernel's NVMe host with
fio verifying the data.  Run with: python -m nvmet_p2p.testbed.vm pytest tests/test_vm_smoke.py
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmet_p2p.errors import VMError
from nvmet_p2p.testbed import guest, vm
from nvmet_p2p.testbed.kernel_target import KernelTarget

pytestmark = [pytest.mark.vm, pytest.mark.without_p2pdma,
              pytest.mark.skipif(not guest.in_vm(), reason=guest.VM_SKIP_REASON)]

# Linux IORESOURCE_* bits in the flags column of sysfs `resource`.
IORESOURCE_PREFETCH = 0x2000
IORESOURCE_MEM_64 = 0x100000

SUBNQN = "nqn.2014-08.org.nvmexpress:nvmet-p2p-smoke"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:5f1c1c3e-6a3a-4d4e-9e0c-0b5a1e4d2c01"
OTHER_HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:5f1c1c3e-6a3a-4d4e-9e0c-0b5a1e4d2c02"


@pytest.fixture(scope="module")
def rxe() -> str:
    return guest.setup_rxe()


@pytest.fixture
def ns_file(request: pytest.FixtureRequest) -> Iterator[Path]:
    f = guest.shm_file(f"smoke-{request.node.name}.img", 64 << 20)
    yield f
    f.unlink()


def test_rxe_up(rxe: str) -> None:
    assert rxe == guest.RXE_DEV
    assert "ACTIVE" in Path(f"/sys/class/infiniband/{rxe}/ports/1/state").read_text()
    link = guest.sh("rdma", "link", "show").stdout
    assert f"{rxe}/1 state ACTIVE" in link and f"netdev {guest.NETDEV}" in link
    assert f"inet {guest.TRADDR}/24" in guest.sh("ip", "-4", "addr", "show", guest.NETDEV).stdout
    assert guest.setup_rxe() == rxe  # idempotent


def test_cmb_nvme_bar2(tmp_path: Path) -> None:
    bdf = guest.cmb_nvme_bdf()
    start, size, flags = guest.pci_bar(bdf, guest.CMB_BAR)
    assert size == 64 << 20 and start != 0
    assert flags & IORESOURCE_PREFETCH and flags & IORESOURCE_MEM_64
    dev = Path("/sys/bus/pci/devices", bdf)
    assert (dev / "resource2").stat().st_size == 64 << 20
    assert (dev / "resource2_wc").exists()
    driver = (dev / "driver").resolve().name if (dev / "driver").exists() else None
    assert driver in ("nvme", "vfio-pci", None)
    if driver == "nvme":  # other tests may have moved it to vfio-pci
        [ctrl] = (dev / "nvme").iterdir()
        assert (ctrl / "serial").read_text().strip() == vm.CMB_NVME_SERIAL


def test_iommu_groups() -> None:
    if "intel_iommu=on" not in Path("/proc/cmdline").read_text():
        pytest.skip("VM booted without --iommu")
    groups = list(Path("/sys/kernel/iommu_groups").iterdir())
    assert groups
    group = Path("/sys/bus/pci/devices", guest.cmb_nvme_bdf(), "iommu_group")
    assert group.resolve().parent == Path("/sys/kernel/iommu_groups")


def test_kernel_target_rdma_fio_verify(rxe: str, ns_file: Path) -> None:
    # tmpfs refuses the O_DIRECT nvmet uses on files by default.
    with KernelTarget(SUBNQN, ns_file, trsvcid=4420, buffered_io=True) as kt:
        entries = guest.nvme_discover(guest.TRADDR, 4420, hostnqn=HOSTNQN)
        assert [(e["subnqn"], e["trtype"], e["trsvcid"].strip()) for e in entries
                if e["subnqn"] == SUBNQN] == [(SUBNQN, "rdma", "4420")]
        ctrl = guest.nvme_connect(SUBNQN, guest.TRADDR, 4420, hostnqn=HOSTNQN, nr_io_queues=2)
        try:
            assert Path(f"/sys/class/nvme/{ctrl}/transport").read_text().strip() == "rdma"
            bdev = guest.namespace_block_device(SUBNQN)
            res = guest.run_fio([
                "--name=verify", f"--filename={bdev}", "--rw=write", "--bs=4k", "--size=16M",
                "--ioengine=libaio", "--direct=1", "--iodepth=8",
                "--verify=crc32c", "--do_verify=1", "--verify_fatal=1"])
            [job] = res["jobs"]
            assert job["write"]["io_bytes"] == 16 << 20
            assert job["read"]["io_bytes"] == 16 << 20  # the verify pass read it all back
        finally:
            guest.nvme_disconnect(SUBNQN)
        assert guest.nvme_ctrls(SUBNQN) == []
    assert not kt.subsys_dir.exists() and not kt.port_dir.exists()
    kt.teardown()  # idempotent


def test_kernel_target_allowed_hosts(rxe: str, ns_file: Path) -> None:
    nqn = SUBNQN + "-acl"
    with KernelTarget(nqn, ns_file, trsvcid=4421, port_id=2, buffered_io=True,
                      allowed_hosts=[HOSTNQN]):
        with pytest.raises(VMError):
            guest.nvme_connect(nqn, guest.TRADDR, 4421, hostnqn=OTHER_HOSTNQN, timeout=30)
        assert guest.nvme_ctrls(nqn) == []
        guest.nvme_connect(nqn, guest.TRADDR, 4421, hostnqn=HOSTNQN, timeout=30)
        try:
            assert guest.namespace_block_device(nqn).startswith("/dev/nvme")
        finally:
            guest.nvme_disconnect(nqn)
