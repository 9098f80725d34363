"""The NVMe/TCP transport on 127.0.0.1 and ::1: what the conformance suite does not ask.

Data buffers (P2P chunk first, system memory with the reason otherwise, payload received
straight into the chunk), the live configuration (a tcp port linked live listens,
unlinking deletes its controllers), discovery entries as the kernel writes them for
TCP, IPv6 and wildcard listeners, the SUCCESS optimisation, the ICResp the host gets.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nvmet_p2p.backends.memory import MemoryBackend
from nvmet_p2p.cmb import AccessRules, Chunk, SystemMemoryProvider
from nvmet_p2p.core.p2pmem import REASON_EXHAUSTED
from nvmet_p2p.host.tcp import (
    IcOptions,
    TargetTerminated,
    TcpConnection,
    TcpHost,
    TcpHostQueue,
)
from nvmet_p2p.p2p.decision import Candidate, decide
from nvmet_p2p.p2p.topology import Topology
from nvmet_p2p.wire import log as lg
from nvmet_p2p.wire import tcp as t
from nvmet_p2p.wire.command import IoOpcode, Sgl, SglType, Sqe
from nvmet_p2p.wire.limits import NVME_DISC_SUBSYS_NAME as DISCOVERY_NQN
from tests.support.loop_env import PORTID, SUBNQN
from tests.support.p2p_machine import INTEL, Machine
from tests.support.tcp_env import TcpEnv

MiB = 1 << 20


@pytest.fixture
def env(tmp_path: Path) -> Iterator[TcpEnv]:
    e = TcpEnv(tmp_path)
    yield e
    leaks = e.close()
    assert not leaks, "leaks at teardown:\n" + "\n".join(leaks)


@pytest.fixture
def m(tmp_path: Path) -> Machine:
    return Machine(tmp_path / "sys")


# -- data buffers: P2P first, system memory otherwise ---------------------------------------

class FakeP2P(SystemMemoryProvider):
    """Memory that the P2P policy would hand out for a namespace's device (what it is made
    of does not matter to the transport: it receives into and sends from its views)."""

    kind = "test-p2pmem"

    def __init__(self, size: int) -> None:
        super().__init__(size, hugepages=False, name="fake p2pmem")


class P2PMemory(MemoryBackend):
    """A memory namespace that takes P2P chunks and records what it saw in them."""

    accepts_p2p = True

    def __init__(self, inner: MemoryBackend) -> None:
        self.__dict__.update(inner.__dict__)
        self.seen: list[tuple[str, Any, bytes]] = []

    def submit_write_p2p(self, slba: int, nlb: int, chunk: Chunk, fua: bool, cb: Any) -> None:
        self.seen.append(("write", chunk.provider, bytes(chunk.view)))
        self.submit_write(slba, nlb, chunk.view, fua, cb)

    def submit_read_p2p(self, slba: int, nlb: int, chunk: Chunk, cb: Any) -> None:
        self.seen.append(("read", chunk.provider, b""))
        self.submit_read(slba, nlb, chunk.view, cb)


def p2p_ns(env: TcpEnv, provider: Any) -> P2PMemory:
    """Namespace 1 on a P2P-accepting backend whose requests get `provider`."""
    env.add_subsystem()

    def swap() -> P2PMemory:
        ns = env.ns(1)
        assert ns is not None
        backend = ns.backend = P2PMemory(ns.backend)
        choice = SimpleNamespace(p2p_dev=provider, reason="a test's provider",
                                 text=lambda: "a test's provider", to_json=dict)
        env.target.p2p.decide = lambda ctrl, n: choice  # type: ignore[method-assign]
        return backend
    return env.call(swap)


def test_write_payload_is_received_straight_into_the_p2p_chunk(env: TcpEnv,
                                                               monkeypatch: Any) -> None:
    provider = FakeP2P(4 * MiB)
    backend = p2p_ns(env, provider)
    regions = {id(r[2].obj) for r in provider.regions()}
    received_into: list[int] = []
    real = t.PduReceiver.buffer

    def buffer(self: t.PduReceiver) -> memoryview:
        view = real(self)
        if self.role == t.Role.CONTROLLER:
            received_into.append(id(view.obj))
        return view
    monkeypatch.setattr(t.PduReceiver, "buffer", buffer)
    h = env.tcp_connect()
    data = random.randbytes(MiB)
    h.write(1, 0, data)
    assert h.read(1, 0, MiB // 512) == data
    [(op, prov, seen), (op2, prov2, _)] = backend.seen
    assert (op, op2) == ("write", "read") and prov is prov2 is provider
    assert seen == data  # the chunk held the payload when the backend got it
    assert regions & set(received_into), "no receive went into the provider's memory"
    st = env.call(lambda: dict(env.ns(1).stats))
    assert st["p2p_reqs"] == 2 and st["p2p_bytes"] == 2 * MiB and st["sysmem_reqs"] == 0
    assert provider.counters()["allocated"] == 0 and provider.counters()["allocs"] == 2
    provider.close()


def test_exhausted_p2p_provider_falls_back_per_request(env: TcpEnv) -> None:
    provider = FakeP2P(16 << 10)
    p2p_ns(env, provider)
    h = env.tcp_connect()
    q = h.io[1]
    datas = [random.randbytes(4096) for _ in range(8)]
    pend = [q.submit(Sqe(opcode=IoOpcode.WRITE, nsid=1, cdw10=i * 8, cdw12=7), data=d)
            for i, d in enumerate(datas)]
    for p in pend:
        assert q.wait(p)[0].status == 0
    for i, d in enumerate(datas):
        assert h.read(1, i * 8, 8) == d
    st = env.call(lambda: dict(env.ns(1).stats))
    fell_back = st["sysmem_by_reason"].get(REASON_EXHAUSTED, 0)
    assert st["p2p_reqs"] + fell_back == 16 and fell_back >= 1
    assert provider.counters()["allocated"] == 0
    provider.close()


def test_in_capsule_writes_use_the_capsule_not_p2p(env: TcpEnv) -> None:
    provider = FakeP2P(MiB)
    backend = p2p_ns(env, provider)
    h = env.tcp_connect()
    h.write(1, 8, random.randbytes(4096), inline=True)
    assert backend.seen == [] and provider.counters()["allocs"] == 0
    provider.close()


def test_tcp_refuses_providers_needing_block_stores(env: TcpEnv) -> None:
    """The kernel's socket copy cannot honour whole-block store rules: decided out."""
    ism = SystemMemoryProvider(1 << 20, hugepages=False, name="ism")
    ism.access = AccessRules(width=8, block=4096)
    plain = FakeP2P(1 << 20)
    why = env.tcp.p2p_can_register(ism)
    assert why is not None and "4096-byte block stores" in why
    assert env.tcp.p2p_can_register(plain) is None
    assert env.tcp.p2p_client(env.tcp_port()) is None  # CPU copies: no DMA client
    ism.close()
    plain.close()


