"""The core's side of P2P memory: the policy interface and the words for per-request reasons.

As in the kernel target, the core owns the per-controller map from namespace to P2P
provider (`Ctrl.p2p_ns_map`, the kernel's ``ctrl->p2p_ns_map``) and a request's data
buffer (`Request.alloc_data_buffer`, the kernel's ``nvmet_req_alloc_sgls()``); which
provider a (controller, namespace) gets, and why, is the P2P policy's decision
(`nvmet_p2p.p2p.policy.P2PPolicy` implements `P2PPolicy`), handed to the `Target` by
whoever composes it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from nvmet_p2p.cmb import Provider
    from nvmet_p2p.core.ctrl import Ctrl
    from nvmet_p2p.core.subsys import Ns

# P2P decisions are logged here, by the core that asks for them: one logger to follow.
log = logging.getLogger("nvmet_p2p.p2p")

# Why a request's payload is in system memory although its (controller, namespace) may
# use P2P memory; every other reason is the decision's own.
REASON_EXHAUSTED = "P2P provider exhausted"
REASON_IN_CAPSULE = "in-capsule data"


class P2PChoice(Protocol):
    """One (controller, namespace)'s decision, as the core uses it."""

    @property
    def p2p_dev(self) -> Provider | None:
        """The provider to take data buffers from; None: system memory, see `reason`."""

    @property
    def reason(self) -> str:
        """Why this provider, or why system memory."""

    def text(self) -> str:
        """One line for the log: where, what and why."""

    def to_json(self) -> dict:
        """The decision for status output."""


class P2PPolicy(Protocol):
    def decide(self, ctrl: Ctrl, ns: Ns) -> P2PChoice:
        """The decision for `ctrl`'s I/O to `ns`.  The core asks once per (controller,
        namespace): at Connect, when the namespace is enabled, and again when the chosen
        provider has been closed."""

    def check_ns(self, ns: Ns, namespaces: Sequence[Ns]) -> str | None:
        """Why `ns` cannot be enabled with its p2pmem setting (as the kernel's
        nvmet_p2pmem_ns_enable()), or None; `namespaces` are all the enabled ones."""

    def providers(self, namespaces: Sequence[Ns]) -> list[dict]:
        """describe() of every P2P memory provider the policy may choose from, for status."""
