"""Peer-to-peer DMA: which memory a request's data uses, and why.

`topology` evaluates the kernel's PCI P2P rules on a sysfs tree (distance, ACS, host
bridges); `decision` makes the decision for one (port, namespace) from facts; `policy`
is the live policy a `Target` is composed with (the core asks it per controller and
namespace); `explain` prints the decisions of a running target or of a configuration
file; `netdev` finds the RDMA device behind a port's address.  The memory itself (the
providers and their allocator) is `nvmet_p2p.cmb`; the per-request allocation with
fallback is the core's (`Request.alloc_data_buffer`).
"""
