"""A port whose RDMA device is not up yet is kept and retried (issue #11), in the VM.

The target starts with an RDMA port on 192.0.2.77, an address of a netdev that has no
RDMA device: the port stays configured, status says why it does not listen, the
target serves on.  Then the RDMA device appears (`rdma link add rxe9`): the target
notices it in /sys/class/infiniband, the port listens, and the Linux host connects.
A separate netdev and rxe device keep rxe0, which other VM tests use, untouched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmet_p2p.testbed import guest
from tests.support import vm_target as vt

pytestmark = pytest.mark.vm

NETDEV = "dummy9"
RXE = "rxe9"
ADDR = "192.0.2.77"  # TEST-NET-1, on the VM's own dummy netdev only
PORT = 4431
NQN = "nqn.2026-11.io.nvmet-p2p:retry"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:99999999-8888-7777-6666-555555555555"


def _remove_rxe() -> None:
    if Path(f"/sys/class/infiniband/{RXE}").exists():
        guest.sh("rdma", "link", "delete", RXE, check=False)
    if Path(f"/sys/class/net/{NETDEV}").exists():
        guest.sh("ip", "link", "delete", NETDEV, check=False)


@pytest.fixture
def netdev_without_rdma() -> Iterator[None]:
    """The NIC is up with its address; its RDMA device is not there yet."""
    guest.modprobe("dummy", "rdma_rxe", "rdma_ucm", "ib_uverbs", "nvme-rdma")
    _remove_rxe()
    guest.sh("ip", "link", "add", NETDEV, "type", "dummy")
    guest.sh("ip", "addr", "add", f"{ADDR}/32", "dev", NETDEV)
    guest.sh("ip", "link", "set", NETDEV, "up")
    yield
    _remove_rxe()


def test_port_listens_once_its_rdma_device_appears(netdev_without_rdma: None,
                                                   tmp_path: Path) -> None:
    shm = guest.shm_file("retry-ns.img", 16 << 20)
    cfg = vt.config([vt.rdma_port(1, PORT, [NQN], traddr=ADDR)],
                    [vt.subsystem(NQN, [vt.file_ns(1, shm, 16 << 20)])])
    tgt = vt.VmTarget(cfg, tmp_path / "target")
    try:
        tgt.start(wait=False)
        port = tgt.status()["ports"]["1"]
        assert port["listening"] is False and "retrying" in port["error"], port
        assert tgt.rpc("list", path="/ports/1/subsystems")["children"][0]["name"] == NQN
        guest.sh("rdma", "link", "add", RXE, "type", "rxe", "netdev", NETDEV)
        t0 = time.monotonic()
        tgt.wait_listening(timeout=60.0)
        took = time.monotonic() - t0
        assert "error" not in tgt.status()["ports"]["1"]
        ctrl = guest.nvme_connect(NQN, ADDR, PORT, hostnqn=HOSTNQN)
        try:
            dev = guest.namespace_block_device(NQN, 1)
            assert Path(dev).exists()
        finally:
            guest.nvme_disconnect(NQN)
        log = tgt.log_text()
        assert f'event=port_not_listening portid=1 reason="cannot listen on {ADDR}:{PORT}' \
            in log
        assert "event=port_listening portid=1 " in log
        print(f"port listening {took:.1f} s after {RXE} appeared; {ctrl} connected")
    finally:
        assert tgt.stop() == 0
        shm.unlink(missing_ok=True)
        assert "Traceback" not in tgt.log_text()
