"""The P2P decision for one (port, namespace): which memory its I/O uses, and why.

`decide()` follows DESIGN.md ("P2P decision"), in order: the port's allow_p2pmem, the
namespace's p2pmem, the clients (the transport's DMA device and the namespace's PCI
device), the candidate providers (of a kind the backend's P2P-flagged I/O can use), the
kernel's topology rules, and whether the backend and the transport can use the memory.  It takes facts, not live objects, so the same
decision serves a running target (`policy`) and a configuration file (`explain`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from nvmet_p2p.errors import P2PError
from nvmet_p2p.p2p.topology import NOT_PCI_PHRASE, Topology
from nvmet_p2p.p2p.topology import Decision as TopologyDecision
from nvmet_p2p.pci import normalize_bdf

if TYPE_CHECKING:
    from nvmet_p2p.cmb import Provider

SYSTEM = "system memory"

CanRegister = Callable[["Provider"], "str | None"]  # why the transport cannot, or None


class PortFacts(Protocol):
    """What the decision reads of a port (a configfs Port fits)."""

    @property
    def portid(self) -> int: ...

    @property
    def attr_allow_p2pmem(self) -> Any: ...


@dataclass
class Candidate:
    """A provider the policy may choose: a live object, or (offline) just its identity.

    `unusable` says why this process cannot use a provider the kernel publishes (e.g. a
    p2pmem without `allocate`, a CMB without WDS and RDS); such a candidate is never chosen.
    `open` maps a provider not yet live, only once a decision chooses it: each mapping of
    `p2pmem/allocate` takes memory from the device's pool, which its other users share.
    """

    bdf: str
    name: str
    provider: Provider | None = None
    unusable: str | None = None
    kind: str = "p2pmem"  # cmb.Provider.kind
    open: Callable[[], Provider] | None = field(default=None, repr=False, compare=False)


@dataclass
class Decision:
    """The outcome; `p2p_dev` is the live provider when P2P was decided on live objects."""

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
    p2p_dev: Provider | None = field(default=None, repr=False, compare=False)

    def text(self) -> str:
        where = f"port {self.portid} {self.subnqn} ns {self.nsid}"
        if self.p2p:
            return (f"{where}: P2P memory from {self.provider} ({self.map_type}, distance "
                    f"{self.distance})")
        seen = ""
        if self.provider is not None:  # refused after the topology picked a provider
            seen = f" (nearest provider {self.provider}, distance {self.distance})"
        return f"{where}: {SYSTEM}: {self.reason}{seen}"

    def to_json(self) -> dict:
        return {"portid": self.portid, "subnqn": self.subnqn, "nsid": self.nsid,
                "p2p": self.p2p, "decision": "p2p" if self.p2p else "system",
                "provider": self.provider, "provider_bdf": self.provider_bdf,
                "distance": self.distance, "map_type": self.map_type,
                "clients": self.clients, "reason": self.reason, "text": self.text()}


def not_enabled(portid: int, subnqn: str, nsid: int) -> Decision:
    return Decision(portid, subnqn, nsid, False, f"namespace {nsid} is not enabled")


def decide(topology: Topology, *, port: PortFacts, subnqn: str, nsid: int, ns_p2pmem: str,
           transport_client: str | None, transport_reason: str | None,
           ns_client: str | None, ns_label: str, backend_kinds: frozenset[str],
           backend_needs: str, candidates: list[Candidate],
           can_register: CanRegister | None = None,
           rng: random.Random | None = None) -> Decision:
    """The decision for one (port, namespace), in the order DESIGN.md gives.

    `transport_client` is the DMA device of the transport (an RDMA device name or BDF),
    None when the transport moves data with the CPU (loop); `transport_reason` refuses
    P2P for the transport outright.  `backend_kinds` are the provider kinds the
    namespace's backend can issue P2P-flagged I/O with (none: no P2P), `backend_needs`
    what that I/O needs of the memory.  `can_register(provider) -> reason | None` asks
    the transport whether it can register that memory (live providers only).
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
    if transport_client is not None:  # the RDMA device first, as the kernel lists clients
        client = topology.resolve_client(transport_client)
        if client.bdf is None:
            return no(client.reason or f"{transport_client} is not a PCI device",
                      clients=clients)
    if ns_client is None:
        return no(f"namespace {nsid}: {ns_label} is not a PCI device; it {NOT_PCI_PHRASE}",
                  clients=clients)
    client = topology.resolve_client(ns_client)
    if client.bdf is None:
        return no(client.reason or f"{ns_client} is not a PCI device", clients=clients)
    pinned = normalize_bdf(ns_p2pmem) if ns_p2pmem not in ("", "1") else None
    matching = [c for c in candidates if pinned is None or c.bdf == pinned]
    if backend_kinds:  # memory the backend cannot do P2P-flagged I/O with is no candidate
        matching = [c if c.unusable or c.kind in backend_kinds else replace(
            c, unusable=f"the {ns_label} backend cannot use {c.kind} memory: {backend_needs}")
            for c in matching]
    pool = [c for c in matching if c.unusable is None]
    if not pool:
        refusals: dict[str, list[str]] = {}  # one reason, the providers it refuses
        for c in matching:
            refusals.setdefault(c.unusable or "", []).append(c.name)
        refused = "; ".join(f"{', '.join(names)}: {w}" for w, names in refusals.items())
        if pinned and refused:
            return no(f"namespace {nsid}: pinned provider {pinned} cannot be used: {refused}",
                      clients=clients)
        if pinned:
            known = ", ".join(sorted({c.bdf for c in candidates})) or "none"
            return no(f"namespace {nsid}: pinned provider {pinned} publishes no P2P memory: "
                      f"it has no p2pmem in sysfs and no CMB our NVMe driver enabled "
                      f"(known providers: {known})", clients=clients)
        if refused:
            return no(f"no usable P2P memory provider: {refused}", clients=clients)
        return no("no P2P memory provider is available (no published p2pmem, no NVMe CMB "
                  "with WDS and RDS)", clients=clients)
    bdf, result = topology.nearest_provider([c.bdf for c in pool], clients, rng)
    if not isinstance(result, TopologyDecision):
        return no("; ".join(result), clients=clients)
    chosen = [c for c in pool if c.bdf == bdf]
    live = [(c.provider.counters()["available"], i) for i, c in enumerate(chosen)
            if c.provider is not None]
    # among several pools behind one BDF, the one with most room
    cand = chosen[max(live)[1]] if live else chosen[0]
    kw: dict[str, Any] = {"provider": cand.name, "provider_bdf": bdf,
                          "distance": result.distance, "map_type": result.map_type,
                          "clients": clients}
    if not backend_kinds:
        return no(f"namespace {nsid}: the {ns_label} backend cannot issue P2P-flagged I/O: "
                  f"{backend_needs}", **kw)
    if cand.provider is None and cand.open is not None:
        try:
            cand = replace(cand, provider=cand.open())
        except P2PError as e:
            return no(f"{cand.name} could not be mapped: {e}", **kw)
    if can_register is not None and cand.provider is not None:
        why = can_register(cand.provider)
        if why:
            return no(f"the transport cannot register {cand.name}: {why}", **kw)
    return Decision(port.portid, subnqn, nsid, True, f"nearest provider {cand.name}",
                    p2p_dev=cand.provider, **kw)
