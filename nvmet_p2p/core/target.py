"""The target: the configuration tree brought to life.

`Target` implements the configfs tree's hooks (a namespace enabled opens its backend,
a subsystem linked to a port starts that port's listener), registers transports, owns
the run-time subsystems and controllers, the discovery generation counter and
keep-alive.  It imports no transport, backend or P2P policy: transports register
themselves, and whoever composes the target (the daemon, a test environment, a
benchmark) hands it the backend opener and the P2P policy.

A port whose listener cannot start (its RDMA device is not up yet, the address is not
configured) stays linked and configured, as nvmet-rdma keeps it: the reason is kept
in `listen_errors` (status, log) and `retry_ports()` tries again; the daemon calls it
periodically and when an RDMA device appears.
"""

from __future__ import annotations

import asyncio
import logging

from nvmet_p2p import logfmt
from nvmet_p2p.configfs import Namespace, Port, Root, Subsystem, TreeHooks
from nvmet_p2p.core.backend import BackendOpener
from nvmet_p2p.core.clock import Clock
from nvmet_p2p.core.ctrl import Ctrl
from nvmet_p2p.core.p2pmem import P2PPolicy
from nvmet_p2p.core.queue import SQ
from nvmet_p2p.core.subsys import Ns, Subsys
from nvmet_p2p.core.transport import TransportOps
from nvmet_p2p.errors import BackendError, ConfigError, NvmetError
from nvmet_p2p.wire.limits import (
    NVME_DISC_SUBSYS_NAME,
    NVMET_MAX_QUEUE_SIZE,
    NVMET_MAX_TRANSFER,
    NVMET_P2P_ENABLE_TIMEOUT_S,
    NVMET_P2P_MAX_CTRLS_PER_HOST,
    NVMET_RDMA_MAX_MDTS,
)

log = logging.getLogger("nvmet_p2p.core")

CAP_TO = 15  # CAP.TO: 7.5 s (500 ms units) for the host to wait for CSTS.RDY
CAP_CSS_NVM = 1 << 37


