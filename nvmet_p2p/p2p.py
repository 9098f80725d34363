"""The P2P policy: which memory a controller's I/O to a namespace uses, and why.

The decision follows DESIGN.md ("P2P decision"), in order: the port's allow_p2pmem,
the namespace's p2pmem, the clients (the transport's DMA device and the namespace's
PCI device), the candidate providers, the kernel's topology rules, and whether the
transport and the backend can use the memory.  It is made per (controller, namespace)
when first needed, logged once with its reason, and used per request: one contiguous
chunk from the chosen provider, else system memory for that request (counted).
Admin commands, Connect and in-capsule data never use P2P.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import P2PError
from .topology import Topology, published_p2pmem

if TYPE_CHECKING:
    from .cmb import Chunk, Provider
    from .target.ctrl import Ctrl
    from .target.request import Request
    from .target.subsys import Ns

log = logging.getLogger("nvmet_p2p.p2p")

SYSTEM = "system memory"
REASON_EXHAUSTED = "P2P provider exhausted"
REASON_IN_CAPSULE = "in-capsule data"


@dataclass
class Candidate:
    """A provider the policy may choose: a live object, or (offline) just its identity."""

    bdf: str
    name: str
    provider: Provider | None = None


@dataclass
class Decision:
    portid: int
    subnqn: str
    nsid: int
    p2p: bool
    reason: str
    provider: str | None = None  # provider name
    provider_bdf: str | None = None
    distance: int | None = None
    map_type: str | None = None
    clients: list[str] = field(default_factory=list)
    provider_obj: Any = field(default=None, repr=False, compare=False)

    def text(self) -> str:
        where = f"port {self.portid} {self.subnqn} ns {self.nsid}"
        if self.p2p:
            return (f"{where}: P2P memory from {self.provider} ({self.map_type}, distance "
                    f"{self.distance})")
        return f"{where}: {SYSTEM}: {self.reason}"

    def to_json(self) -> dict:
        return {"portid": self.portid, "subnqn": self.subnqn, "nsid": self.nsid,
                "p2p": self.p2p, "decision": "p2p" if self.p2p else "system",
                "provider": self.provider, "provider_bdf": self.provider_bdf,
                "distance": self.distance, "map_type": self.map_type,
                "clients": self.clients, "reason": self.reason, "text": self.text()}


def is_p2p_chunk(chunk: Chunk | None) -> bool:
    return chunk is not None and chunk.provider.kind != "system"


def decide(topology: Topology, *, port: Any, subnqn: str, nsid: int, ns_p2pmem: str,
           transport_client: str | None, transport_reason: str | None,
           ns_client: str | None, ns_label: str, backend_accepts: bool,
           candidates: list[Candidate], can_register: Any = None,
           rng: random.Random | None = None) -> Decision:
    """The decision for one (port, namespace), in the order DESIGN.md gives.

    `transport_client` is the DMA device of the transport (an RDMA device name or BDF),
    None when the transport moves data with the CPU (loop); `transport_reason` refuses
    P2P for the transport outright.  `can_register(provider) -> reason | None` asks the
    transport whether it can register that memory.
    """
    def no(reason: str, **kw: Any) -> Decision:
        return Decision(port.portid, subnqn, nsid, False, reason, **kw)

    if not port.attr_allow_p2pmem:
        return no(f"port {port.portid}: allow_p2pmem is off")
    if ns_p2pmem == "0":
        return no(f"namespace {nsid}: p2pmem is 0")
    if transport_reason:
        return no(transport_reason)
    clients = [c for c in (transport_client, ns_client) if c]
    if ns_client is None:
        return no(f"namespace {nsid}: {ns_label} is not a PCI device; it cannot be used for "
                  "peer-to-peer DMA", clients=clients)
    for spec in clients:
        client = topology.resolve_client(spec)
        if client.bdf is None:
            return no(client.reason or f"{spec} is not a PCI device", clients=clients)
    pinned = ns_p2pmem if ns_p2pmem not in ("", "1") else None
    pool = [c for c in candidates if pinned is None or c.bdf == pinned]
    if not pool:
        if pinned:
            known = ", ".join(sorted({c.bdf for c in candidates})) or "none"
            return no(f"namespace {nsid}: pinned provider {pinned} is not a P2P memory "
                      f"provider (known: {known})", clients=clients)
        return no("no P2P memory provider is available (no published p2pmem, no NVMe CMB "
                  "with WDS and RDS)", clients=clients)
    bdf, result = topology.nearest_provider([c.bdf for c in pool], clients, rng)
    if bdf is None:
        return no("; ".join(result), clients=clients)
    chosen = [c for c in pool if c.bdf == bdf]
    live = [c for c in chosen if c.provider is not None]
    if live:  # among several pools behind one BDF, the one with most room
        cand = max(live, key=lambda c: c.provider.counters()["available"])
    else:
        cand = chosen[0]
    kw = dict(provider=cand.name, provider_bdf=bdf, distance=result.distance,
              map_type=result.map_type, clients=clients)
    if not backend_accepts:
        return no(f"namespace {nsid}: the {ns_label} backend cannot issue P2P-flagged I/O",
                  **kw)
    if can_register is not None and cand.provider is not None:
        why = can_register(cand.provider)
        if why:
            return no(f"the transport cannot register {cand.name}: {why}", **kw)
    return Decision(port.portid, subnqn, nsid, True, f"nearest provider {cand.name}",
                    provider_obj=cand.provider, **kw)


class P2PPolicy:
    """The live policy of a target: decisions per (controller, namespace), counters."""

    def __init__(self, sysfs_root: str = "/sys", cpu: str | None = None,
                 rng: random.Random | None = None) -> None:
        self.sysfs_root = sysfs_root
        self.topology = Topology(sysfs_root, cpu=cpu)
        self.rng = rng or random.Random()
        self._kernel_providers: dict[str, Provider] = {}

    def candidates(self, namespaces: list[Ns]) -> list[Candidate]:
        out = []
        for ns in namespaces:
            cmb = getattr(ns.backend, "cmb", None)
            if cmb is not None and not cmb.closed:
                out.append(Candidate(cmb.bdf, cmb.name, cmb))
        try:
            published = [p for p in published_p2pmem(self.sysfs_root) if p.published]
        except OSError:
            published = []
        for info in published:
            prov = self._kernel_providers.get(info.bdf)
            if prov is None and info.allocatable:
                try:
                    from .cmb import KernelP2pmemProvider
                    prov = KernelP2pmemProvider(self.sysfs_root, info.bdf)
                    self._kernel_providers[info.bdf] = prov
                except P2PError as e:
                    log.info("p2pmem of %s unusable: %s", info.bdf, e)
            out.append(Candidate(info.bdf, f"p2pmem {info.bdf}", prov))
        return out

    def decide(self, ctrl: Ctrl, ns: Ns) -> Decision:
        ops = ctrl.ops
        port = ctrl.port
        client, reason = None, None
        client_of = getattr(ops, "p2p_client", None)
        if client_of is None:
            reason = f"transport {ops.trtype} cannot do peer-to-peer DMA"
        else:
            client = client_of(port)
        backend = ns.backend
        label = f"{backend.kind} {getattr(backend, 'path', '') or ''}".strip()
        try:
            return decide(self.topology, port=port, subnqn=ctrl.subsys.nqn, nsid=ns.nsid,
                          ns_p2pmem=str(getattr(ns.cfg, "p2pmem", "1")),
                          transport_client=client, transport_reason=reason,
                          ns_client=backend.p2p_client, ns_label=label,
                          backend_accepts=backend.accepts_p2p,
                          candidates=self.candidates(list(ctrl.subsys.ns.values())),
                          can_register=getattr(ops, "p2p_can_register", None), rng=self.rng)
        except (P2PError, OSError) as e:
            return Decision(port.portid, ctrl.subsys.nqn, ns.nsid, False,
                            f"topology could not be evaluated: {e}")

    def provider_for(self, ctrl: Ctrl, ns: Ns) -> Provider | None:
        """The provider for this controller's I/O to `ns` (None: system memory)."""
        d = ctrl.p2p.get(ns.nsid)
        if d is None or d.provider_obj is not None and d.provider_obj.closed:
            d = ctrl.p2p[ns.nsid] = self.decide(ctrl, ns)
            log.info("ctrl %d (%s): %s", ctrl.cntlid, ctrl.hostnqn, d.text())
        return d.provider_obj if d.p2p else None

    @staticmethod
    def account(req: Request) -> None:
        """Count which memory a request's data used, and why not P2P when it did not."""
        ns = req.ns
        if is_p2p_chunk(req.chunk):
            ns.stats["p2p_reqs"] += 1
            ns.stats["p2p_bytes"] += req.transfer_len
            return
        ns.stats["sysmem_reqs"] += 1
        d = req.sq.ctrl.p2p.get(ns.nsid) if req.sq.ctrl is not None else None
        if req.p2p_dev is not None:
            why = REASON_EXHAUSTED
        elif d is not None and d.p2p:
            why = REASON_IN_CAPSULE  # the only way a P2P-decided request has no provider
        else:
            why = d.reason if d is not None else SYSTEM
        by = ns.stats.setdefault("sysmem_by_reason", {})
        by[why] = by.get(why, 0) + 1
