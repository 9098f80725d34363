"""Peer-to-peer DMA: which memory a request's data uses, and why.

`topology` evaluates the kernel's PCI P2P rules on a sysfs tree (distance, ACS, host
bridges); `policy` decides per (port, namespace) and per request, with fallback to
system memory and the reason; `cli` is `nvmet-p2p p2p ...`.  The memory itself (the
providers and their allocator) is `nvmet_p2p.cmb`.
"""