class Target(TreeHooks):
    """`open_backend` opens an enabled namespace's backend; `p2p` decides which memory
    each controller's I/O to each namespace uses."""

    def __init__(self, root: Root | None = None, *, open_backend: BackendOpener,
                 p2p: P2PPolicy, loop: asyncio.AbstractEventLoop | None = None,
                 clock: Clock | None = None,
                 max_ctrls_per_host: int = NVMET_P2P_MAX_CTRLS_PER_HOST,
                 enable_timeout: float = NVMET_P2P_ENABLE_TIMEOUT_S) -> None:
        self.root = root if root is not None else Root()
        self.loop = loop if loop is not None else asyncio.get_event_loop()
        self.clock = clock or Clock()
        self.transports: dict[str, TransportOps] = {}
        self._subsystems: dict[str, Subsys] = {}
        self.discovery = Subsys(NVME_DISC_SUBSYS_NAME)
        self.listening: dict[int, TransportOps] = {}  # portid -> transport serving it
        self.listen_errors: dict[int, str] = {}  # portid -> why it is not listening yet
        self.disc_genctr = 0
        self.mdts = NVMET_RDMA_MAX_MDTS
        self.max_transfer = NVMET_MAX_TRANSFER
        self.open_backend = open_backend
        self.p2p = p2p
        self.max_ctrls_per_host = max_ctrls_per_host
        self.enable_timeout = enable_timeout  # seconds; 0: no deadline
        self.root.hooks = self

    # -- setup ----------------------------------------------------------------
    def register_transport(self, ops: TransportOps) -> None:
        self.transports[ops.trtype] = ops

    def shutdown(self) -> None:
        """Tear every controller down, stop listeners, close backends."""
        for subsys in list(self._subsystems.values()) + [self.discovery]:
            for ctrl in list(subsys.ctrls.values()):
                ctrl.fatal_error("target shutting down")
        for portid, ops in list(self.listening.items()):
            port = self.root.ports.get(portid)
            if port is not None:
                ops.remove_port(port)
        self.listening.clear()
        self.listen_errors.clear()
        for subsys in self._subsystems.values():
            for ns in subsys.ns.values():
                ns.disable()
            subsys.ns.clear()

    # -- queues and controllers, for transports and the fabrics commands --------
    def create_sq(self, port: Port, ops: TransportOps, qid: int = 0, size: int = 0) -> SQ:
        return SQ(self, port, ops, qid, size)

    def get_subsys(self, nqn: str) -> Subsys | None:
        """The run-time subsystem for a configured NQN (made on first use)."""
        if nqn == NVME_DISC_SUBSYS_NAME:
            return self.discovery
        cfg = self.root.subsystems.get(nqn)
        if cfg is None:
            return None
        rt = self._subsystems.get(nqn)
        if rt is None or rt.cfg is not cfg:  # deleted and created again: a new subsystem
            rt = self._subsystems[nqn] = Subsys(nqn, cfg)
        return rt

    def find_subsys(self, port: Port, nqn: str) -> Subsys | None:
        """The subsystem a host may reach through `port` by this NQN."""
        if nqn != NVME_DISC_SUBSYS_NAME and nqn not in port.subsystems:
            return None
        return self.get_subsys(nqn)

    def create_ctrl(self, subsys: Subsys, sq: SQ, hostnqn: str, hostid: bytes,
                    kato_ms: int) -> Ctrl | None:
        held = sum(1 for c in subsys.ctrls.values() if c.hostnqn == hostnqn and not c.dead)
        if held >= self.max_ctrls_per_host:
            logfmt.warning(log, "connect_refused", hostnqn=hostnqn, subnqn=subsys.nqn,
                           ctrls=held, reason="max_ctrls_per_host reached")
            return None
        cntlid = subsys.alloc_cntlid()
        if cntlid is None:
            return None
        ctrl = Ctrl(self, subsys, sq.port, cntlid, hostnqn, hostid, kato_ms, sq.ops)
        subsys.ctrls[cntlid] = ctrl
        ctrl.sqs[0] = sq
        sq.ctrl = ctrl
        logfmt.info(log, "ctrl_connected", cntlid=cntlid, hostnqn=hostnqn, subnqn=subsys.nqn,
                    portid=getattr(sq.port, "portid", None), kato_s=ctrl.kato)
        for ns in list(subsys.ns.values()):  # as the kernel, P2P is decided at Connect
            ctrl.p2p_choice(ns)
        return ctrl

    def remove_ctrl(self, ctrl: Ctrl) -> None:
        if ctrl.subsys.ctrls.get(ctrl.cntlid) is ctrl:
            del ctrl.subsys.ctrls[ctrl.cntlid]
            ctrl.dead = True
            logfmt.info(log, "ctrl_removed", cntlid=ctrl.cntlid, hostnqn=ctrl.hostnqn,
                        subnqn=ctrl.subsys.nqn)

    def controllers(self) -> list[Ctrl]:
        out = list(self.discovery.ctrls.values())
        for subsys in self._subsystems.values():
            out.extend(subsys.ctrls.values())
        return out

    # -- per-port limits --------------------------------------------------------
    def mqes(self, port: Port) -> int:
        """CAP.MQES (0's based): the largest I/O queue a host may create on `port`."""
        # resolved: the configured value may be -1, "the transport's default"
        return min(port.resolved_max_queue_size(), NVMET_MAX_QUEUE_SIZE) - 1

    def cap(self, port: Port) -> int:
        return CAP_CSS_NVM | CAP_TO << 24 | self.mqes(port)

    def inline_data_size(self, port: Port) -> int:
        return port.resolved_inline_data_size()

    # -- keep-alive -------------------------------------------------------------
    def tick(self) -> None:
        """Check keep-alive timers; the daemon calls this about once a second."""
        now = self.clock.now()
        for ctrl in self.controllers():
            if ctrl.kato_expired(now):
                ctrl.fatal_error(f"keep-alive timer ({ctrl.kato}s) expired")
            elif (self.enable_timeout and not ctrl.ready and not ctrl.dead
                  and now - ctrl.state_since > self.enable_timeout):
                ctrl.fatal_error(f"{ctrl.state.name.lower()} and not enabled within "
                                 f"{self.enable_timeout:g}s")

    # -- TreeHooks: the configuration changed --------------------------------------
    def ns_enable(self, subsys_cfg: Subsystem, ns_cfg: Namespace) -> None:
        subsys = self.get_subsys(subsys_cfg.nqn)
        assert subsys is not None  # the tree enables namespaces of its own subsystems only
        try:
            backend = self.open_backend(
                ns_cfg.device_path, kind=ns_cfg.device_backend,
                block_size=ns_cfg.device_block_size, size=ns_cfg.device_size,
                create=ns_cfg.device_create, buffered_io=ns_cfg.buffered_io, loop=self.loop)
        except BackendError as e:
            raise ConfigError(f"namespace {ns_cfg.nsid} of {subsys_cfg.nqn}: {e}") from e
        ns = Ns(subsys, ns_cfg.nsid, backend, ns_cfg)
        why = self.p2p.check_ns(ns, [*self.namespaces(), ns])
        if why:
            backend.close()
            raise ConfigError(f"namespace {ns_cfg.nsid} of {subsys_cfg.nqn}: p2pmem "
                              f"{ns_cfg.p2pmem}: {why}")
        subsys.ns[ns.nsid] = ns
        logfmt.info(log, "ns_enabled", subnqn=subsys.nqn, nsid=ns_cfg.nsid,
                    backend=backend.describe())
        for ctrl in subsys.ctrls.values():
            ctrl.p2p_ns_map.pop(ns.nsid, None)  # as nvmet_p2pmem_ns_add_p2p(): decide now
            ctrl.p2p_choice(ns)
            ctrl.ns_changed(ns_cfg.nsid)

    def ns_disable(self, subsys_cfg: Subsystem, ns_cfg: Namespace) -> None:
        subsys = self.get_subsys(subsys_cfg.nqn)
        if subsys is None:
            return
        ns = subsys.ns.pop(ns_cfg.nsid, None)
        if ns is None:
            return
        ns.disable()
        logfmt.info(log, "ns_disabled", subnqn=subsys.nqn, nsid=ns.nsid, inflight=ns.inflight)
        for ctrl in subsys.ctrls.values():
            ctrl.p2p_ns_map.pop(ns.nsid, None)
            ctrl.ns_changed(ns.nsid)

    def _start_port(self, port: Port) -> None:
        if port.portid in self.listening:
            return
        ops = self.transports.get(port.addr_trtype)
        if ops is None:
            raise ConfigError(f"port {port.portid}: transport {port.addr_trtype!r} is not "
                              f"available in this target (have: {', '.join(self.transports)})")
        try:
            ops.add_port(port)
        except (NvmetError, OSError) as e:
            why = (f"cannot listen on {port.addr_traddr}:{port.addr_trsvcid}: {e}; "
                   "retrying")
            if self.listen_errors.get(port.portid) != why:
                logfmt.warning(log, "port_not_listening", portid=port.portid, reason=why)
            self.listen_errors[port.portid] = why
            return
        self.listening[port.portid] = ops
        self.listen_errors.pop(port.portid, None)
        logfmt.info(log, "port_listening", portid=port.portid, trtype=port.addr_trtype,
                    traddr=port.addr_traddr, trsvcid=port.addr_trsvcid)

    def retry_ports(self) -> None:
        """Try again to listen on every linked port that is not listening."""
        for portid in list(self.listen_errors):
            port = self.root.ports.get(portid)
            if port is None or not port.subsystems:
                self.listen_errors.pop(portid, None)
                continue
            self._start_port(port)

    def port_down(self, port: Port, why: str) -> None:
        """A transport lost a listener (its device went away): retried like a failed start."""
        if self.listening.pop(port.portid, None) is not None:
            logfmt.warning(log, "port_down", portid=port.portid, reason=f"{why}; retrying")
            self.listen_errors[port.portid] = f"{why}; retrying"

    def port_add_subsys(self, port: Port, subsys_cfg: Subsystem) -> None:
        self._start_port(port)  # a port listens once its first subsystem is linked
        self.discovery_changed()

    def port_remove_subsys(self, port: Port, subsys_cfg: Subsystem) -> None:
        # as nvmet_port_del_ctrls(): controllers reached through this link go with it
        subsys = self._subsystems.get(subsys_cfg.nqn)
        if subsys is not None:
            for ctrl in list(subsys.ctrls.values()):
                if ctrl.port is port:
                    logfmt.info(log, "ctrl_deleted", cntlid=ctrl.cntlid, subnqn=subsys.nqn,
                                portid=port.portid, reason="subsystem unlinked from the port")
                    ctrl.delete()
        remaining = [n for n in port.subsystems if n != subsys_cfg.nqn]
        if not remaining:
            self.listen_errors.pop(port.portid, None)
        if not remaining and port.portid in self.listening:
            self.listening.pop(port.portid).remove_port(port)
            logfmt.info(log, "port_stopped", portid=port.portid)
        self.discovery_changed()

    def subsys_hosts_changed(self, subsys_cfg: Subsystem) -> None:
        self.discovery_changed()

    def port_changed(self, port: Port) -> None:
        pass  # attributes take effect for controllers created afterwards

    def subsys_queues_changed(self, subsys_cfg: Subsystem) -> None:
        # as the kernel's attr_qid_max store: every controller is deleted so that its host
        # reconnects and learns the new number of I/O queues (Connect checks qid_max)
        subsys = self._subsystems.get(subsys_cfg.nqn)
        if subsys is None or subsys.cfg is not subsys_cfg:
            return
        for ctrl in list(subsys.ctrls.values()):
            logfmt.info(log, "ctrl_deleted", cntlid=ctrl.cntlid, subnqn=subsys.nqn,
                        hostnqn=ctrl.hostnqn, qid_max=subsys.qid_max,
                        reason="qid_max changed; the host reconnects")
            ctrl.delete()

    def discovery_changed(self) -> None:
        self.disc_genctr += 1
        for ctrl in list(self.discovery.ctrls.values()):
            ctrl.disc_changed()

    # -- status -----------------------------------------------------------------
    def p2p_status(self) -> dict:
        """The P2P decision of every live (controller, namespace), and the providers."""
        decisions = [dict(d.to_json(), cntlid=c.cntlid) for c in self.controllers()
                     for d in c.p2p_ns_map.values()]
        return {"decisions": decisions, "providers": self.p2p.providers(self.namespaces())}

    def namespaces(self) -> list[Ns]:
        """Every enabled namespace of every subsystem, in configuration order."""
        out: list[Ns] = []
        for nqn in self.root.subsystems:
            subsys = self.get_subsys(nqn)
            if subsys is not None:
                out.extend(ns for ns in subsys.ns.values() if not ns.closing)
        return out

    def status(self) -> dict:
        subsystems = {}
        for nqn in self.root.subsystems:
            subsys = self.get_subsys(nqn)
            assert subsys is not None  # nqn comes from the tree, so it is configured
            subsystems[nqn] = {"namespaces": [ns.describe() for ns in subsys.ns.values()],
                               "controllers": [c.cntlid for c in subsys.ctrls.values()]}
        return {
            "ports": {pid: {"listening": pid in self.listening,
                            **({"error": self.listen_errors[pid]}
                               if pid in self.listen_errors else {})}
                      for pid in self.root.ports},
            "subsystems": subsystems,
            "controllers": [c.describe() for c in self.controllers()],
            "disc_genctr": self.disc_genctr,
            "p2p": self.p2p_status(),
            "transports": {name: ops.resources() for name, ops in self.transports.items()},
        }
