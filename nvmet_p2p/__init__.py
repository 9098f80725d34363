"""nvmet-p2p: a userspace NVMe-over-Fabrics target with peer-to-peer copy offload."""

from importlib import metadata

try:
    __version__ = metadata.version("nvmet-p2p")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.1.0"
