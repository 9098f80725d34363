"""The live P2P policy of a target: the decision for a controller's I/O to a namespace.

`P2PPolicy` implements the core's `nvmet_p2p.core.p2pmem.P2PPolicy`: the core asks it
once per (controller, namespace) and keeps the answer in the controller's p2p_ns_map
(the core also logs it, allocates the per-request chunks and counts the fallbacks).
The candidates are live: the CMBs our own NVMe driver found in enabled namespaces, and
the p2pmem the kernel publishes, mapped once per device when first chosen
(`cmb.KernelP2pmemProvider`).
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nvmet_p2p.cmb import PAGE_SIZE, KernelP2pmemProvider, Provider, p2pmem_exhausted
from nvmet_p2p.errors import P2PError
from nvmet_p2p.p2p.decision import Candidate, CanRegister, Decision, PortFacts, decide
from nvmet_p2p.p2p.topology import P2pmemInfo, Topology, published_p2pmem

if TYPE_CHECKING:
    from nvmet_p2p.configfs import Port
    from nvmet_p2p.core.ctrl import Ctrl
    from nvmet_p2p.core.subsys import Ns, Subsys
    from nvmet_p2p.core.transport import TransportOps

log = logging.getLogger("nvmet_p2p.p2p")

P2PMEM_ALLOCATE_MISSING = "p2pmem/allocate is missing (needs Linux >= 6.2)"
P2PMEM_UNPUBLISHED = "p2pmem is not published (its driver keeps it private)"
# What one mmap of a device's p2pmem/allocate takes from the kernel's pool for us: room for
# 16 MDTS-sized transfers, and the rest stays for the kernel target or other users.
P2PMEM_POOL_SIZE = 16 << 20


class P2PPolicy:
    """Decisions over the PCI tree at `sysfs_root`; see the module docstring."""

    def __init__(self, sysfs_root: str = "/sys", cpu: str | None = None,
                 rng: random.Random | None = None,
                 p2pmem_pool_size: int = P2PMEM_POOL_SIZE) -> None:
        self.sysfs_root = sysfs_root
        self.topology = Topology(sysfs_root, cpu=cpu)
        self.rng = rng or random.Random()
        self.p2pmem_pool_size = p2pmem_pool_size
        self._kernel_providers: dict[str, Provider] = {}

    def candidates(self, namespaces: Sequence[Ns]) -> list[Candidate]:
        """The CMBs our own NVMe driver found, then the kernel's p2pmem: a device's is
        mapped (`p2pmem_pool_size` of it) when a decision first chooses it, and kept."""
        out = []
        for ns in namespaces:
            cmb = ns.backend.cmb
            if cmb is not None and not cmb.closed:
                # As the kernel: a CMB is for others only with both WDS and RDS.
                unusable = None if cmb.published else cmb.publish_reason or "not published"
                out.append(Candidate(cmb.bdf or "", cmb.name, cmb, unusable, cmb.kind))
        try:
            p2pmem = published_p2pmem(self.sysfs_root)
        except OSError:
            p2pmem = []  # no PCI tree to read: nothing is published
        for bdf in [b for b, p in self._kernel_providers.items() if p.closed]:
            del self._kernel_providers[bdf]  # revoked (its driver unbound): map anew
        for info in p2pmem:
            prov = self._kernel_providers.get(info.bdf)
            unusable = None
            if prov is not None:
                pass  # mapped before; the kernel may since show it unpublished, ours stays
            elif not info.published:
                unusable = P2PMEM_UNPUBLISHED
            elif not info.allocatable:
                unusable = P2PMEM_ALLOCATE_MISSING
            elif info.available < PAGE_SIZE:
                unusable = p2pmem_exhausted(info.bdf, info.available, info.size)
            opener = (None if prov is not None or unusable
                      else functools.partial(self._map_p2pmem, info))
            out.append(Candidate(info.bdf, f"p2pmem {info.bdf}", prov, unusable, open=opener))
        return out

    def _map_p2pmem(self, info: P2pmemInfo) -> Provider:
        """Map `p2pmem_pool_size` of a device's p2pmem (less if less is free) and keep it:
        the next candidates() offers it live."""
        prov = KernelP2pmemProvider(self.sysfs_root, info.bdf,
                                    size=min(self.p2pmem_pool_size, info.available))
        self._kernel_providers[info.bdf] = prov
        return prov

    def decide_for(self, port: Port, ops: TransportOps | None, subsys: Subsys, ns: Ns,
                   namespaces: Sequence[Ns]) -> Decision:
        """The decision for `ns` reached through `port` by transport `ops` (None: the
        port's transport is not in this target); `namespaces` hold the candidate CMBs."""
        if ops is None:
            return self._decide(port, subsys, ns, namespaces, transport_reason=(
                f"transport {port.addr_trtype} is not available in this target"))
        return self._decide(port, subsys, ns, namespaces,
                            transport_client=ops.p2p_client(port),
                            can_register=ops.p2p_can_register)

    def _decide(self, port: PortFacts, subsys: Subsys, ns: Ns, namespaces: Sequence[Ns], *,
                transport_client: str | None = None, transport_reason: str | None = None,
                can_register: CanRegister | None = None) -> Decision:
        backend = ns.backend
        label = f"{backend.kind} {backend.path}".strip()
        try:
            return decide(self.topology, port=port, subnqn=subsys.nqn, nsid=ns.nsid,
                          ns_p2pmem=str(ns.cfg.p2pmem) if ns.cfg else "1",
                          transport_client=transport_client, transport_reason=transport_reason,
                          ns_client=backend.p2p_client, ns_label=label,
                          backend_kinds=backend.p2p_kinds, backend_needs=backend.p2p_needs,
                          candidates=self.candidates(namespaces), can_register=can_register,
                          rng=self.rng)
        except (P2PError, OSError) as e:
            return Decision(port.portid, subsys.nqn, ns.nsid, False,
                            f"topology could not be evaluated: {e}")

    # -- nvmet_p2p.core.p2pmem.P2PPolicy ---------------------------------------------------
    def decide(self, ctrl: Ctrl, ns: Ns) -> Decision:
        return self.decide_for(ctrl.port, ctrl.ops, ctrl.subsys, ns, ctrl.target.namespaces())

    def check_ns(self, ns: Ns, namespaces: Sequence[Ns]) -> str | None:
        """Why `ns` cannot be enabled with p2pmem pinned to a BDF, or None.

        As the kernel's nvmet_p2pmem_ns_enable(): the backend must issue P2P-flagged I/O
        and the pinned provider must exist and be reachable from the namespace's device;
        the transport is judged per controller, at Connect.  Only a pinned provider is
        checked: our default p2pmem is 1 (auto), which must not refuse a file namespace.
        """
        pinned = str(ns.cfg.p2pmem) if ns.cfg else "1"
        if pinned in ("0", "1"):
            return None
        d = self._decide(_ENABLE_PORT, ns.subsys, ns, namespaces)
        return None if d.p2p else d.reason

    def providers(self, namespaces: Sequence[Ns]) -> list[dict]:
        """The live CMBs and the kernel p2pmem mapped so far (status maps nothing)."""
        cmbs = [ns.backend.cmb for ns in namespaces]
        live = [p for p in cmbs if p is not None and not p.closed]
        return [p.describe() for p in [*live, *self._kernel_providers.values()]]

    def close(self) -> None:
        """Unmap the kernel p2pmem this policy mapped; idempotent."""
        for prov in self._kernel_providers.values():
            prov.close()
        self._kernel_providers.clear()


@dataclass(frozen=True)
class _Port:
    portid: int
    attr_allow_p2pmem: bool


_ENABLE_PORT = _Port(0, True)  # a namespace-enable check: P2P allowed, no transport yet
