"""The P2P policy: which memory a controller's I/O to a namespace uses, and why.

The decision follows DESIGN.md ("P2P decision"), in order: the port's allow_p2pmem,
the namespace's p2pmem, the clients (the transport's DMA device and the namespace's
PCI device), the candidate providers, the kernel's topology rules, and whether the
transport and the backend can use the memory.  It is made per (controller, namespace)
when first needed, logged once with its reason, and used per request: one contiguous
chunk from the chosen provider, else system memory for that request (counted).
Admin commands, Connect and in-capsule data never use P2P.

The same decision, made without a controller, explains every (port, namespace) pair:
`explain(target)` for a running target (the RPC method `p2p_explain`) and
`explain_config(root, ...)` for a configuration file, where no backend is opened and the
clients and providers are found from the configuration and sysfs alone.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import stat
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nvmet_p2p.errors import P2PError
from nvmet_p2p.p2p.topology import NOT_PCI_PHRASE, Topology, published_p2pmem
from nvmet_p2p.p2p.topology import Decision as TopologyDecision
from nvmet_p2p.pci import normalize_bdf

if TYPE_CHECKING:
    from nvmet_p2p.cmb import Chunk, Provider
    from nvmet_p2p.core.ctrl import Ctrl
    from nvmet_p2p.core.request import Request
    from nvmet_p2p.core.subsys import Ns, Subsys
    from nvmet_p2p.core.target import Target

log = logging.getLogger("nvmet_p2p.p2p")

SYSTEM = "system memory"
REASON_EXHAUSTED = "P2P provider exhausted"
REASON_IN_CAPSULE = "in-capsule data"
IP_TIMEOUT_S = 5.0  # `ip -j addr` answers in milliseconds; a hung one must not hang explain


@dataclass
class Candidate:
    """A provider the policy may choose: a live object, or (offline) just its identity.

    `unusable` says why this process cannot use a provider the kernel publishes (e.g. a
    p2pmem without `allocate`, a CMB without WDS and RDS); such a candidate is never chosen.
    """

    bdf: str
    name: str
    provider: Provider | None = None
    unusable: str | None = None


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
    pool = [c for c in matching if c.unusable is None]
    if not pool:
        refused = "; ".join(f"{c.name}: {c.unusable}" for c in matching)
        if pinned and refused:
            return no(f"namespace {nsid}: pinned provider {pinned} cannot be used: {refused}",
                      clients=clients)
        if pinned:
            known = ", ".join(sorted({c.bdf for c in candidates})) or "none"
            return no(f"namespace {nsid}: pinned provider {pinned} is not a P2P memory "
                      f"provider (known: {known})", clients=clients)
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
    if not backend_accepts:
        return no(f"namespace {nsid}: the {ns_label} backend cannot issue P2P-flagged I/O",
                  **kw)
    if can_register is not None and cand.provider is not None:
        why = can_register(cand.provider)
        if why:
            return no(f"the transport cannot register {cand.name}: {why}", **kw)
    return Decision(port.portid, subnqn, nsid, True, f"nearest provider {cand.name}",
                    provider_obj=cand.provider, **kw)


def _not_enabled(portid: int, subnqn: str, nsid: int) -> Decision:
    return Decision(portid, subnqn, nsid, False, f"namespace {nsid} is not enabled")


class P2PPolicy:
    """The live policy of a target: decisions per (controller, namespace), counters."""

    def __init__(self, sysfs_root: str = "/sys", cpu: str | None = None,
                 rng: random.Random | None = None) -> None:
        self.sysfs_root = sysfs_root
        self.topology = Topology(sysfs_root, cpu=cpu)
        self.rng = rng or random.Random()
        self._kernel_providers: dict[str, Provider] = {}

    def candidates(self, namespaces: Iterable[Ns]) -> list[Candidate]:
        """The CMBs our own NVMe driver found, then the p2pmem the kernel publishes."""
        out = []
        for ns in namespaces:
            cmb = getattr(ns.backend, "cmb", None)
            if cmb is not None and not cmb.closed:
                # As the kernel: a CMB is for others only with both WDS and RDS.
                unusable = None if getattr(cmb, "published", True) else \
                    getattr(cmb, "publish_reason", "") or "not published"
                out.append(Candidate(cmb.bdf, cmb.name, cmb, unusable))
        try:
            published = [p for p in published_p2pmem(self.sysfs_root) if p.published]
        except OSError:
            published = []
        for info in published:
            prov = self._kernel_providers.get(info.bdf)
            unusable = None
            if prov is None and not info.allocatable:
                unusable = "p2pmem/allocate is missing (needs Linux >= 6.2)"
            elif prov is None:
                try:
                    from nvmet_p2p.cmb import KernelP2pmemProvider
                    prov = KernelP2pmemProvider(self.sysfs_root, info.bdf)
                    self._kernel_providers[info.bdf] = prov
                except P2PError as e:
                    unusable = str(e)
            out.append(Candidate(info.bdf, f"p2pmem {info.bdf}", prov, unusable))
        return out

    def decide_for(self, port: Any, ops: Any, subsys: Subsys, ns: Ns,
                   namespaces: Iterable[Ns] | None = None) -> Decision:
        """The decision for `ns` reached through `port` by transport `ops` (None: the
        port's transport is not in this target); `namespaces` hold the candidate CMBs
        (default: the subsystem's)."""
        client, reason = None, None
        client_of = getattr(ops, "p2p_client", None)
        trtype = getattr(ops, "trtype", None) or getattr(port, "addr_trtype", "?")
        if ops is None:
            reason = f"transport {trtype} is not available in this target"
        elif client_of is None:
            reason = f"transport {trtype} cannot do peer-to-peer DMA (it names no p2p_client)"
        else:
            client = client_of(port)
        backend = ns.backend
        label = f"{backend.kind} {getattr(backend, 'path', '') or ''}".strip()
        pool = list(namespaces) if namespaces is not None else list(subsys.ns.values())
        try:
            return decide(self.topology, port=port, subnqn=subsys.nqn, nsid=ns.nsid,
                          ns_p2pmem=str(getattr(ns.cfg, "p2pmem", "1")),
                          transport_client=client, transport_reason=reason,
                          ns_client=backend.p2p_client, ns_label=label,
                          backend_accepts=backend.accepts_p2p,
                          candidates=self.candidates(pool),
                          can_register=getattr(ops, "p2p_can_register", None), rng=self.rng)
        except (P2PError, OSError) as e:
            return Decision(port.portid, subsys.nqn, ns.nsid, False,
                            f"topology could not be evaluated: {e}")

    def decide(self, ctrl: Ctrl, ns: Ns) -> Decision:
        return self.decide_for(ctrl.port, ctrl.ops, ctrl.subsys, ns,
                               _target_namespaces(ctrl.target))

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
        ctrl = req.sq.ctrl
        d = ctrl.p2p.get(ns.nsid) if ctrl is not None else None
        if req.p2p_dev is not None:
            why = REASON_EXHAUSTED
        elif d is not None and d.p2p:
            why = REASON_IN_CAPSULE  # the only way a P2P-decided request has no provider
        else:
            why = d.reason if d is not None else SYSTEM
        by = ns.stats.setdefault("sysmem_by_reason", {})
        by[why] = by.get(why, 0) + 1


def _target_namespaces(target: Target) -> list[Ns]:
    """Every enabled namespace of the target: their CMBs are candidates for all of them."""
    out: list[Ns] = []
    for nqn in target.root.subsystems:
        subsys = target.get_subsys(nqn)
        if subsys is not None:
            out.extend(ns for ns in subsys.ns.values() if not ns.closing)
    return out


def explain(target: Target) -> list[dict]:
    """Decision.to_json() for every (port, linked subsystem's namespace) of a running target.

    The decisions are made afresh, as a controller connecting now would get them; nothing
    is cached or logged.  A configured namespace that is not enabled has no backend and is
    reported as such.
    """
    policy: P2PPolicy = target.p2p
    everything = _target_namespaces(target)
    out: list[dict] = []
    for portid in sorted(target.root.ports):
        port = target.root.ports[portid]
        ops = target.listening.get(portid) or target.transports.get(port.addr_trtype)
        for nqn in port.subsystems:
            subsys, cfg = target.get_subsys(nqn), target.root.subsystems.get(nqn)
            if subsys is None or cfg is None:
                continue
            for nsid in sorted(cfg.namespaces):
                ns = subsys.ns.get(nsid)
                d = (_not_enabled(portid, nqn, nsid) if ns is None or ns.closing
                     else policy.decide_for(port, ops, subsys, ns, everything))
                out.append(d.to_json())
    return out


explain_live = explain  # the name the RPC method was first asked to call


# -- offline: a configuration file, no backend opened ------------------------------------------

NetdevOfAddr = Callable[[str], "str | None"]


def netdev_of_addr(addr: str) -> str | None:
    """The network interface holding IP address `addr` on this machine, or None."""
    try:
        cp = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True,
                            timeout=IP_TIMEOUT_S, check=False)
        links = json.loads(cp.stdout) if cp.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        links = None
    if links is not None:
        for link in links:
            if any(a.get("local") == addr for a in link.get("addr_info", ())):
                return link.get("ifname")
        return None
    return _netdev_of_ipv4_ioctl(addr)


def _netdev_of_ipv4_ioctl(addr: str) -> str | None:
    # Without iproute2: SIOCGIFADDR per interface (IPv4 only).
    import fcntl
    import struct
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                res = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()))
            except OSError:
                continue
            if socket.inet_ntoa(res[20:24]) == addr:
                return name
    return None


