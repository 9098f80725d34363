"""The transport conformance suite against our RDMA transport, in the VM over rxe.

The host is the Python RDMA initiator (`nvmet_p2p.host.rdma`), the target our
`RdmaTransport` on its own asyncio loop in a thread of this process.  Neither blocks
inside pyverbs (ENVIRONMENT.md: pyverbs holds the GIL while it blocks): the target waits
on event fds with `add_reader`, the host polls its CQs and selects on the CM channel, so
the two threads share the interpreter.  Configuration changes the suite makes run on the
target's loop (`TargetSide.call`).

Two variants: the default transport, and back-pressure (a 2 MiB buffer pool, so two
MDTS-sized commands exhaust it, and a send queue of 2 entries, the least that carries a
read's RDMA WRITE + SEND): every check must pass in both, and the back-pressure variant
must have waited for send-queue room; a test of its own fills the pool.
The keep-alive check needs a fake clock and skips here (it runs over loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from nvmet_p2p.backends import open_backend
from nvmet_p2p.host.base import Host
from nvmet_p2p.p2p.policy import P2PPolicy
from nvmet_p2p.wire import log as lg
from tests.support.conformance import CHECKS, Connect, TargetSide

pytestmark = pytest.mark.vm

PORT = 4431  # not the subprocess targets' ports: a fresh listener per test
SUBNQN = "nqn.2026-12.io.nvmet-p2p:rdma-conformance"
NS_SIZE = 16 << 20
CALL_TIMEOUT = 30.0
VARIANTS = {"default": {}, "backpressure": {"pool_size": 2 << 20, "max_send_depth": 2}}
WAITS: dict[str, Counter[str]] = {v: Counter() for v in VARIANTS}  # summed over the checks
_ports = itertools.count(PORT)


class ThreadedRdmaTarget:
    """A Target with the RDMA transport, its loop running in a thread."""

    def __init__(self, portid: int, trsvcid: int, **transport_opts: Any) -> None:
        from nvmet_p2p.core.target import Target
        from nvmet_p2p.rdma import RdmaTransport
        from nvmet_p2p.testbed.guest import TRADDR, setup_rxe

        setup_rxe()
        self.loop = asyncio.new_event_loop()
        self.p2p = P2PPolicy()
        self.target = Target(loop=self.loop, open_backend=open_backend, p2p=self.p2p)
        self.transport = RdmaTransport(self.target, **transport_opts)
        root = self.target.root
        subsys = root.create_subsystem(SUBNQN)
        subsys.attr_allow_any_host = True
        for nsid in (1, 2):
            ns = subsys.create_namespace(nsid)
            ns.device_backend, ns.device_path = "memory", f"rdma-conf-{nsid}"
            ns.device_size, ns.device_block_size = NS_SIZE, 512
            ns.enable = True
        port = root.create_port(portid)
        port.addr_trtype, port.addr_adrfam = "rdma", "ipv4"
        port.addr_traddr, port.addr_trsvcid = TRADDR, str(trsvcid)
        port.link_subsystem(SUBNQN)  # listens: the CM channel joins the loop
        self.traddr, self.trsvcid = TRADDR, trsvcid
        self.thread = threading.Thread(target=self.loop.run_forever, name="rdma-target",
                                       daemon=True)
        self.thread.start()

    def call(self, fn: Callable[[], Any]) -> Any:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 -- handed back to the test thread
                fut.set_exception(e)
        self.loop.call_soon_threadsafe(run)
        return fut.result(CALL_TIMEOUT)

    def close(self) -> None:
        try:
            self.call(self._shutdown)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(CALL_TIMEOUT)
            self.loop.close()
            self.p2p.close()

    def _shutdown(self) -> None:
        self.target.shutdown()
        self.transport.close()


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def rdma_target(request: pytest.FixtureRequest) -> Iterator[ThreadedRdmaTarget]:
    t = ThreadedRdmaTarget(1, next(_ports), **VARIANTS[request.param])
    try:
        yield t
    finally:
        t.close()


def rdma_pair(t: ThreadedRdmaTarget):
    from nvmet_p2p.host.rdma import RdmaHost

    side = TargetSide(
        target=t.target, subnqn=SUBNQN, nsids=[1, 2], portid=1, trtype=lg.Trtype.RDMA,
        block_size=512, ns_size=NS_SIZE, clock=None, pump=time.sleep, call=t.call,
        queues=lambda: t.call(lambda: len(t.transport.queues)))

    def connect(subnqn: str | None = None, *, hostnqn: str | None = None,
                nr_io_queues: int = 1, queue_size: int = 32, kato_ms: int = 0) -> Host:
        return RdmaHost(t.traddr, t.trsvcid, hostnqn=hostnqn).connect(
            subnqn or SUBNQN, nr_io_queues=nr_io_queues, queue_size=queue_size,
            kato_ms=kato_ms)

    made: list[Any] = []

    def make_pair() -> tuple[TargetSide, Connect]:
        assert not made, "the RDMA pair is built once per test"
        made.append(side)
        return side, connect

    return make_pair


@pytest.mark.timeout(300)
@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_")
                                               for c in CHECKS])
def test_rdma(rdma_target: ThreadedRdmaTarget, check: Any, request: Any) -> None:
    check(rdma_pair(rdma_target))
    stats = rdma_target.call(lambda: dict(rdma_target.transport.stats))
    assert stats["completions"] > 0, stats
    WAITS[request.node.callspec.params["rdma_target"]].update(
        {k: v for k, v in stats.items() if k.endswith("_waits")})


def test_backpressure_variant_waited() -> None:
    """The back-pressure variant is only one if the transport waited in it for send-queue
    room (2 entries: a read's RDMA WRITE and SEND fill it)."""
    if not WAITS["backpressure"]:
        pytest.skip("run together with test_rdma (it counts the waits)")
    print(f"\nRDMA CONFORMANCE WAITS {dict(WAITS)}")
    assert WAITS["backpressure"]["send_waits"] > 0, WAITS


def test_mdts_writes_beyond_the_pool_wait_for_buffers() -> None:
    """Six concurrent MDTS-sized writes against a pool that holds two: the others wait
    for a buffer (no error, no lost data) and are served as buffers come back."""
    from nvmet_p2p.host.rdma import RdmaHost
    from nvmet_p2p.wire.command import IoOpcode, Sqe
    from nvmet_p2p.wire.limits import NVMET_MAX_TRANSFER

    t = ThreadedRdmaTarget(1, next(_ports), **VARIANTS["backpressure"])
    try:
        host = RdmaHost(t.traddr, t.trsvcid).connect(SUBNQN, nr_io_queues=1, queue_size=32)
        try:
            q = host.io[min(host.io)]
            nlb = NVMET_MAX_TRANSFER // 512
            datas = [bytes([i + 1]) * NVMET_MAX_TRANSFER for i in range(6)]
            pend = [q.submit(Sqe(opcode=IoOpcode.WRITE, nsid=1, cdw10=i * nlb,
                                 cdw12=nlb - 1), data=d) for i, d in enumerate(datas)]
            assert [q.wait(p)[0].status for p in pend] == [0] * 6
            for i, d in enumerate(datas):
                assert host.read(1, i * nlb, nlb) == d
        finally:
            host.disconnect()
        stats = t.call(lambda: dict(t.transport.stats))
        print(f"\nRDMA MDTS BEYOND THE POOL: {stats}")
        assert stats["buffer_waits"] > 0, stats
    finally:
        t.close()
