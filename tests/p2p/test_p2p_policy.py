"""The P2P policy (nvmet_p2p/p2p/): every step of the decision order with its exact reason,
the choice among providers, and the loop data path end to end over a synthetic sysfs tree
(the core's per-request buffer, its fallbacks and counters).

The end-to-end tests put a fake PCI NVMe namespace (a Backend whose P2P-flagged I/O moves
data between an in-memory "media" and the chunk, as a controller's DMA would) behind a loop
port, with a provider that is a `SysfsBarProvider` mapping a regular file standing in for
the NVMe's `resource2` in the synthetic tree.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nvmet_p2p import logfmt
from nvmet_p2p.backends.base import Backend, Completion
from nvmet_p2p.cmb import Chunk, KernelP2pmemProvider, SysfsBarProvider, copy_from, copy_into
from nvmet_p2p.core.p2pmem import REASON_EXHAUSTED, REASON_IN_CAPSULE
from nvmet_p2p.errors import ConfigError, P2PError
from nvmet_p2p.p2p.decision import Candidate, decide
from nvmet_p2p.p2p.explain import explain
from nvmet_p2p.p2p.policy import P2PPolicy
from nvmet_p2p.p2p.topology import Topology
from nvmet_p2p.wire.command import IoOpcode, Sqe
from tests.support.loop_env import PORTID, SUBNQN, LoopEnv
from tests.support.p2p_machine import AMD_ZEN, INTEL, NOT_PCI, Machine

NO_PROVIDER = ("no P2P memory provider is available (no published p2pmem, no NVMe CMB with "
               "WDS and RDS)")
ANY_KIND = frozenset({"p2pmem", "nvme-cmb", "sysfs-bar", "vfio-bar"})


@pytest.fixture
def m(tmp_path: Path) -> Machine:
    return Machine(tmp_path / "sys")


def port(allow: bool = True, portid: int = 1) -> Any:
    return SimpleNamespace(portid=portid, attr_allow_p2pmem=allow)


def run_decide(m: Machine, *, cpu: str = INTEL, allow: bool = True, p2pmem: str = "1",
               transport_client: str | None = None, transport_reason: str | None = None,
               ns_client: str | None = None, ns_label: str = "vfio-nvme x",
               kinds: frozenset[str] = ANY_KIND, needs: str = "it needs a bus address",
               candidates: list[Candidate] | None = None,
               can_register: Any = None, rng: random.Random | None = None):
    return decide(Topology(m.root, cpu=cpu), port=port(allow), subnqn=SUBNQN, nsid=1,
                  ns_p2pmem=p2pmem, transport_client=transport_client,
                  transport_reason=transport_reason,
                  ns_client=m.nvme if ns_client is None and ns_label.startswith("vfio")
                  else ns_client, ns_label=ns_label, backend_kinds=kinds, backend_needs=needs,
                  candidates=[Candidate(m.peer1, "peer1")] if candidates is None
                  else candidates, can_register=can_register, rng=rng)


# -- the decision order, one step at a time --------------------------------------------------

def test_p2p_when_everything_allows_it(m):
    d = run_decide(m, transport_client="mlx5_0")
    assert d.p2p and d.reason == "nearest provider peer1"
    assert (d.provider, d.provider_bdf, d.map_type) == ("peer1", m.peer1, "bus_addr")
    assert d.distance == 8  # NIC -> peer1 = 4, NVMe -> peer1 = 4
    assert d.clients == ["mlx5_0", m.nvme]
    assert d.text() == (f"port 1 {SUBNQN} ns 1: P2P memory from peer1 (bus_addr, "
                        f"distance 8)")


def test_step1_port_allow_p2pmem_off(m):
    d = run_decide(m, allow=False)
    assert not d.p2p and d.reason == "port 1: allow_p2pmem is off"
    assert d.text() == f"port 1 {SUBNQN} ns 1: system memory: port 1: allow_p2pmem is off"


def test_step2_namespace_p2pmem_0(m):
    d = run_decide(m, p2pmem="0")
    assert not d.p2p and d.reason == "namespace 1: p2pmem is 0"


def test_step3_the_transport_is_asked_through_its_declared_interface(m):
    policy = P2PPolicy(m.root, cpu=INTEL)
    ns = SimpleNamespace(nsid=1, cfg=None, backend=FakePciNvme(m.nvme, 1 << 20))
    subsys = SimpleNamespace(nqn=SUBNQN, ns={1: ns})
    asked = []
    ops = SimpleNamespace(p2p_client=lambda p: asked.append(p) or "rxe0",
                          p2p_can_register=lambda prov: None)
    p = port()
    d = policy.decide_for(p, ops, subsys, ns, [ns])
    assert asked == [p] and not d.p2p
    assert d.reason == f"rxe0 is not a PCI device (soft-RoCE); it {NOT_PCI}"
    d = policy.decide_for(SimpleNamespace(portid=1, attr_allow_p2pmem=True,
                                          addr_trtype="fc"), None, subsys, ns, [ns])
    assert d.reason == "transport fc is not available in this target"


def test_step3_soft_roce_transport_client(m):
    d = run_decide(m, transport_client="rxe0")
    assert not d.p2p
    assert d.reason == f"rxe0 is not a PCI device (soft-RoCE); it {NOT_PCI}"
    assert d.clients == ["rxe0", m.nvme]


def test_step3_rdma_client_is_judged_before_a_file_namespace(m):
    d = run_decide(m, transport_client="rxe0", ns_label="file /tmp/x.img")
    assert d.reason.startswith("rxe0 is not a PCI device (soft-RoCE)")


@pytest.mark.parametrize("label", ["file /tmp/x.img", "memory ns1"])
def test_step3_file_or_memory_namespace_is_not_pci(m, label):
    d = run_decide(m, ns_label=label)
    assert not d.p2p
    assert d.reason == f"namespace 1: {label} is not a PCI device; it {NOT_PCI}"


def test_step4_no_provider(m):
    d = run_decide(m, candidates=[])
    assert not d.p2p and d.reason == NO_PROVIDER


def test_step4_unusable_providers_are_never_chosen(m):
    cands = [Candidate(m.peer1, "peer1/cmb", None, "CMB lacks WDS")]
    d = run_decide(m, candidates=cands)
    assert d.reason == "no usable P2P memory provider: peer1/cmb: CMB lacks WDS"
    d = run_decide(m, p2pmem=m.peer1, candidates=cands)
    assert d.reason == (f"namespace 1: pinned provider {m.peer1} cannot be used: "
                        "peer1/cmb: CMB lacks WDS")


def test_step4_pinned_bdf_unknown(m):
    d = run_decide(m, p2pmem="0000:09:00.0",
                   candidates=[Candidate(m.peer2, "peer2"), Candidate(m.peer1, "peer1")])
    assert not d.p2p
    assert d.reason == (f"namespace 1: pinned provider 0000:09:00.0 publishes no P2P memory: "
                        f"it has no p2pmem in sysfs and no CMB our NVMe driver enabled "
                        f"(known providers: {m.peer1}, {m.peer2})")


def test_step4_pinned_bdf_wins_over_a_nearer_one(m):
    cands = [Candidate(m.nvme_fn1, "fn1"), Candidate(m.peer2, "peer2")]
    assert run_decide(m, candidates=cands).provider == "fn1"
    d = run_decide(m, p2pmem=m.peer2, candidates=cands)
    assert d.p2p and d.provider == "peer2" and d.distance == 4


def test_step5_topology_not_supported_on_intel_without_whitelisted_host_bridge(m):
    d = run_decide(m, candidates=[Candidate(m.far, "far")])
    assert not d.p2p and d.provider is None
    assert d.reason.startswith(f"provider {m.far}: {m.nvme} and provider {m.far} share no "
                               "upstream bridge; their traffic goes through the host bridge")
    assert ("host bridge 8086:29c0 (0000:00:00.0) is not in the P2PDMA whitelist, and the "
            "CPU (GenuineIntel family 0x6) is not AMD Zen or newer") in d.reason
    # the same tree on AMD Zen: allowed through the host bridge
    d = run_decide(m, cpu=AMD_ZEN, candidates=[Candidate(m.far, "far")])
    assert d.p2p and d.map_type == "thru_host_bridge"


def test_step6_backend_that_does_not_accept_p2p(m):
    d = run_decide(m, ns_label="bdev /dev/vda", ns_client=m.nvme, kinds=frozenset(),
                   needs="/dev/vda is not an NVMe namespace")
    assert not d.p2p
    assert d.reason == ("namespace 1: the bdev /dev/vda backend cannot issue P2P-flagged "
                        "I/O: /dev/vda is not an NVMe namespace")
    assert d.provider == "peer1" and d.distance == 4  # the topology was fine
    assert d.text().endswith("(nearest provider peer1, distance 4)")


def test_step4_memory_the_backend_cannot_use_is_no_candidate(m):
    cands = [Candidate(m.nvme_fn1, "fn1/cmb", kind="nvme-cmb"), Candidate(m.peer2, "peer2")]
    bdev = {"ns_label": "bdev /dev/nvme0n1", "ns_client": m.nvme,
            "kinds": frozenset({"p2pmem"}), "needs": "O_DIRECT needs pinnable pages"}
    d = run_decide(m, candidates=cands, **bdev)
    assert d.p2p and d.provider == "peer2"  # fn1 is nearer, but a BAR mapped by VFIO
    d = run_decide(m, candidates=cands[:1], **bdev)
    assert d.reason == ("no usable P2P memory provider: fn1/cmb: the bdev /dev/nvme0n1 "
                        "backend cannot use nvme-cmb memory: O_DIRECT needs pinnable pages")


def test_step6_registration_refused(m):
    prov = SimpleNamespace(counters=lambda: {"available": 1}, name="peer1/bar2")
    asked = []

    def can_register(p):
        asked.append(p)
        return "ibv_reg_mr failed: Bad address (no P2P support in ib_umem_get)"
    d = run_decide(m, transport_client="mlx5_0",
                   candidates=[Candidate(m.peer1, "peer1/bar2", prov)],
                   can_register=can_register)
    assert asked == [prov] and not d.p2p
    assert d.reason == ("the transport cannot register peer1/bar2: ibv_reg_mr failed: Bad "
                        "address (no P2P support in ib_umem_get)")
    assert d.p2p_dev is None


def test_unknown_namespace_device_is_reported_not_raised(m):
    policy = P2PPolicy(m.root, cpu=INTEL)
    ns = SimpleNamespace(nsid=1, cfg=None, backend=FakePciNvme("0000:0f:00.0", 1 << 20))
    subsys = SimpleNamespace(nqn=SUBNQN, ns={1: ns})
    ops = SimpleNamespace(p2p_client=lambda p: None, p2p_can_register=lambda prov: None)
    d = policy.decide_for(port(), ops, subsys, ns, [ns])
    assert not d.p2p
    assert d.reason == ("topology could not be evaluated: no PCI device 0000:0f:00.0 under "
                        f"{m.root}")


# -- choosing among providers ----------------------------------------------------------------

def test_nearest_provider_is_chosen(m):
    cands = [Candidate(m.peer1, "peer1"), Candidate(m.nvme_fn1, "fn1"),
             Candidate(m.far, "far")]
    for seed in range(5):
        d = run_decide(m, cpu=AMD_ZEN, candidates=cands, rng=random.Random(seed))
        assert d.provider == "fn1" and d.distance == 2
    own = run_decide(m, candidates=cands + [Candidate(m.nvme, "own cmb")])
    assert own.provider == "own cmb" and own.distance == 0


def test_ties_are_spread_by_the_seeded_rng(m):
    cands = [Candidate(m.peer1, "peer1"), Candidate(m.peer2, "peer2")]
    picks = [run_decide(m, candidates=cands, rng=random.Random(s)).provider
             for s in range(40)]
    counts = Counter(picks)
    assert set(counts) == {"peer1", "peer2"}, counts
    assert min(counts.values()) >= 8, counts  # 40 fair coin flips
    again = [run_decide(m, candidates=cands, rng=random.Random(s)).provider
             for s in range(40)]
    assert again == picks  # the seed decides


def test_several_pools_behind_one_bdf_pick_the_roomiest(m):
    def pool(avail):
        return SimpleNamespace(counters=lambda: {"available": avail})
    small, big = pool(4096), pool(1 << 20)
    d = run_decide(m, candidates=[Candidate(m.peer1, "a", small), Candidate(m.peer1, "b", big)])
    assert d.provider == "b" and d.p2p_dev is big


# -- the loop data path end to end -----------------------------------------------------------

class FakePciNvme(Backend):
    """A PCI NVMe namespace in memory: P2P-flagged I/O is the 'device' reading or writing
    the chunk (through its view, with the provider's access rules); completions arrive
    on the loop later, as a real device's would, so requests overlap."""

    kind = "fake-nvme"
    p2p_kinds = frozenset({"nvme-cmb"})

    def __init__(self, bdf: str, size: int, loop: asyncio.AbstractEventLoop | None = None,
                 cmb: Any = None) -> None:
        self.p2p_client = self.path = bdf
        self.block_size, self.nblocks = 512, size // 512
        self.media = bytearray(size)
        self.loop, self.cmb = loop, cmb
        self.p2p_ios = {"read": 0, "write": 0}
        self.closed = False

    def _done(self, cb: Completion, status: int = 0) -> None:
        if self.loop is None:
            cb(status)
        else:
            self.loop.call_soon(cb, status)

    def _span(self, slba: int, nlb: int) -> slice:
        return slice(slba * 512, (slba + nlb) * 512)

    def submit_read(self, slba, nlb, buf, cb):
        buf[:nlb * 512] = self.media[self._span(slba, nlb)]
        self._done(cb)

    def submit_write(self, slba, nlb, buf, fua, cb):
        self.media[self._span(slba, nlb)] = buf[:nlb * 512]
        self._done(cb)

    def submit_read_p2p(self, slba: int, nlb: int, chunk: Chunk, cb: Completion) -> None:
        self.p2p_ios["read"] += 1
        copy_into(chunk, self.media[self._span(slba, nlb)], chunk.provider.access)
        self._done(cb)

    def submit_write_p2p(self, slba: int, nlb: int, chunk: Chunk, fua: bool,
                         cb: Completion) -> None:
        self.p2p_ios["write"] += 1
        self.media[self._span(slba, nlb)] = copy_from(chunk, chunk.provider.access, 0,
                                                      nlb * 512)
        self._done(cb)

    def submit_flush(self, cb):
        self._done(cb)

    def submit_write_zeroes(self, slba, nlb, cb):
        self.media[self._span(slba, nlb)] = bytes(nlb * 512)
        self._done(cb)

    def submit_discard(self, ranges, cb):
        self._done(cb)

    def close(self) -> None:
        if not self.closed and self.cmb is not None:
            self.cmb.close()
        self.closed = True


NS_BYTES = 4 << 20


class P2PEnv:
    """A LoopEnv whose target has a P2P policy over the synthetic machine and whose
    namespaces named 'fake-nvme' are FakePciNvme with a 'CMB' (resource2 of the NVMe), as
    our own NVMe driver sees one; 'fake-kernel-nvme' is a namespace of the kernel's NVMe
    driver, whose P2P-flagged I/O (O_DIRECT) takes kernel p2pmem (`kernel_p2pmem()`)."""

    def __init__(self, env: LoopEnv, m: Machine, monkeypatch: pytest.MonkeyPatch,
                 cmb_size: int = 1 << 20) -> None:
        self.env, self.m = env, m
        self.policy = P2PPolicy(m.root, cpu=INTEL, rng=random.Random(1))
        env.p2p = env.target.p2p = self.policy
        m.bar(m.nvme, 2, 1 << 20)
        self.cmb_size = cmb_size
        self.backends: list[FakePciNvme] = []
        real = env.target.open_backend

        def open_backend(path, **kw):
            if path == "fake-kernel-nvme":
                b = FakePciNvme(m.nvme, NS_BYTES, env.loop)
                b.p2p_kinds = frozenset({"p2pmem"})
            elif path == "fake-nvme":
                cmb = SysfsBarProvider(m.root, m.nvme, 2, size=self.cmb_size,
                                       kind="nvme-cmb")
                b = FakePciNvme(m.nvme, NS_BYTES, env.loop, cmb)
            else:
                return real(path, **kw)
            self.backends.append(b)
            return b
        monkeypatch.setattr(env.target, "open_backend", open_backend)

    def kernel_p2pmem(self, fn: Any, size: int, available: int | None = None,
                      published: bool = True) -> None:
        """`fn` publishes `size` bytes of p2pmem; its allocate file is a plain file."""
        d = self.m.tree.p2pmem(fn, size, available, published=published)
        with open(d / "allocate", "wb") as f:
            f.truncate(size)

    def setup(self, *, allow: bool = True, p2pmem: str = "1", inline: int = 0,
              extra_ns: dict[int, str] | None = None, path: str = "fake-nvme") -> Any:
        env = self.env
        p = env.port(PORTID, inline_data_size=inline)
        p.attr_allow_p2pmem = allow
        subsys = env.add_subsystem(namespaces=extra_ns or {}, portid=None)
        p.link_subsystem(SUBNQN)
        ns = subsys.create_namespace(1)
        ns.device_backend, ns.device_path, ns.device_size = "memory", path, NS_BYTES
        ns.p2pmem = p2pmem
        ns.enable = True
        return subsys

    @property
    def backend(self) -> FakePciNvme:
        return self.backends[-1]

    @property
    def cmb(self) -> SysfsBarProvider:
        return self.backend.cmb


@pytest.fixture
def p2p_env(env: LoopEnv, m: Machine, monkeypatch: pytest.MonkeyPatch) -> P2PEnv:
    return P2PEnv(env, m, monkeypatch)


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_loop_writes_and_reads_go_through_the_cmb(p2p_env, caplog):
    caplog.set_level(logging.INFO, logger="nvmet_p2p.p2p")
    p2p_env.setup()
    host = p2p_env.env.connect()
    ns = p2p_env.env.ns(1)
    total = 0
    for i, (slba, n) in enumerate([(0, 4096), (64, 65536), (1000, 512), (3000, 1 << 20)]):
        data = payload(n, i)
        host.write(1, slba, data)
        assert bytes(p2p_env.backend.media[slba * 512:slba * 512 + n]) == data  # on the media
        assert host.read(1, slba, n // 512) == data
        total += 2 * n
    assert ns.stats["p2p_bytes"] == total
    assert ns.stats["p2p_reqs"] == 8 and ns.stats["sysmem_reqs"] == 0
    assert p2p_env.backend.p2p_ios == {"read": 4, "write": 4}
    counters = p2p_env.cmb.counters()
    assert counters["allocated"] == 0 and counters["allocs"] == 8
    assert counters["available"] == p2p_env.cmb_size
    ctrl = p2p_env.env.target.controllers()[-1]
    decision = ctrl.p2p_ns_map[1]
    assert decision.p2p and decision.provider == f"{p2p_env.m.nvme}/bar2"
    assert decision.distance == 0 and decision.clients == [p2p_env.m.nvme]
    logged = [logfmt.parse(r.getMessage()) for r in caplog.records
              if "event=p2p_decision" in r.getMessage()]
    assert [x for x in logged if x["nsid"] == "1"] == [{
        "event": "p2p_decision", "cntlid": str(ctrl.cntlid), "hostnqn": host.hostnqn,
        "portid": "1", "subnqn": decision.subnqn, "nsid": "1", "p2p": "1", "decision": "p2p",
        "provider": decision.provider, "provider_bdf": decision.provider_bdf,
        "distance": "0", "map_type": decision.map_type, "clients": p2p_env.m.nvme,
        "reason": decision.reason or "", "text": decision.text()}]


def test_decision_is_logged_once_per_ctrl_and_ns(p2p_env, caplog):
    caplog.set_level(logging.INFO, logger="nvmet_p2p.p2p")
    p2p_env.setup(extra_ns={2: "memory"})
    hosts = [p2p_env.env.connect(), p2p_env.env.connect()]
    for h in hosts:
        for i in range(3):
            h.write(1, i * 8, payload(4096, i))
            h.write(2, i * 8, payload(4096, i))
            h.read(2, i * 8, 8)
    msgs = [logfmt.parse(r.getMessage()) for r in caplog.records
            if r.name == "nvmet_p2p.p2p"]
    per_pair = Counter((m["cntlid"], m["nsid"]) for m in msgs)
    assert len(per_pair) == 4 and set(per_pair.values()) == {1}, msgs
    assert sum(m["nsid"] == "2" and m["decision"] == "system" and
               m["reason"].startswith("namespace 2: memory") for m in msgs) == 2
    ns2 = p2p_env.env.ns(2)
    reason = f"namespace 2: memory {ns2.backend.path} is not a PCI device; it {NOT_PCI}"
    assert ns2.stats["sysmem_by_reason"] == {reason: 12}  # 2 hosts x 3 x (write, read)


def test_provider_too_small_falls_back_per_request(env, m, monkeypatch):
    pe = P2PEnv(env, m, monkeypatch, cmb_size=16 << 10)
    pe.setup()
    host = env.connect()
    q = host.io[min(host.io)]
    ns = env.ns(1)
    # eight 4 KiB writes in flight at once against a 16 KiB CMB: 4 fit, 4 fall back
    datas = [payload(4096, 100 + i) for i in range(8)]
    pend = [q.submit(Sqe(opcode=IoOpcode.WRITE, nsid=1, cdw10=i * 8, cdw12=7), data=d)
            for i, d in enumerate(datas)]
    for p in pend:
        cqe, _ = q.wait(p, 10.0)
        assert cqe.status == 0
    assert ns.stats["p2p_reqs"] == 4 and ns.stats["p2p_bytes"] == 4 * 4096
    assert ns.stats["sysmem_by_reason"] == {REASON_EXHAUSTED: 4}
    # one request larger than the whole CMB: system memory, counted, data still right
    big = payload(64 << 10, 7)
    host.write(1, 2048, big)
    assert host.read(1, 2048, len(big) // 512) == big
    for i, d in enumerate(datas):
        assert host.read(1, i * 8, 8) == d
    assert ns.stats["sysmem_by_reason"] == {REASON_EXHAUSTED: 6}
    assert ns.stats["p2p_reqs"] == 4 + 8  # the 4 KiB reads fit
    assert pe.cmb.counters()["allocated"] == 0
    assert pe.cmb.counters()["alloc_failures"] == 6


def test_in_capsule_writes_never_use_p2p(p2p_env):
    p2p_env.setup(inline=8192)
    host = p2p_env.env.connect()
    data = payload(4096, 3)
    host.write(1, 10, data, inline=True)
    host.write(1, 20, data)  # keyed: P2P
    assert host.read(1, 10, 8) == data and host.read(1, 20, 8) == data
    st = p2p_env.env.ns(1).stats
    assert st["sysmem_by_reason"] == {REASON_IN_CAPSULE: 1}
    assert st["p2p_reqs"] == 3 and st["p2p_bytes"] == 3 * 4096


@pytest.mark.parametrize("allow,p2pmem,reason", [
    (False, "1", "port 1: allow_p2pmem is off"),
    (True, "0", "namespace 1: p2pmem is 0"),
])
def test_switched_off_means_system_memory_with_the_reason(p2p_env, allow, p2pmem, reason):
    p2p_env.setup(allow=allow, p2pmem=p2pmem)
    host = p2p_env.env.connect()
    data = payload(8192, 9)
    host.write(1, 0, data)
    assert host.read(1, 0, 16) == data
    st = p2p_env.env.ns(1).stats
    assert st["p2p_reqs"] == 0 and st["p2p_bytes"] == 0
    assert st["sysmem_by_reason"] == {reason: 2}
    assert p2p_env.cmb.counters()["allocs"] == 0
    assert p2p_env.backend.p2p_ios == {"read": 0, "write": 0}


def test_closed_provider_is_decided_again(p2p_env):
    p2p_env.setup()
    host = p2p_env.env.connect()
    host.write(1, 0, payload(4096, 1))
    p2p_env.cmb.close()  # e.g. the device went away under the namespace
    host.write(1, 8, payload(4096, 2))
    st = p2p_env.env.ns(1).stats
    assert st["p2p_reqs"] == 1
    assert list(st["sysmem_by_reason"]) == [NO_PROVIDER]


def test_explain_a_running_target(p2p_env):
    subsys = p2p_env.setup(extra_ns={2: "memory"})
    ns3 = subsys.create_namespace(3)
    ns3.device_backend, ns3.device_path, ns3.device_size = "memory", "off", 1 << 20
    out = explain(p2p_env.env.target, p2p_env.policy)
    assert [(e["portid"], e["nsid"], e["p2p"]) for e in out] == [(1, 1, True), (1, 2, False),
                                                                (1, 3, False)]
    assert out[0]["provider"] == f"{p2p_env.m.nvme}/bar2" and out[0]["distance"] == 0
    assert out[2]["reason"] == "namespace 3 is not enabled"
    assert all(e["text"].startswith(f"port 1 {SUBNQN} ns ") for e in out)
    assert p2p_env.cmb.counters()["allocs"] == 0  # explaining allocates nothing



# -- kernel p2pmem: the kernel NVMe driver published its controller's CMB --------------------

def test_kernel_p2pmem_of_the_namespaces_own_controller(p2p_env):
    m = p2p_env.m
    p2p_env.kernel_p2pmem(m.nvme_fn, 1 << 20)
    p2p_env.kernel_p2pmem(m.peer1_fn, 1 << 20)  # farther: 4 hops
    p2p_env.setup(path="fake-kernel-nvme")
    host = p2p_env.env.connect()
    total = 0
    for i, (slba, n) in enumerate([(0, 4096), (100, 65536), (900, 1 << 20)]):
        data = payload(n, 20 + i)
        host.write(1, slba, data)
        assert host.read(1, slba, n // 512) == data
        assert bytes(p2p_env.backend.media[slba * 512:slba * 512 + n]) == data
        total += 2 * n
    st = p2p_env.env.ns(1).stats
    assert st["p2p_bytes"] == total and st["sysmem_bytes"] == 0
    d = p2p_env.env.target.controllers()[-1].p2p_ns_map[1]
    assert d.p2p and d.provider == f"p2pmem {m.nvme}" and d.distance == 0
    assert d.p2p_dev.kind == "p2pmem" and d.p2p_dev.size == 1 << 20
    assert p2p_env.backend.p2p_ios == {"read": 3, "write": 3}
    explained = explain(p2p_env.env.target, p2p_env.policy)[0]
    assert explained["payload"]["p2p_bytes"] == total
    assert explained["text"].endswith(f"payload so far: {total} bytes P2P, 0 in system memory")


def test_kernel_p2pmem_pool_exhausted_falls_back_per_request(p2p_env):
    p2p_env.policy.p2pmem_pool_size = 16 << 10  # what we map of the device's p2pmem
    p2p_env.kernel_p2pmem(p2p_env.m.nvme_fn, 1 << 20)
    p2p_env.setup(path="fake-kernel-nvme")
    host = p2p_env.env.connect()
    q = host.io[min(host.io)]
    datas = [payload(4096, 40 + i) for i in range(8)]
    pend = [q.submit(Sqe(opcode=IoOpcode.WRITE, nsid=1, cdw10=i * 8, cdw12=7), data=d)
            for i, d in enumerate(datas)]
    assert all(q.wait(p, 10.0)[0].status == 0 for p in pend)
    for i, d in enumerate(datas):
        assert host.read(1, i * 8, 8) == d
    st = p2p_env.env.ns(1).stats
    assert st["sysmem_by_reason"] == {REASON_EXHAUSTED: 4}
    assert st["sysmem_bytes_by_reason"] == {REASON_EXHAUSTED: 4 * 4096}
    assert st["p2p_bytes"] == (4 + 8) * 4096  # 4 writes fit, and every read did


def test_p2pmem_with_nothing_available_is_no_candidate(p2p_env):
    m = p2p_env.m
    p2p_env.kernel_p2pmem(m.nvme_fn, 1 << 20, available=0)
    p2p_env.setup(path="fake-kernel-nvme")
    host = p2p_env.env.connect()
    host.write(1, 0, payload(4096, 5))
    why = (f"no usable P2P memory provider: p2pmem {m.nvme}: {m.nvme}: p2pmem is exhausted "
           f"(0 of {1 << 20} bytes available; the rest is allocated by its other users)")
    assert p2p_env.env.ns(1).stats["sysmem_by_reason"] == {why: 1}


def test_only_the_chosen_p2pmem_is_mapped(p2p_env, monkeypatch):
    """Each mapping of p2pmem/allocate takes from a pool the device's other users share:
    the farther provider, a candidate never chosen, is left alone."""
    m = p2p_env.m
    p2p_env.kernel_p2pmem(m.nvme_fn, 1 << 20)
    p2p_env.kernel_p2pmem(m.peer1_fn, 1 << 20)
    mapped = []
    real = KernelP2pmemProvider.__init__

    def spy(self, root, bdf, **kw):
        mapped.append(bdf)
        real(self, root, bdf, **kw)
    monkeypatch.setattr(KernelP2pmemProvider, "__init__", spy)
    p2p_env.setup(path="fake-kernel-nvme")
    for _ in range(2):  # a second controller reuses the mapping
        host = p2p_env.env.connect()
        host.write(1, 0, payload(4096, 6))
        assert host.read(1, 0, 8) == payload(4096, 6)
    assert mapped == [m.nvme]
    assert [p["name"] for p in p2p_env.policy.providers([])] == [f"{m.nvme}/p2pmem"]
    p2p_env.policy.close()
    assert p2p_env.policy.providers([]) == []


def test_backend_that_stops_taking_p2p_memory_is_decided_again(p2p_env):
    """A block device that fell back to buffered I/O: the controllers that chose P2P
    decide again, and say why the payload is now in system memory."""
    m = p2p_env.m
    p2p_env.kernel_p2pmem(m.nvme_fn, 1 << 20)
    p2p_env.setup(path="fake-kernel-nvme")
    host = p2p_env.env.connect()
    host.write(1, 0, payload(4096, 8))
    b = p2p_env.backend
    b.p2p_kinds, b.p2p_needs = frozenset(), "it fell back to buffered I/O"
    host.write(1, 8, payload(4096, 9))
    assert host.read(1, 8, 8) == payload(4096, 9)
    d = p2p_env.env.target.controllers()[-1].p2p_ns_map[1]
    why = f"namespace 1: the fake-nvme {m.nvme} backend cannot issue P2P-flagged I/O: " \
          "it fell back to buffered I/O"
    assert not d.p2p and d.reason == why
    st = p2p_env.env.ns(1).stats
    assert st["p2p_bytes"] == 4096 and st["sysmem_by_reason"] == {why: 2}


def test_p2pmem_revoked_by_an_unbind_is_mapped_anew_after_the_rebind(p2p_env):
    m = p2p_env.m
    p2p_env.kernel_p2pmem(m.nvme_fn, 1 << 20)
    p2p_env.setup(path="fake-kernel-nvme")
    host = p2p_env.env.connect()
    host.write(1, 0, payload(4096, 10))
    first = p2p_env.env.target.controllers()[-1].p2p_ns_map[1].p2p_dev
    d = Path(m.root) / "bus/pci/devices" / m.nvme / "p2pmem"
    (d / "allocate").rename(d / "allocate.gone")  # the unbind, as the provider sees it
    host.write(1, 8, payload(4096, 11))  # the provider closes; this one is system memory
    assert first.closed
    (d / "allocate.gone").rename(d / "allocate")  # the rebind
    host.write(1, 16, payload(4096, 12))
    again = p2p_env.env.target.controllers()[-1].p2p_ns_map[1]
    assert again.p2p and again.p2p_dev is not first and not again.p2p_dev.closed
    for i in range(3):
        assert host.read(1, 8 * i, 8) == payload(4096, 10 + i)
    st = p2p_env.env.ns(1).stats
    assert st["sysmem_by_reason"] == {REASON_EXHAUSTED: 1}


def test_p2pmem_that_cannot_be_mapped_is_the_stated_reason(p2p_env, monkeypatch):
    m = p2p_env.m
    p2p_env.kernel_p2pmem(m.nvme_fn, 1 << 20)

    def refuse(self, root, bdf, **kw):
        raise P2PError(f"{bdf}: mapping 1048576 bytes of p2pmem/allocate failed: "
                       "[Errno 12] Cannot allocate memory")
    monkeypatch.setattr(KernelP2pmemProvider, "__init__", refuse)
    p2p_env.setup(path="fake-kernel-nvme")
    host = p2p_env.env.connect()
    host.write(1, 0, payload(4096, 7))
    assert host.read(1, 0, 8) == payload(4096, 7)
    d = p2p_env.env.target.controllers()[-1].p2p_ns_map[1]
    assert not d.p2p and d.reason == (
        f"p2pmem {m.nvme} could not be mapped: {m.nvme}: mapping 1048576 bytes of "
        "p2pmem/allocate failed: [Errno 12] Cannot allocate memory")
    assert d.provider == f"p2pmem {m.nvme}" and d.distance == 0
    assert p2p_env.env.ns(1).stats["p2p_bytes"] == 0


@pytest.mark.parametrize("published", [True, False])
def test_pinned_provider_that_publishes_nothing_fails_enable(p2p_env, published):
    """As the kernel's nvmet_p2pmem_ns_enable(): a namespace pinned to a provider that
    cannot serve it is not enabled, with the reason; the target serves the others."""
    m = p2p_env.m
    if not published:
        p2p_env.kernel_p2pmem(m.peer2_fn, 1 << 20, published=False)
    with pytest.raises(ConfigError) as e:
        p2p_env.setup(path="fake-kernel-nvme", p2pmem=m.peer2, extra_ns={2: "memory"})
    why = (f"cannot be used: p2pmem {m.peer2}: p2pmem is not published (its driver keeps it "
           "private)" if not published else
           "publishes no P2P memory: it has no p2pmem in sysfs and no CMB our NVMe driver "
           "enabled (known providers: none)")
    assert str(e.value) == (f"namespace 1 of {SUBNQN}: p2pmem {m.peer2}: namespace 1: pinned "
                            f"provider {m.peer2} {why}")
    assert p2p_env.env.ns(1) is None and p2p_env.backends[-1].closed
    host = p2p_env.env.connect()
    assert host.active_ns() == [2]
    host.write(2, 0, payload(512, 1))
    assert host.read(2, 0, 1) == payload(512, 1)


def test_pinned_namespace_whose_device_cannot_do_p2p_fails_enable(p2p_env):
    """A block device that is not an NVMe namespace: the kernel issues no P2P I/O to it."""
    m = p2p_env.m
    p2p_env.kernel_p2pmem(m.nvme_fn, 1 << 20)
    real = p2p_env.env.target.open_backend

    def virtio_blk(path, **kw):
        b = real(path, **kw)
        b.p2p_kinds, b.p2p_needs = frozenset(), "/dev/vda is not an NVMe namespace"
        return b
    p2p_env.env.target.open_backend = virtio_blk
    with pytest.raises(ConfigError) as e:
        p2p_env.setup(path="fake-kernel-nvme", p2pmem=m.nvme)
    assert str(e.value).endswith("namespace 1: the fake-nvme " + m.nvme + " backend cannot "
                                 "issue P2P-flagged I/O: /dev/vda is not an NVMe namespace")


# -- the vfio-nvme route of the backend factory ----------------------------------------------

@pytest.mark.parametrize("path,message", [
    ("nvme0", ("'nvme0' is not a PCI address: a vfio-nvme namespace needs device.path set to "
              "the controller's address, e.g. 0000:00:0a.0 (see lspci -D)")),
    ("0000:7f:1f.7", ("NVMe controller 0000:7f:1f.7 through VFIO: no PCI device 0000:7f:1f.7 "
                      "(see lspci -D)")),
])
def test_open_backend_vfio_nvme_says_what_to_fix(path, message):
    from nvmet_p2p.backends import open_backend
    from nvmet_p2p.errors import BackendError
    with pytest.raises(BackendError) as e:
        open_backend(path, kind="vfio-nvme", loop=SimpleNamespace())
    assert str(e.value) == message