def rdma_device_of_netdev(sysfs_root: str | os.PathLike[str], netdev: str) -> str | None:
    """The RDMA device one of whose GIDs is on `netdev` (what rdma_cm binds to), or None."""
    for ndev in sorted(Path(sysfs_root).glob("class/infiniband/*/ports/*/gid_attrs/ndevs/*")):
        try:
            if ndev.read_text().strip() == netdev:
                return ndev.parents[4].name  # <dev>/ports/<n>/gid_attrs/ndevs/<i>
        except OSError:
            continue  # unpopulated GID entries read as EINVAL
    return None


def _rdma_client(port: Any, sysfs_root: str, netdev_of: NetdevOfAddr,
                 ) -> tuple[str | None, str | None]:
    """(RDMA device, None) for an rdma port, or (None, why not)."""
    addr = port.addr_traddr
    if not addr:
        return None, f"port {port.portid}: addr_traddr is not set"
    netdev = netdev_of(addr)
    if netdev is None:
        return None, (f"port {port.portid}: no network interface has address {addr}, so "
                      f"its RDMA device is unknown")
    dev = rdma_device_of_netdev(sysfs_root, netdev)
    if dev is None:
        return None, (f"port {port.portid}: no RDMA device has a GID on {netdev} (the "
                      f"interface holding {addr})")
    return dev, None


