"""A controller: one host's association with one subsystem, and its state.

Owns the controller registers (CC/CSTS), features, keep-alive, asynchronous event
requests and their pending events, the changed-namespace list, the error log and, as
the kernel's ``ctrl->p2p_ns_map``, the P2P decision for each of its namespaces.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from enum import Enum, auto
from typing import TYPE_CHECKING

from nvmet_p2p import logfmt
from nvmet_p2p.core import p2pmem
from nvmet_p2p.wire.limits import (
    NVME_MAX_CHANGED_NAMESPACES,
    NVMET_ASYNC_EVENTS,
    NVMET_DISC_KATO_MS,
    NVMET_ERROR_LOG_SLOTS,
)
from nvmet_p2p.wire.regs import CC_EN, CC_SHN_MASK, CSTS_CFS, CSTS_RDY, CSTS_SHST_CMPLT
from nvmet_p2p.wire.status import Status

if TYPE_CHECKING:
    from nvmet_p2p.configfs import Port
    from nvmet_p2p.core.p2pmem import P2PChoice
    from nvmet_p2p.core.queue import SQ
    from nvmet_p2p.core.request import Request
    from nvmet_p2p.core.subsys import Ns, Subsys
    from nvmet_p2p.core.target import Target
    from nvmet_p2p.core.transport import TransportOps

log = logging.getLogger("nvmet_p2p.core")

# Asynchronous event configuration bits (Set Features 0x0B) and event encodings
AEN_CFG_NS_ATTR = 1 << 8
AEN_CFG_DISC_CHANGE = 1 << 31
AER_TYPE_NOTICE = 2
AER_NOTICE_NS_CHANGED = 0x00
AER_NOTICE_DISC_CHANGED = 0xF0
LOG_CHANGED_NS = 0x04
LOG_DISC = 0x70


class CtrlState(Enum):
    """A controller's lifecycle (CC/CSTS).  Enabling and shutting down have no state of
    their own: both complete inside the Property Set that starts them."""

    CONNECTED = auto()  # admin queue up, CC.EN = 0: waits for CC.EN = 1 (enable deadline)
    READY = auto()  # CC.EN = 1, CSTS.RDY = 1: serves commands; waits for CC.EN = 0 or SHN
    CONFIG_FATAL = auto()  # CC.EN = 1 with a configuration we refuse, CSTS.CFS: waits for
    #                        the host to reset it (CC.EN = 0)
    SHUT_DOWN = auto()  # CC.SHN written, CSTS.SHST complete, CC cleared: waits for the host
    #                     to disconnect or enable again
    FATAL = auto()  # keep-alive expired or the target tore it down: waits for nothing


class CcEvent(Enum):
    ENABLE = auto()  # CC.EN 0 -> 1 with a configuration we support
    ENABLE_INVALID = auto()  # CC.EN 0 -> 1 with one we do not
    DISABLE = auto()  # CC.EN 1 -> 0: a controller reset
    SHUTDOWN = auto()  # CC.SHN 0 -> normal or abrupt
    FATAL = auto()  # keep-alive expiry, target shutdown


_S, _E = CtrlState, CcEvent
# (state, event) -> next state.  A pair that is missing cannot happen: CC.EN 0 -> 1 needs
# CC.EN = 0 (CONNECTED, SHUT_DOWN), CC.EN 1 -> 0 needs CC.EN = 1 (READY, CONFIG_FATAL).
TRANSITIONS: dict[tuple[CtrlState, CcEvent], CtrlState] = {
    (_S.CONNECTED, _E.ENABLE): _S.READY,
    (_S.CONNECTED, _E.ENABLE_INVALID): _S.CONFIG_FATAL,
    (_S.CONNECTED, _E.SHUTDOWN): _S.SHUT_DOWN,
    (_S.CONNECTED, _E.FATAL): _S.FATAL,
    (_S.READY, _E.DISABLE): _S.CONNECTED,
    (_S.READY, _E.SHUTDOWN): _S.SHUT_DOWN,
    (_S.READY, _E.FATAL): _S.FATAL,
    (_S.CONFIG_FATAL, _E.DISABLE): _S.CONNECTED,
    (_S.CONFIG_FATAL, _E.SHUTDOWN): _S.SHUT_DOWN,
    (_S.CONFIG_FATAL, _E.FATAL): _S.FATAL,
    (_S.SHUT_DOWN, _E.ENABLE): _S.READY,
    (_S.SHUT_DOWN, _E.ENABLE_INVALID): _S.CONFIG_FATAL,
    (_S.SHUT_DOWN, _E.SHUTDOWN): _S.SHUT_DOWN,
    (_S.SHUT_DOWN, _E.FATAL): _S.FATAL,
}


class Ctrl:
    def __init__(self, target: Target, subsys: Subsys, port: Port, cntlid: int,
                 hostnqn: str, hostid: bytes, kato_ms: int, ops: TransportOps) -> None:
        self.target = target
        self.subsys = subsys
        self.port = port
        self.cntlid = cntlid
        self.hostnqn = hostnqn
        self.hostid = hostid
        self.ops = ops  # the transport that created the admin queue
        self.cc = 0
        self.csts = 0
        self.state = CtrlState.CONNECTED
        self.state_since = target.clock.now()  # for the enable deadline
        self.kato = kato_ms // 1000 if kato_ms % 1000 == 0 else kato_ms // 1000 + 1
        if self.kato == 0 and subsys.is_discovery:
            self.kato = NVMET_DISC_KATO_MS // 1000
        self.aen_enabled = AEN_CFG_NS_ATTR | (AEN_CFG_DISC_CHANGE if subsys.is_discovery else 0)
        self.aen_masked = 0  # events sent and not yet cleared by reading their log
        self.sqs: dict[int, SQ] = {}
        self.aer_reqs: deque[Request] = deque()
        self.pending_events: deque[int] = deque()
        self.changed_ns: list[int] = []
        self.err_counter = 0
        self.errors: deque[dict] = deque(maxlen=NVMET_ERROR_LOG_SLOTS)
        self.last_seen = target.clock.now()
        self.dead = False
        self.p2p_ns_map: dict[int, P2PChoice] = {}  # nsid -> the P2P policy's decision

    # -- registers and lifecycle -------------------------------------------------
    def update_cc(self, new: int) -> None:
        """Property Set CC: the write's events, in the kernel's order, drive the state."""
        old, self.cc = self.cc, new
        events = []
        if new & CC_EN and not old & CC_EN:
            events.append(CcEvent.ENABLE if self._config_ok() else CcEvent.ENABLE_INVALID)
        if not new & CC_EN and old & CC_EN:
            events.append(CcEvent.DISABLE)
        # CC.SHN going back to 0 needs no event: a shutdown clears CC, so no later write
        # sees SHN set in the old value (as nvmet_update_cc(), whose branch never runs)
        if new & CC_SHN_MASK and not old & CC_SHN_MASK:
            events.append(CcEvent.SHUTDOWN)
        for event in events:
            self._transition(event)

    def _config_ok(self) -> bool:
        """The CC fields nvmet_start_ctrl() checks: NVM command set, 4 KiB pages, round
        robin, and 64/16-byte I/O queue entries (discovery controllers have none)."""
        iosqes, iocqes = (self.cc >> 16) & 0xF, (self.cc >> 20) & 0xF
        mps, ams, css = (self.cc >> 7) & 0xF, (self.cc >> 11) & 0x7, (self.cc >> 4) & 0x7
        io_ok = self.subsys.is_discovery or (iosqes == 6 and iocqes == 4)
        return io_ok and not (mps or ams or css)

    def _transition(self, event: CcEvent) -> None:
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:  # the event cannot happen in this state (FATAL takes none)
            return
        _ACTIONS[event](self)
        if nxt is not self.state:
            self.state, self.state_since = nxt, self.target.clock.now()

    def _start(self) -> None:
        self.csts = CSTS_RDY  # assigned, as the kernel does: a stale CFS or SHST goes
        self.last_seen = self.target.clock.now()

    def _refuse_config(self) -> None:
        self.csts = CSTS_CFS  # an invalid configuration is a controller fatal status

    def _clear(self) -> None:
        self.csts &= ~CSTS_RDY
        self.cc = 0

    def _shutdown(self) -> None:
        self._clear()
        self.csts |= CSTS_SHST_CMPLT  # nothing to flush first: completes at once

    def _fatal(self) -> None:
        self.csts |= CSTS_CFS

    @property
    def ready(self) -> bool:
        return self.state is CtrlState.READY

    # -- keep-alive -------------------------------------------------------------
    def touch(self) -> None:
        """Traffic-based keep-alive: any command proves the host is alive."""
        self.last_seen = self.target.clock.now()

    def kato_expired(self, now: float) -> bool:
        return bool(self.kato) and not self.dead and now - self.last_seen > self.kato

    def fatal_error(self, why: str) -> None:
        """Controller fatal status and teardown of every queue (keep-alive expiry)."""
        if self.dead:
            return
        logfmt.warning(log, "ctrl_fatal", cntlid=self.cntlid, hostnqn=self.hostnqn,
                       subnqn=self.subsys.nqn, reason=why)
        self._transition(CcEvent.FATAL)
        self.delete()

    def delete(self) -> None:
        """End the association: every transport tears this controller's queues down."""
        if self.dead:
            return
        self.dead = True
        transports = {id(sq.ops): sq.ops for sq in self.sqs.values()} or {id(self.ops): self.ops}
        for ops in transports.values():
            ops.delete_ctrl(self)
        self.target.remove_ctrl(self)

    # -- queues ---------------------------------------------------------------
    def sq_destroyed(self, sq: SQ) -> None:
        if self.sqs.get(sq.qid) is sq:
            del self.sqs[sq.qid]
        if sq.qid == 0:
            self.fail_aers()
            if self.sqs and not self.dead:
                # the admin queue is gone: the association is over for its I/O queues too
                self.dead = True
                for ops in {id(s.ops): s.ops for s in self.sqs.values()}.values():
                    ops.delete_ctrl(self)
            self.target.remove_ctrl(self)

    # -- P2P memory ---------------------------------------------------------------
    def p2p_choice(self, ns: Ns) -> P2PChoice:
        """The P2P decision for this controller's I/O to `ns`, asked of the policy once
        (and again once its provider has been closed, or the backend can no longer use
        its memory: a block device that fell back to buffered I/O) and logged when made."""
        choice = self.p2p_ns_map.get(ns.nsid)
        dev = choice.p2p_dev if choice is not None else None
        if choice is None or dev is not None and (
                dev.closed or dev.kind not in ns.backend.p2p_kinds):
            choice = self.p2p_ns_map[ns.nsid] = self.target.p2p.decide(self, ns)
            # the decision's fields, its explain text among them (as in the RPC status)
            logfmt.info(p2pmem.log, "p2p_decision", cntlid=self.cntlid, hostnqn=self.hostnqn,
                        **choice.to_json())
        return choice

    # -- asynchronous events --------------------------------------------------
    def queue_aer(self, req: Request) -> int:
        if len(self.aer_reqs) >= NVMET_ASYNC_EVENTS:
            return Status.ASYNC_LIMIT
        self.aer_reqs.append(req)
        self._deliver_events()
        return 0

    def add_event(self, event_type: int, info: int, log_page: int) -> None:
        self.pending_events.append(event_type | info << 8 | log_page << 16)
        self._deliver_events()

    def _deliver_events(self) -> None:
        while self.aer_reqs and self.pending_events:
            self.aer_reqs.popleft().complete(0, self.pending_events.popleft())

    def fail_aers(self) -> None:
        while self.aer_reqs:
            self.aer_reqs.popleft().complete(Status.ABORT_REQ)

    def ns_changed(self, nsid: int) -> None:
        # as nvmet_add_to_changed_ns_log(): once more than 1024 changed, the list is the
        # single entry 0xFFFFFFFF until the host reads it
        if self.changed_ns != [0xFFFFFFFF] and nsid not in self.changed_ns:
            if len(self.changed_ns) < NVME_MAX_CHANGED_NAMESPACES:
                self.changed_ns.append(nsid)
            else:
                self.changed_ns = [0xFFFFFFFF]
        if self.aen_enabled & AEN_CFG_NS_ATTR and not self.aen_masked & AEN_CFG_NS_ATTR:
            self.aen_masked |= AEN_CFG_NS_ATTR  # one event until the host reads log 0x04
            self.add_event(AER_TYPE_NOTICE, AER_NOTICE_NS_CHANGED, LOG_CHANGED_NS)

    def disc_changed(self) -> None:
        if self.aen_enabled & AEN_CFG_DISC_CHANGE and not self.aen_masked & AEN_CFG_DISC_CHANGE:
            self.aen_masked |= AEN_CFG_DISC_CHANGE
            self.add_event(AER_TYPE_NOTICE, AER_NOTICE_DISC_CHANGED, LOG_DISC)

    def log_read(self, lid: int, rae: bool) -> None:
        """Reading a log page clears its event mask unless the host asked to retain it."""
        if rae:
            return
        if lid == LOG_CHANGED_NS:
            self.aen_masked &= ~AEN_CFG_NS_ATTR
            self.changed_ns = []
        elif lid == LOG_DISC:
            self.aen_masked &= ~AEN_CFG_DISC_CHANGE

    # -- error log --------------------------------------------------------------
    def log_error(self, req: Request) -> None:
        self.err_counter += 1
        cmd = req.cmd
        self.errors.appendleft({
            "error_count": self.err_counter,
            "sqid": req.sq.qid,
            "cmdid": cmd.cid if cmd else 0xFFFF,
            "status_field": req.cqe.status << 1,  # bits 15:1, as in a CQE (bit 0: phase)
            "param_error_location": req.error_loc,
            "nsid": cmd.nsid if cmd else 0,
        })

    def describe(self) -> dict:
        return {"cntlid": self.cntlid, "subsys": self.subsys.nqn, "hostnqn": self.hostnqn,
                "portid": self.port.portid, "kato": self.kato,
                "ready": self.ready, "state": self.state.name.lower(),
                "queues": sorted(self.sqs)}


# What each event does to the registers, whatever the state (nvmet_update_cc's helpers).
_ACTIONS: dict[CcEvent, Callable[[Ctrl], None]] = {
    CcEvent.ENABLE: Ctrl._start,
    CcEvent.ENABLE_INVALID: Ctrl._refuse_config,
    CcEvent.DISABLE: Ctrl._clear,
    CcEvent.SHUTDOWN: Ctrl._shutdown,
    CcEvent.FATAL: Ctrl._fatal,
}
