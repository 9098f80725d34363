"""The Linux host driven through libnvme's Python bindings against our target (#15):
discover, connect, controller and namespace lookup, disconnect, checked against sysfs
(what nvme-cli reads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvmet_p2p.testbed import guest, libnvme_host
from tests.support import vm_target as vt

pytestmark = pytest.mark.vm

PORT = 4432
NQN = "nqn.2026-11.io.nvmet-p2p:libnvme"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:77777777-6666-5555-4444-333333333333"


@pytest.mark.skipif(libnvme_host.nvme is None, reason=libnvme_host.IMPORT_ERROR or "-")
def test_discover_connect_lookup_disconnect(tmp_path: Path) -> None:
    guest.setup_rxe()
    guest.modprobe("nvme-rdma")
    shm = guest.shm_file("libnvme-ns.img", 16 << 20)
    cfg = vt.config([vt.rdma_port(1, PORT, [NQN])],
                    [vt.subsystem(NQN, [vt.file_ns(1, shm, 16 << 20)])])
    with vt.VmTarget(cfg, tmp_path / "target"):
        entries = libnvme_host.discover(guest.TRADDR, PORT, hostnqn=HOSTNQN)
        assert NQN in {e["subnqn"] for e in entries}, entries
        name = libnvme_host.connect(NQN, guest.TRADDR, PORT, hostnqn=HOSTNQN,
                                    nr_io_queues=1)
        try:
            assert name in guest.nvme_ctrls(NQN)  # the same controller nvme-cli would see
            assert [c.name for c in libnvme_host.controllers(NQN)] == [name]
            dev = guest.namespace_block_device(NQN, 1)
            assert libnvme_host.namespaces(NQN)[1] == Path(dev).name
        finally:
            assert libnvme_host.disconnect(NQN) == 1
        guest.wait_for(lambda: not guest.nvme_ctrls(NQN) or None, 30.0, "controller gone")
    shm.unlink(missing_ok=True)