def _ns_client(ns: Any, topology: Topology) -> tuple[str | None, str, bool]:
    """(PCI client, label, backend accepts P2P) of a configured namespace, nothing opened."""
    from nvmet_p2p.backends import BdevBackend, FileBackend, MemoryBackend
    kind, path = ns.device_backend, ns.device_path
    if kind == "auto":
        try:
            kind = "bdev" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
        except OSError:
            kind = "file"
    label = f"{kind} {path}".strip()
    if kind == "vfio-nvme":
        from nvmet_p2p.backends.vfio_nvme.backend import VfioNvmeBackend
        return normalize_bdf(path), label, VfioNvmeBackend.accepts_p2p
    if kind == "bdev":
        from nvmet_p2p.backends.bdev import pci_function_of, sysfs_block_dir
        client = None
        try:
            client = pci_function_of(sysfs_block_dir(os.stat(path).st_rdev,
                                                     str(topology.sysfs_root)))
        except OSError:
            pass
        if client is None:  # by name under class/block (synthetic trees, captured /sys)
            try:
                client = topology.resolve_client(path).bdf
            except P2PError:
                client = None
        return client, label, BdevBackend.accepts_p2p
    backend_cls = MemoryBackend if kind == "memory" else FileBackend
    return None, label, backend_cls.accepts_p2p


def config_candidates(root: Any, sysfs_root: str | os.PathLike[str]) -> list[Candidate]:
    """Published kernel p2pmem, then the CMB of every enabled vfio-nvme namespace device."""
    out: list[Candidate] = []
    for info in published_p2pmem(sysfs_root):
        if info.published:
            out.append(Candidate(info.bdf, f"p2pmem {info.bdf}"))
    seen = set()
    for subsys in root.subsystems.values():
        for ns in subsys.namespaces.values():
            bdf = normalize_bdf(ns.device_path) if ns.device_backend == "vfio-nvme" else None
            if bdf is not None and ns.enable and bdf not in seen:
                seen.add(bdf)
                out.append(Candidate(bdf, f"nvme-cmb of {bdf} (probed when the namespace "
                                          "is enabled)"))
    return out


def explain_config(root: Any, *, sysfs_root: str = "/sys", cpu: str | None = None,
                   netdev_of: NetdevOfAddr = netdev_of_addr,
                   rng: random.Random | None = None) -> list[Decision]:
    """The decision for every (port, linked subsystem's namespace) of a configuration.

    No backend is opened: a namespace's PCI client is its vfio-nvme BDF or the PCI
    function under its block device; the transport's client is the RDMA device whose
    netdev holds the port's address (rdma) or none (loop and tcp: CPU copies); the
    candidates are the published p2pmem and the CMBs of the vfio-nvme controllers, which
    are only probed when their namespace is enabled.
    """
    topology = Topology(sysfs_root, cpu=cpu)
    candidates = config_candidates(root, sysfs_root)
    out = []
    for portid in sorted(root.ports):
        port = root.ports[portid]
        trtype = port.addr_trtype
        client, reason = None, None
        if trtype == "rdma":
            client, reason = _rdma_client(port, sysfs_root, netdev_of)
        elif trtype not in ("loop", "tcp"):  # loop and tcp move data with the CPU: no client
            reason = f"transport {trtype} cannot do peer-to-peer DMA"
        for nqn in port.subsystems:
            subsys = root.subsystems.get(nqn)
            if subsys is None:
                continue
            for nsid in sorted(subsys.namespaces):
                ns = subsys.namespaces[nsid]
                if not ns.enable:
                    out.append(_not_enabled(portid, nqn, nsid))
                    continue
                try:
                    ns_client, label, accepts = _ns_client(ns, topology)
                    d = decide(topology, port=port, subnqn=nqn, nsid=nsid,
                               ns_p2pmem=str(ns.p2pmem), transport_client=client,
                               transport_reason=reason, ns_client=ns_client, ns_label=label,
                               backend_accepts=accepts, candidates=candidates, rng=rng)
                except (P2PError, OSError) as e:
                    d = Decision(portid, nqn, nsid, False,
                                 f"topology could not be evaluated: {e}")
                out.append(d)
    return out
