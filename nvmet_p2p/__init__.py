"""nvmet-p2p: a userspace NVMe-over-Fabrics target with peer-to-peer copy offload."""