def test_tcp_port_decision_has_no_nic_client(m: Machine) -> None:
    """A tcp port adds no DMA client: the namespace's own CMB is P2P at distance 0."""
    port = SimpleNamespace(portid=1, attr_allow_p2pmem=True)
    d = decide(Topology(m.root, cpu=INTEL), port=port, subnqn=SUBNQN, nsid=1, ns_p2pmem="1",
               transport_client=None, transport_reason=None, ns_client=m.nvme,
               ns_label="bdev /dev/nvme0n1", backend_kinds=frozenset({"p2pmem"}),
               backend_needs="", candidates=[Candidate(m.nvme, "p2pmem of the nvme")])
    assert d.p2p and d.clients == [m.nvme] and d.distance == 0


# -- live configuration -------------------------------------------------------------------------

def _refused(traddr: str, svc: int) -> bool:
    fam = socket.AF_INET6 if ":" in traddr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect((traddr, svc))
        except ConnectionRefusedError:
            return True
    return False


def test_linking_listens_and_unlinking_deletes_controllers(env: TcpEnv) -> None:
    env.add_subsystem(portid=None)
    port = env.tcp_port()
    svc = env.trsvcids[PORTID]
    assert _refused("127.0.0.1", svc)  # a port without subsystems does not listen
    env.call(lambda: port.link_subsystem(SUBNQN))
    h = env.tcp_connect(nr_io_queues=2)
    h.write(1, 0, bytes(512))
    env.call(lambda: port.unlink_subsystem(SUBNQN))
    env.wait(lambda: not env.target.controllers() and not env.tcp.queues,
             "the unlinked port's controllers and queues to go")
    with pytest.raises((ConnectionError, TimeoutError)):
        h.keep_alive()
    assert _refused("127.0.0.1", svc)  # the last subsystem went: no listener
    h.disconnect()
    env.call(lambda: port.link_subsystem(SUBNQN))  # and back, live again
    h2 = env.tcp_connect()
    h2.write(1, 0, bytes(512))


def test_ipv6_port(env: TcpEnv) -> None:
    if not socket.has_ipv6 or _no_ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback (::1)")
    env.call(lambda: env.port(traddr="::1"))
    env.add_subsystem()
    h = env.tcp_connect(nr_io_queues=1)
    data = random.randbytes(8192)
    h.write(1, 0, data)
    assert h.read(1, 0, 16) == data
    disc = env.tcp_connect(DISCOVERY_NQN, nr_io_queues=0)
    [me] = [e for e in disc.discover() if e.subnqn == SUBNQN]
    assert (me.trtype, me.adrfam, me.traddr) == (lg.Trtype.TCP, lg.Adrfam.IPV6, "::1")


def _no_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return True
    return False


