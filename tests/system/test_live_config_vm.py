"""What the Linux host sees of the log pages we serve and of the kernel's live rules.

Runs only inside the test VM (`python -m nvmet_p2p.testbed.vm pytest tests/test_live_config_vm.py`):
* nvme-cli reads Supported Log Pages (LID 00h) and finds exactly the pages Get Log Page
  serves, and Identify Controller LPA agrees;
* once the Linux host has connected (it identifies the controller while connecting), the
  subsystem's serial is refused through the RPC API, as the kernel refuses it;
* changing attr_qid_max makes the connected Linux host reconnect with the new number of
  I/O queues, as blktests nvme/048 expects of the kernel target.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nvmet_p2p.control.rpc import CONFIG_ERROR, RpcError
from nvmet_p2p.testbed import guest
from nvmet_p2p.wire import log as lg
from tests.support import vm_target as vt

pytestmark = pytest.mark.vm

SUBNQN = "nqn.2026-11.io.nvmet-p2p:live-config"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6d1c1b2e-4a5f-4e3b-9c1d-00000000c0f1"
PORT = 4432
MiB = 1 << 20
NVME_CLI_TIMEOUT = 60.0
# The Linux host retries every reconnect_delay (10 s by default) after losing the
# controller; a loaded TCG guest needs a few rounds.
RECONNECT_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[vt.VmTarget]:
    guest.setup_rxe()
    guest.modprobe("nvme-rdma")
    cfg = vt.config([vt.rdma_port(1, PORT, [SUBNQN])],
                    [vt.subsystem(SUBNQN, [vt.file_ns(1, "/dev/shm/live-config-ns1.img",
                                                      16 * MiB)])])
    with vt.VmTarget(cfg, tmp_path_factory.mktemp("live-config")) as tgt:
        yield tgt
    for f in Path("/dev/shm").glob("live-config-*.img"):
        f.unlink()
    assert tgt.returncode == 0, tgt.log_tail()


@pytest.fixture(autouse=True)
def no_ctrl_left(target: vt.VmTarget) -> Iterator[None]:
    yield
    assert not vt.disconnect_all([SUBNQN])
    assert target.alive(), target.log_tail()


def _our_ctrls(target: vt.VmTarget) -> list[dict[str, Any]]:
    return [c for c in target.controllers() if c["subsys"] == SUBNQN]


def test_supported_log_pages_from_nvme_cli(target: vt.VmTarget) -> None:
    ctrl = guest.nvme_connect(SUBNQN, trsvcid=PORT, hostnqn=HOSTNQN, nr_io_queues=1)
    dev = f"/dev/{ctrl}"
    cp = subprocess.run(["nvme", "get-log", dev, "--log-id=0",
                         f"--log-len={lg.SUPPORTED_LOG_SIZE}", "--raw-binary"],
                        capture_output=True, timeout=NVME_CLI_TIMEOUT, check=False)
    assert cp.returncode == 0, cp.stderr.decode(errors="replace")
    lids = lg.SupportedLogPages.decode(cp.stdout).lids
    assert lids == {lid: lg.LidSupport.LSUPP for lid in range(6)}
    for lid in range(256):  # what the page lists is what nvme-cli can read
        got = guest.sh("nvme", "get-log", dev, f"--log-id={lid}", "--log-len=512",
                       timeout=NVME_CLI_TIMEOUT, check=False)
        assert (got.returncode == 0) == (lid in lids), (lid, got.stderr)
    ident = json.loads(guest.sh("nvme", "id-ctrl", dev, "-o", "json").stdout)
    assert int(ident["lpa"]) == 1 << 1 | 1 << 2  # effects log, extended data


def test_serial_refused_after_the_linux_host_identified(target: vt.VmTarget) -> None:
    path = f"/subsystems/{SUBNQN}"
    serial = target.rpc("get", path=path, group="attr", name="serial")["attr"]["serial"]
    ctrl = guest.nvme_connect(SUBNQN, trsvcid=PORT, hostnqn=HOSTNQN, nr_io_queues=1)
    with pytest.raises(RpcError) as e:
        target.rpc("set", path=path, group="attr", name="serial", value="SN-CHANGED")
    assert e.value.code == CONFIG_ERROR
    assert "has been identified by a host, so attr_serial cannot change" in e.value.message
    ident = json.loads(guest.sh("nvme", "id-ctrl", f"/dev/{ctrl}", "-o", "json").stdout)
    assert ident["sn"].strip() == serial


def test_qid_max_change_reconnects_the_linux_host(target: vt.VmTarget) -> None:
    ctrl = guest.nvme_connect(SUBNQN, trsvcid=PORT, hostnqn=HOSTNQN, nr_io_queues=2)
    [before] = _our_ctrls(target)
    assert before["queues"] == [0, 1, 2]
    target.rpc("set", path=f"/subsystems/{SUBNQN}", group="attr", name="qid_max", value=1)
    state = Path("/sys/class/nvme", ctrl, "state")

    def reconnected() -> dict[str, Any] | None:
        mine = _our_ctrls(target)
        if state.read_text().strip() != "live" or len(mine) != 1:
            return None
        return mine[0] if mine[0]["cntlid"] != before["cntlid"] else None

    after = guest.wait_for(reconnected, RECONNECT_TIMEOUT, f"{ctrl} back with a new controller")
    assert after["queues"] == [0, 1]  # the host asked for 2 and got qid_max
    blk = guest.namespace_block_device(SUBNQN, 1)
    guest.sh("dd", "if=/dev/zero", f"of={blk}", "bs=4k", "count=16", "oflag=direct")
    guest.nvme_disconnect(SUBNQN)
    target.rpc("set", path=f"/subsystems/{SUBNQN}", group="attr", name="qid_max", value=128)
