"""The transport layer: how capsules and data reach the core.

`loop` is the in-process transport for unit tests and fuzzing; the RDMA transport
itself is `nvmet_p2p.rdma` (the design card's module), built on the pyverbs helpers
here: `rdma_cm` (the connection manager through librdmacm), `rdma_verbs` (devices,
queue pairs, registered buffers) and `rdma_mr` (registering P2P providers' memory).
Transports move data and decide no NVMe semantics.
"""