def test_discovery_entries_as_the_kernel_writes_them_for_tcp(env: TcpEnv) -> None:
    env.add_subsystem()
    disc = env.tcp_connect(DISCOVERY_NQN, nr_io_queues=0)
    entries = disc.discover()
    assert [e.subtype for e in entries] == [lg.Subtype.CURRENT_DISC, lg.Subtype.NVME]
    for e in entries:
        assert (e.trtype, e.adrfam, e.portid, e.cntlid, e.asqsz) == (
            lg.Trtype.TCP, lg.Adrfam.IPV4, PORTID, 0xFFFF, 32)
        # TREQ: secure channel not specified, SQ flow control disable supported (the
        # kernel's port default); TSAS: security type none
        assert e.treq == lg.Treq.DISABLE_SQFLOW
        assert e.tsas == bytes(lg.TSAS_SIZE) and e.tsas[0] == lg.TcpSectype.NONE
        assert (e.traddr, e.trsvcid) == ("127.0.0.1", str(env.trsvcids[PORTID]))


def test_wildcard_port_names_the_address_the_host_reached(env: TcpEnv) -> None:
    env.call(lambda: env.port(traddr="0.0.0.0"))
    env.add_subsystem()
    port = env.root.ports[PORTID]
    disc = TcpHost("127.0.0.1", env.trsvcids[PORTID]).connect(DISCOVERY_NQN,
                                                               nr_io_queues=0)
    try:
        assert {e.traddr for e in disc.discover()} == {"127.0.0.1"}
        assert port.addr_traddr == "0.0.0.0"
    finally:
        disc.disconnect()


# -- the IC exchange and the response path ----------------------------------------------------

def test_icresp_values(env: TcpEnv) -> None:
    env.add_subsystem()
    port = env.root.ports[PORTID]
    for hd, dd in ((False, False), (True, False), (False, True), (True, True)):
        conn = TcpConnection("127.0.0.1", int(port.addr_trsvcid),
                             ic=IcOptions(hdgst=hd, ddgst=dd))
        resp = conn.icresp
        assert resp is not None
        assert (resp.pfv, resp.cpda, resp.maxh2cdata) == (0, 0, 128 << 10)
        assert resp.digest == (t.Digest.HDR if hd else 0) | (t.Digest.DATA if dd else 0)
        conn.close()


def test_c2h_success_only_without_sq_flow_control(env: TcpEnv) -> None:
    env.add_subsystem()
    data = random.randbytes(4096)
    for no_sqflow in (False, True):
        h = env.tcp_connect(disable_sqflow=no_sqflow)
        h.write(1, 0, data)
        assert h.read(1, 0, 8) == data
        q = h.io[1]
        assert isinstance(q, TcpHostQueue)
        assert q.c2h_success == (1 if no_sqflow else 0)
        h.disconnect()
    assert env.call(lambda: env.tcp.stats["c2h_success"]) == 1


def test_sq_head_moves_with_each_completion(env: TcpEnv) -> None:
    env.add_subsystem()
    h = env.tcp_connect(queue_size=4)
    heads = []
    for _ in range(6):
        cqe, _ = h.io[1].execute(Sqe(opcode=IoOpcode.FLUSH, nsid=1))
        heads.append(cqe.sq_head)
    assert heads == [2, 3, 0, 1, 2, 3]  # Connect took slot 0 -> head 1


def test_admin_queue_takes_in_capsule_data_whatever_the_port_says(env: TcpEnv) -> None:
    """The Linux host sends up to NVME_TCP_ADMIN_CCSZ (8 KiB) in the capsule on admin
    queues and Connect data in the capsule on every queue, whatever the port's
    inline_data_size (here 0: no in-capsule data on I/O queues, IOCCSZ 4)."""
    env.call(lambda: env.port(inline_data_size=0))
    env.add_subsystem()
    h = env.tcp_connect(inline_connect=True)  # 1 KiB of Connect data in each capsule
    assert h.identify_ctrl().ioccsz == 4
    q = h.io[1]
    assert isinstance(q, TcpHostQueue)
    with pytest.raises(TargetTerminated) as err:  # in-capsule data on the I/O queue
        q.raw(Sqe(opcode=IoOpcode.WRITE, nsid=1, flags=0x40, cid=3,
                  dptr=Sgl(SglType.DATA_BLOCK_OFFSET, 0, 512).encode()).encode() + bytes(512))
    assert err.value.fes == t.Fes.DATA_LIMIT_EXCEEDED
    h.disconnect()


def test_connect_data_by_r2t(env: TcpEnv) -> None:
    """A host may send Connect's 1 KiB by R2T instead of in the capsule (SPDK's host can);
    before Connect the queue's size is unknown and the command still gets its buffer."""
    env.add_subsystem()
    r2ts = env.call(lambda: env.tcp.stats["r2t"])
    h = env.tcp_connect(inline_connect=False, nr_io_queues=2)
    assert env.call(lambda: env.tcp.stats["r2t"]) == r2ts + 3  # admin + 2 I/O Connects
    h.write(1, 0, bytes(512))
