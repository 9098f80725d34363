"""The contract between the core and a transport: one small ops table.

A transport (loop, rdma, later tcp) implements `TransportOps` and registers it with
the `Target`.  The core never imports a transport; a transport never decides NVMe
semantics.  The life of one command, seen from a transport:

    sq = target.create_sq(port, ops, qid=..., size=..., priv=...)   # per NVMe queue
    req = sq.new_request(capsule)      # capsule = 64-byte SQE (+ in-capsule data)
    if req.init():                     # parse; False -> the core already completed it
        # req.transfer_len and req.data_dir now say what data moves.
        # The transport checks the SGL against them (core.sgl.map_sgl does the
        # common rules) and attaches the data buffer through the core:
        #   req.use_in_capsule_data(view)          data that came in the capsule, or
        #   req.alloc_data_buffer(n, pool)         data it moves itself: P2P memory
        #                                          first, else system memory (False:
        #                                          pool exhausted, try again later)
        # then fetches host data into req.buf for DataDir.TO_CTRL, and:
        req.execute()
    # ... later, always exactly once per request:
    ops.queue_response(req)            # req.cqe is final; for DataDir.FROM_CTRL with
                                       # success, req.buf holds the data to send first
    req.free_data_buffer()             # once the data is on its way
    sq.destroy()                       # when the connection goes away

A buffer from a P2P provider (`req.p2p_dev` is set) is BAR memory: the CPU touches it
only with its provider's access rules (`cmb.copy_into` / `cmb.copy_from`), and a DMA
device only if it can address it, which the P2P policy asks before it chooses the
provider (`p2p_client`, `p2p_can_register`).

A transport that fails a request itself (bad SGL, RDMA READ error) calls
`req.complete(status)`, which also ends in `queue_response`.  A request whose queue
goes away before it executed (its data never arrived) is dropped with `req.uninit()`.
`queue_response` may be called from inside `init()` or `execute()` (synchronous
backends): transports must cope with that re-entrancy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from nvmet_p2p.cmb import Provider
    from nvmet_p2p.configfs import Port
    from nvmet_p2p.core.ctrl import Ctrl
    from nvmet_p2p.core.request import Request


class TransportOps(Protocol):
    trtype: str  # configfs addr_trtype: "rdma", "tcp", "loop"
    keyed_sgls: bool  # advertise SGLS bit 2 and accept keyed descriptors
    msdbd: int  # maximum SGL data block descriptors per command (1 here)

    def add_port(self, port: Port) -> None:
        """Start listening on `port` (its first subsystem was linked). Raise on failure."""

    def remove_port(self, port: Port) -> None:
        """Stop listening; existing queues may live on until they disconnect."""

    def queue_response(self, req: Request) -> None:
        """Send req.cqe (after req.buf for a successful host read)."""

    def delete_ctrl(self, ctrl: Ctrl) -> None:
        """Tear down every queue of `ctrl` (keep-alive expiry, shutdown)."""

    def p2p_client(self, port: Port) -> str | None:
        """The DMA device that moves `port`'s data (an RDMA device name or a PCI BDF),
        which the P2P provider must be reachable from; None when the CPU moves the data
        (loop), so only the namespace's device must reach the provider."""

    def p2p_can_register(self, provider: Provider) -> str | None:
        """Why this transport's DMA device cannot use `provider`'s memory (e.g. the RDMA
        device refused the MR), or None when it can."""

    def resources(self) -> dict[str, int]:
        """Counts of what the transport holds (queues, QPs, MRs...), for status and leaks."""

    def close(self) -> None:
        """Tear every queue and listener down and release everything; idempotent."""
