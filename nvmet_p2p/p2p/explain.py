"""`p2p explain`: the P2P decision for every (port, namespace), with its reason.

`explain(target, policy)` for a running target (the RPC method `p2p_explain`): the
decision a controller connecting now would get, made afresh with the live providers,
plus the payload counters of each namespace so far.  `explain_config(root, ...)` for a
configuration file: no backend is opened, and the clients and providers are found from
the configuration and sysfs alone.
"""

from __future__ import annotations

import os
import random
import stat
from typing import TYPE_CHECKING

from nvmet_p2p.backends import FileBackend, MemoryBackend
from nvmet_p2p.backends.bdev import p2p_support, pci_function_of, sysfs_block_dir
from nvmet_p2p.backends.vfio_nvme.backend import VfioNvmeBackend
from nvmet_p2p.errors import P2PError
from nvmet_p2p.p2p.decision import Candidate, Decision, decide, not_enabled
from nvmet_p2p.p2p.netdev import NetdevOfAddr, netdev_of_addr, rdma_client
from nvmet_p2p.p2p.policy import P2PMEM_ALLOCATE_MISSING, P2PMEM_UNPUBLISHED, P2PPolicy
from nvmet_p2p.p2p.topology import Topology, published_p2pmem
from nvmet_p2p.pci import normalize_bdf

if TYPE_CHECKING:
    from nvmet_p2p.config.tree import Namespace, Root
    from nvmet_p2p.core.subsys import Ns
    from nvmet_p2p.core.target import Target


def payload_counters(ns: Ns) -> dict:
    """Where a namespace's Read/Write payload went so far: P2P, or system memory and why."""
    st = ns.stats
    return {"p2p_bytes": st["p2p_bytes"], "p2p_reqs": st["p2p_reqs"],
            "sysmem_bytes": st["sysmem_bytes"], "sysmem_reqs": st["sysmem_reqs"],
            "sysmem_bytes_by_reason": dict(st["sysmem_bytes_by_reason"])}


def payload_text(c: dict) -> str:
    """'payload so far: 8192 bytes P2P, 4096 in system memory (in-capsule data: 4096)'."""
    why = ", ".join(f"{r}: {n}" for r, n in c["sysmem_bytes_by_reason"].items())
    return (f"payload so far: {c['p2p_bytes']} bytes P2P, {c['sysmem_bytes']} in system "
            f"memory" + (f" ({why})" if why else ""))


def explain(target: Target, policy: P2PPolicy) -> list[dict]:
    """Decision.to_json() for every (port, linked subsystem's namespace) of a running target.

    The decisions are made afresh by `policy` (the target's), as a controller connecting
    now would get them; nothing is cached or logged.  An enabled namespace's entry carries
    its payload counters (`payload`, also at the end of `text`); a configured namespace
    that is not enabled has no backend and is reported as such.
    """
    everything = target.namespaces()
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
                if ns is None or ns.closing:
                    out.append(not_enabled(portid, nqn, nsid).to_json())
                    continue
                entry = policy.decide_for(port, ops, subsys, ns, everything).to_json()
                entry["payload"] = payload_counters(ns)
                entry["text"] += f"; {payload_text(entry['payload'])}"
                out.append(entry)
    return out


# -- offline: a configuration file, no backend opened ------------------------------------------

def _ns_facts(ns: Namespace, topology: Topology) -> tuple[str | None, str, frozenset[str], str]:
    """(PCI client, label, P2P provider kinds, what they need) of a configured namespace,
    nothing opened."""
    kind, path = ns.device_backend, ns.device_path
    if kind == "auto":
        try:
            kind = "bdev" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
        except OSError:
            kind = "file"
    label = f"{kind} {path}".strip()
    if kind == "vfio-nvme":
        cls = VfioNvmeBackend
        return normalize_bdf(path), label, cls.p2p_kinds, cls.p2p_needs
    if kind == "bdev":
        try:
            block_dir = sysfs_block_dir(os.stat(path).st_rdev, str(topology.sysfs_root))
            client = pci_function_of(block_dir)
        except OSError:
            client = None
        if client is None:  # by name under class/block (synthetic trees, captured /sys)
            block_dir = os.path.realpath(topology.sysfs_root / "class/block" /
                                         os.path.basename(path))
            try:
                client = topology.resolve_client(path).bdf
            except P2PError:
                client = None
        kinds, needs = p2p_support(block_dir, path, o_direct=not ns.buffered_io)
        return client, label, kinds, needs
    cls_ = MemoryBackend if kind == "memory" else FileBackend
    return None, label, cls_.p2p_kinds, cls_.p2p_needs


def config_candidates(root: Root, sysfs_root: str | os.PathLike[str]) -> list[Candidate]:
    """The kernel's p2pmem, then the CMB of every enabled vfio-nvme namespace device."""
    out: list[Candidate] = []
    for info in published_p2pmem(sysfs_root):
        unusable = (P2PMEM_UNPUBLISHED if not info.published else
                    P2PMEM_ALLOCATE_MISSING if not info.allocatable else None)
        out.append(Candidate(info.bdf, f"p2pmem {info.bdf}", unusable=unusable))
    seen = set()
    for subsys in root.subsystems.values():
        for ns in subsys.namespaces.values():
            bdf = normalize_bdf(ns.device_path) if ns.device_backend == "vfio-nvme" else None
            if bdf is not None and ns.enable and bdf not in seen:
                seen.add(bdf)
                out.append(Candidate(bdf, f"nvme-cmb of {bdf} (probed when the namespace "
                                          "is enabled)", kind="nvme-cmb"))
    return out


def explain_config(root: Root, *, sysfs_root: str = "/sys", cpu: str | None = None,
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
        client: str | None = None
        reason: str | None = None
        if trtype == "rdma":
            client, reason = rdma_client(port, sysfs_root, netdev_of)
        elif trtype not in ("loop", "tcp"):  # loop and tcp move data with the CPU: no client
            reason = f"transport {trtype} cannot do peer-to-peer DMA"
        for nqn in port.subsystems:
            subsys = root.subsystems.get(nqn)
            if subsys is None:
                continue
            for nsid in sorted(subsys.namespaces):
                ns = subsys.namespaces[nsid]
                if not ns.enable:
                    out.append(not_enabled(portid, nqn, nsid))
                    continue
                d: Decision
                try:
                    ns_client, label, kinds, needs = _ns_facts(ns, topology)
                    d = decide(topology, port=port, subnqn=nqn, nsid=nsid,
                               ns_p2pmem=str(ns.p2pmem), transport_client=client,
                               transport_reason=reason, ns_client=ns_client, ns_label=label,
                               backend_kinds=kinds, backend_needs=needs,
                               candidates=candidates, rng=rng)
                except (P2PError, OSError) as e:
                    d = Decision(portid, nqn, nsid, False,
                                 f"topology could not be evaluated: {e}")
                out.append(d)
    return out
