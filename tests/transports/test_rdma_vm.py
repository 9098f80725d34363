"""The RDMA transport over soft-RoCE, end to end: runs only inside the test VM.

The target (the daemon with one memory namespace and one rdma port on the VM's rxe
address) runs in its own process and the pyverbs host tool in the test process:
pyverbs holds the GIL while it blocks, so the two never share an interpreter.
`python tests/test_rdma_vm.py serve CONFIG LOG` is that target process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nvmet_p2p.testbed.guest import TRADDR
from tests.support.capsules import cm_pdata, write_capsule

pytestmark = pytest.mark.vm

NQN = "nqn.2014-08.io.nvmet-p2p:rdma-vm"
PORT = 4420
NS_SIZE = 8 << 20
BS = 512
START_TIMEOUT = 120.0  # importing pyverbs + asyncio alone takes ~5 s under TCG

CONFIG = {
    "hosts": [],
    "ports": [{"portid": 1,
               "addr": {"trtype": "rdma", "adrfam": "ipv4", "traddr": TRADDR,
                        "trsvcid": str(PORT)},
               "subsystems": [NQN]}],
    "subsystems": [{"nqn": NQN, "attr": {"allow_any_host": "1"}, "allowed_hosts": [],
                    "namespaces": [{"nsid": 1, "enable": 1,
                                    "device": {"backend": "memory", "path": "mem0",
                                               "size": NS_SIZE}}]}],
}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from nvmet_p2p.testbed.guest import setup_rxe

    setup_rxe()
    d = tmp_path_factory.mktemp("rdma")
    cfg, log = d / "config.json", d / "target.log"
    cfg.write_text(json.dumps(CONFIG))
    proc = subprocess.Popen([sys.executable, __file__, "serve", str(cfg), str(log)])
    try:
        _wait_listening(proc)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        sys.stderr.write(log.read_text() if log.exists() else "(no target log)\n")


def _wait_listening(proc: subprocess.Popen) -> None:
    from nvmet_p2p.host.rdma import RdmaHost
    from nvmet_p2p.transports.rdma_cm import CmRequest

    host = RdmaHost(TRADDR, PORT, timeout=5.0)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"target exited with {proc.returncode}")
        if host.connect_raw(CmRequest(0, 0, 32, 31).encode())[0] == "accepted":
            return
        time.sleep(0.5)
    raise TimeoutError("target did not start listening")


@pytest.fixture
def host(target):
    from nvmet_p2p.host.rdma import RdmaHost

    h = RdmaHost(TRADDR, PORT)
    yield h
    h.disconnect()


# -- CM -----------------------------------------------------------------------------------

@pytest.mark.parametrize("pdata,status", [
    pytest.param(cm_pdata(recfmt=1), 0x02, id="recfmt"),
    pytest.param(cm_pdata(qid=1000), 0x03, id="qid"),
    pytest.param(cm_pdata(hsqsize=0), 0x04, id="hsqsize-0"),
    pytest.param(cm_pdata(hsqsize=32, hrqsize=32), 0x04, id="admin-hsqsize-33"),
    pytest.param(cm_pdata(qid=1, hsqsize=4096, hrqsize=128), 0x04, id="io-hsqsize-too-big"),
    pytest.param(cm_pdata(hrqsize=0), 0x05, id="hrqsize-0"),
])
def test_cm_reject(host, pdata, status):
    assert host.connect_raw(pdata) == ("rejected", status)


def test_cm_reject_short_private_data(host):
    # The IB CM carries a fixed 56-byte private data area on RoCE: 4 bytes arrive as
    # 4 bytes + zeros, so the target sees hsqsize 0 (0x04); a transport that passes the
    # true length would give 0x01.  Both are rejections for a malformed request.
    assert host.connect_raw(b"\0\0\0\0") in (("rejected", 0x01), ("rejected", 0x04))


def test_cm_accept_crqsize(host):
    assert host.connect_raw(cm_pdata(qid=0, hrqsize=32, hsqsize=31)) == ("accepted", 32)
    assert host.connect_raw(cm_pdata(qid=1, hrqsize=16, hsqsize=15)) == ("accepted", 16)


# -- fabrics and I/O ---------------------------------------------------------------------

def test_connect_and_properties(host):
    host.connect(NQN, nr_io_queues=1, queue_size=32)
    cap = host.property_get(0x00, 8)
    assert cap & 0xFFFF >= 31  # MQES
    assert host.property_get(0x1C) & 1  # CSTS.RDY after CC.EN
    assert host.property_get(0x14) & 1  # CC.EN reads back


def test_write_read_keyed_and_inline(host):
    host.connect(NQN, nr_io_queues=1, queue_size=32)
    data = os.urandom(8192)
    host.write(1, 0, data)
    assert host.read(1, 0, len(data) // BS) == data
    small = os.urandom(2048)
    host.write(1, 100, small, inline=True)
    assert host.read(1, 100, len(small) // BS) == small
    big = os.urandom(128 << 10)
    host.write(1, 1000, big)
    assert host.read(1, 1000, len(big) // BS) == big


def test_write_with_invalidate(host):
    """The response to a 0x4F SGL is a SEND_WITH_INV naming our rkey.

    rxe can only invalidate fast-registration MRs and memory windows; the host tool
    exposes plain user MRs, so rxe answers the invalidate with a failed receive
    (IBV_WC_REM_INV_REQ_ERR = 9) instead of a plain CQE.  A plain SEND would have
    completed normally: the failure itself proves the target asked for invalidation.
    (The opcode and rkey are also checked with fake verbs in tests/test_rdma.py.)
    """
    from nvmet_p2p.wire.command import IoOpcode, Sqe

    host.connect(NQN, nr_io_queues=1, queue_size=32)
    q = host.io[1]
    data = bytearray(os.urandom(4096))
    sgl = q.expose(data, invalidate=True)
    sqe = Sqe(opcode=IoOpcode.WRITE, nsid=1, cdw10=200, cdw12=len(data) // BS - 1)
    with pytest.raises(ConnectionError, match="wc status 9"):
        q.wait(q.submit(sqe, sgl=sgl))
    host.io.pop(1).close()
    # The data went through the RDMA READ before the response: read it back on a new queue.
    q2 = host.open_queue(1, 32)
    host.connect_queue(q2, NQN, host.cntlid)
    host.io[1] = q2
    assert host.read(1, 200, len(data) // BS) == bytes(data)


@pytest.mark.parametrize("offset", [4095, 8192, (1 << 64) - 512])
def test_inline_offset_invalid(host, offset):
    from nvmet_p2p.wire.command import Sgl, SglType

    host.connect(NQN, nr_io_queues=1, queue_size=32)
    sgl = Sgl(SglType.DATA_BLOCK_OFFSET, offset, BS)
    cqe = host.io[1].raw(write_capsule(7, sgl, bytes(BS)))
    assert cqe.status & 0x7FF == 0x16


def test_unknown_sgl_type(host):
    from nvmet_p2p.wire.command import Sgl

    host.connect(NQN, nr_io_queues=1, queue_size=32)
    cqe = host.io[1].raw(write_capsule(8, Sgl(0x50, 0, BS)))
    assert cqe.status & 0x7FF == 0x11


def test_keyed_length_over_mdts(host):
    from nvmet_p2p.wire.command import Sgl, SglType

    host.connect(NQN, nr_io_queues=1, queue_size=32)
    length = 2 << 20  # MDTS is 1 MiB
    cqe = host.io[1].raw(write_capsule(9, Sgl(SglType.KEYED_DATA_BLOCK, 0x1000, length,
                                                0x1234), nlb=length // BS))
    assert cqe.status & 0x7FF == 0x0F


def test_nlb_mismatch_sgl_length(host):
    from nvmet_p2p.wire.command import Sgl, SglType

    host.connect(NQN, nr_io_queues=1, queue_size=32)
    cqe = host.io[1].raw(write_capsule(10, Sgl(SglType.KEYED_DATA_BLOCK, 0x1000, 2 * BS,
                                                 0x1234), nlb=1))
    assert cqe.status & 0x7FF == 0x0F


def test_bad_rkey_tears_queue_down(host):
    from nvmet_p2p.wire.command import Sgl, SglType

    host.connect(NQN, nr_io_queues=1, queue_size=32)
    with pytest.raises((ConnectionError, TimeoutError)) as exc:
        host.io[1].raw(write_capsule(11, Sgl(SglType.KEYED_DATA_BLOCK, 0x1000, BS,
                                              0xBAD0BAD), nlb=1), timeout=20)
    assert exc.type is ConnectionError  # the RC QP failed, the target dropped the queue
    host.io.pop(1).close()
    # The admin queue of the same controller is still usable.
    assert host.property_get(0x1C) & 1


def test_many_connect_cycles_and_idle_cost(target):
    from nvmet_p2p.host.rdma import RdmaHost

    for _ in range(10):
        h = RdmaHost(TRADDR, PORT).connect(NQN, nr_io_queues=2, queue_size=16)
        data = os.urandom(4096)
        h.write(1, 300, data, qid=2)
        assert h.read(1, 300, 8, qid=1) == data
        h.disconnect()
    h = RdmaHost(TRADDR, PORT).connect(NQN, nr_io_queues=1)
    try:
        before, t0 = _cpu_seconds(target.pid), time.monotonic()
        time.sleep(3.0)
        cpu = (_cpu_seconds(target.pid) - before) / (time.monotonic() - t0)
        print(f"target CPU while idle with 2 queues polled: {cpu:.1%}")
        assert cpu < 0.6  # the idle back-off keeps a TCG vCPU mostly free
    finally:
        h.disconnect()


# -- the target process ------------------------------------------------------------------

def _serve(config: str, log_path: str) -> int:
    from nvmet_p2p.control.daemon import Daemon

    logging.basicConfig(filename=log_path, level=logging.DEBUG,
                        format="%(relativeCreated)8.0f %(name)s %(levelname)s %(message)s")
    daemon = Daemon(config)
    rc = daemon.run()
    for t in daemon.transports:
        if hasattr(t, "stats"):
            logging.getLogger(__name__).info("rdma stats %s", t.stats)
    return rc


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "serve":
    sys.exit(_serve(sys.argv[2], sys.argv[3]))
