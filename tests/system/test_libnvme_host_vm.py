"""The Linux host driven through libnvme's Python bindings against our target (#15):
discover, connect, controller and namespace lookup, disconnect, over RDMA and TCP, for
two host NQNs at once (each with its own host ID: the kernel refuses an ID that another
NQN holds), each answer checked against what nvme-cli reads (sysfs)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmet_p2p.testbed import guest, libnvme_host
from tests.support import vm_target as vt

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(libnvme_host.nvme is None,
                                 reason=libnvme_host.IMPORT_ERROR or "-")]

RDMA_PORT, TCP_PORT = 4432, 4433
NQN = "nqn.2026-11.io.nvmet-p2p:libnvme"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:77777777-6666-5555-4444-333333333333"
OTHER_HOSTNQN = "nqn.2026-11.io.example:host-without-uuid"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[vt.VmTarget]:
    guest.setup_rxe()
    guest.modprobe("nvme-rdma", "nvme-tcp")
    shm = guest.shm_file("libnvme-ns.img", 16 << 20)
    cfg = vt.config([vt.rdma_port(1, RDMA_PORT, [NQN]), vt.tcp_port(2, TCP_PORT, [NQN])],
                    [vt.subsystem(NQN, [vt.file_ns(1, shm, 16 << 20)])])
    with vt.VmTarget(cfg, tmp_path_factory.mktemp("libnvme")) as tgt:
        yield tgt
    shm.unlink(missing_ok=True)
    assert "Traceback" not in tgt.log_text()


@pytest.fixture(autouse=True)
def none_left(target: vt.VmTarget) -> Iterator[None]:
    yield
    problems = vt.disconnect_all([NQN])
    assert not problems, problems
    assert target.alive(), target.log_tail()


@pytest.mark.parametrize("transport,port", [("rdma", RDMA_PORT), ("tcp", TCP_PORT)])
def test_discover(target: vt.VmTarget, transport: str, port: int) -> None:
    entries = libnvme_host.discover(guest.TRADDR, port, transport=transport,
                                    hostnqn=HOSTNQN)
    mine = [e for e in entries if e.get("subnqn") == NQN]
    assert mine, entries
    assert {e["trtype"] for e in mine} >= {transport}
    assert any(str(e["trsvcid"]) == str(port) and e["traddr"] == guest.TRADDR for e in mine)
    assert entries == libnvme_host.discover(guest.TRADDR, port, transport=transport,
                                            hostnqn=OTHER_HOSTNQN)  # no host filter here


@pytest.mark.parametrize("transport,port", [("rdma", RDMA_PORT), ("tcp", TCP_PORT)])
def test_connect_lookup_disconnect_two_hosts(target: vt.VmTarget, transport: str,
                                             port: int) -> None:
    first = libnvme_host.connect(NQN, guest.TRADDR, port, transport=transport,
                                 hostnqn=HOSTNQN, nr_io_queues=1)
    second = libnvme_host.connect(NQN, guest.TRADDR, port, transport=transport,
                                  hostnqn=OTHER_HOSTNQN, nr_io_queues=1)
    sysfs = Path("/sys/class/nvme")
    assert sorted(guest.nvme_ctrls(NQN)) == sorted([first, second])  # what nvme-cli sees
    assert libnvme_host.controllers(NQN) == sorted([first, second])
    for name, hostnqn in ((first, HOSTNQN), (second, OTHER_HOSTNQN)):
        assert (sysfs / name / "hostnqn").read_text().strip() == hostnqn
        assert (sysfs / name / "hostid").read_text().strip() == libnvme_host.hostid_of(hostnqn)
        assert (sysfs / name / "transport").read_text().strip() == transport
        assert (sysfs / name / "queue_count").read_text().strip() == "2"  # admin + 1 I/O
    dev = guest.namespace_block_device(NQN, 1)
    assert libnvme_host.namespaces(NQN) == {1: Path(dev).name}
    ours = {c["hostnqn"] for c in target.controllers() if c["subsys"] == NQN}
    assert ours == {HOSTNQN, OTHER_HOSTNQN}  # the target's view agrees
    assert libnvme_host.disconnect(NQN) == 2
    assert guest.nvme_ctrls(NQN) == [] and libnvme_host.controllers(NQN) == []


def test_a_refused_connect_says_why(target: vt.VmTarget) -> None:
    with pytest.raises(libnvme_host.VMError, match="libnvme connect .*nqn.2026-11.io.nope"):
        libnvme_host.connect("nqn.2026-11.io.nope", guest.TRADDR, RDMA_PORT,
                             hostnqn=HOSTNQN, timeout=20)
    assert guest.nvme_ctrls("nqn.2026-11.io.nope") == []


def test_without_a_host_id_the_kernel_refuses_the_nqn(target: vt.VmTarget) -> None:
    """Why libnvme_host always names the host ID: libnvme 1.3 leaves it unset for a host
    NQN of our choosing, the kernel then takes its default host's ID, which another NQN
    holds, and refuses the Connect (the "invalid arguments" of an earlier attempt)."""
    nvme = libnvme_host.nvme
    root = libnvme_host._root()
    host = libnvme_host._tree_owned(nvme.host(root, hostnqn=OTHER_HOSTNQN + "-no-id"))
    assert host.hostid is None
    ctrl = libnvme_host._tree_owned(nvme.ctrl(root, subsysnqn=NQN, transport="tcp",
                                              traddr=guest.TRADDR, trsvcid=str(TCP_PORT)))
    with pytest.raises(RuntimeError, match="(?i)invalid arg"):
        ctrl.connect(host, {})
    assert guest.nvme_ctrls(NQN) == []
    dmesg = guest.sh("dmesg").stdout
    assert "found same hostid" in dmesg and OTHER_HOSTNQN + "-no-id" in dmesg, dmesg[-2000:]
