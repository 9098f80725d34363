"""The protocol engine, as the kernel's `drivers/nvme/target/core.c` and friends.

Subsystems, controllers, queues and requests; command parse and execute for fabrics,
admin and I/O commands; discovery, keep-alive, asynchronous events, access control.
It talks to transports through `transport.TransportOps` and to namespace backends
through `nvmet_p2p.backends.Backend`, and imports no transport.
"""
