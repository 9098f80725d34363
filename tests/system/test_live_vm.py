"""Live configuration and the P2P decision, seen by the Linux host over soft-RoCE.

Runs only inside the test VM (`python -m nvmet_p2p.testbed.vm pytest tests/test_live_vm.py`):
* a namespace created and enabled through the RPC API while the Linux host is connected
  appears on the host (the namespace-changed AEN, `nvme list`);
* a port created and linked live shows up in `nvme discover` on its address;
* with allow_p2pmem=1 on an rdma port over rxe, the decision is system memory because
  "rxe0 is not a PCI device", every request is counted under that reason, and the Linux
  host's fio verify is clean.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmet_p2p.errors import VMError
from nvmet_p2p.testbed import guest
from tests.support import vm_target as vt

pytestmark = pytest.mark.vm

SUBNQN = "nqn.2026-11.io.nvmet-p2p:live"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6d1c1b2e-4a5f-4e3b-9c1d-00000000c0de"
PORT, LIVE_PORT = 4430, 4431
MiB = 1 << 20
RXE_REASON = "rxe0 is not a PCI device"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[vt.VmTarget]:
    guest.setup_rxe()
    guest.modprobe("nvme-rdma")
    port = vt.rdma_port(1, PORT, [SUBNQN])
    port["attr"] = {"allow_p2pmem": "1"}
    cfg = vt.config([port], [vt.subsystem(SUBNQN, [vt.file_ns(1, "/dev/shm/live-ns1.img",
                                                              64 * MiB)])])
    with vt.VmTarget(cfg, tmp_path_factory.mktemp("live")) as tgt:
        yield tgt
    for f in Path("/dev/shm").glob("live-*.img"):
        f.unlink()
    assert tgt.returncode == 0, tgt.log_tail()


@pytest.fixture(autouse=True)
def no_ctrl_left(target: vt.VmTarget) -> Iterator[None]:
    yield
    assert not vt.disconnect_all([SUBNQN])
    assert target.alive(), target.log_tail()


def _host_nsids(subnqn: str) -> set[int]:
    out = set()
    for base in Path("/sys/class/nvme-subsystem").glob("nvme-subsys*"):
        if (base / "subsysnqn").read_text().strip() == subnqn:
            out |= {int((d / "nsid").read_text()) for d in base.glob("nvme*n*")
                    if (d / "nsid").exists()}
    return out


def test_namespace_added_live_appears_on_the_host(target: vt.VmTarget) -> None:
    guest.nvme_connect(SUBNQN, trsvcid=PORT, hostnqn=HOSTNQN, nr_io_queues=1)
    assert guest.wait_for(lambda: _host_nsids(SUBNQN) == {1} or None, 30, "ns 1 on the host")
    path = "/dev/shm/live-ns2.img"
    target.rpc("create", path=f"/subsystems/{SUBNQN}/namespaces", name=2,
         attrs={"device": {"path": path, "size": str(32 * MiB), "create": "1"},
                "": {"buffered_io": "1"}})
    target.rpc("enable", path=f"/subsystems/{SUBNQN}/namespaces/2")
    # the AEN makes the host rescan: the new namespace shows up without a reconnect
    guest.wait_for(lambda: _host_nsids(SUBNQN) == {1, 2} or None, 60,
                   "namespace 2 on the Linux host after the AEN")
    listed = guest.sh("nvme", "list").stdout
    dev = guest.namespace_block_device(SUBNQN, nsid=2)
    assert Path(dev).name in listed
    target.rpc("disable", path=f"/subsystems/{SUBNQN}/namespaces/2")
    guest.wait_for(lambda: _host_nsids(SUBNQN) == {1} or None, 60,
                   "namespace 2 gone from the Linux host")


def test_port_linked_live_shows_up_in_discovery(target: vt.VmTarget) -> None:
    def subnqns(svc: int) -> set[str]:
        try:
            recs = guest.nvme_discover(trsvcid=svc, hostnqn=HOSTNQN, timeout=30)
        except VMError:  # nothing listens there yet: nvme discover fails
            return set()
        return {r["subnqn"] for r in recs}

    assert SUBNQN not in subnqns(LIVE_PORT)
    target.rpc("create", path="/ports", name=2,
         attrs={"addr": {"trtype": "rdma", "adrfam": "ipv4", "traddr": guest.TRADDR,
                         "trsvcid": str(LIVE_PORT)}})
    target.rpc("link", port=2, subsystem=SUBNQN)
    assert SUBNQN in subnqns(LIVE_PORT)
    target.rpc("unlink", port=2, subsystem=SUBNQN)
    assert SUBNQN not in subnqns(LIVE_PORT)
    target.rpc("delete", path="/ports/2")


@pytest.mark.without_p2pdma
def test_allow_p2pmem_on_rxe_falls_back_with_the_reason(target: vt.VmTarget) -> None:
    explained = target.rpc("p2p_explain")
    mine = [d for d in explained if d["subnqn"] == SUBNQN and d["nsid"] == 1]
    assert mine and not mine[0]["p2p"] and RXE_REASON in mine[0]["reason"], explained
    guest.nvme_connect(SUBNQN, trsvcid=PORT, hostnqn=HOSTNQN, nr_io_queues=1)
    dev = guest.namespace_block_device(SUBNQN, nsid=1)
    before = _ns_stats(target)
    guest.run_fio(["--name=p2p-rxe", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
                   "--rw=randwrite", "--bs=16k", "--iodepth=8", "--size=8M",
                   "--verify=crc32c", "--do_verify=1", "--verify_fatal=1"], timeout=300)
    after = _ns_stats(target)
    decisions = [d for d in target.status()["p2p"]["decisions"] if d["subnqn"] == SUBNQN]
    assert decisions and all(RXE_REASON in d["reason"] and not d["p2p"] for d in decisions)
    moved = after["sysmem_reqs"] - before["sysmem_reqs"]
    assert moved >= 8 * MiB // (16 * 1024) * 2  # every write and every verify read
    assert after["p2p_reqs"] == before["p2p_reqs"] == 0
    by_reason = after.get("sysmem_by_reason", {})
    assert sum(v for k, v in by_reason.items() if RXE_REASON in k) == after["sysmem_reqs"]


def _ns_stats(target: vt.VmTarget) -> dict:
    ns = target.status()["subsystems"][SUBNQN]["namespaces"]
    return next(n["stats"] for n in ns if n["nsid"] == 1)

