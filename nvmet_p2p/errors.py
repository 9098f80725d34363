"""The project's error hierarchy.

Errors caused by a peer (a host sending something malformed) and errors caused by
us or our environment are different types.  NVMe status codes stay values inside
the protocol layers; these exceptions exist at API edges (config, CLI, RPC, setup).
"""


class NvmetError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(NvmetError):
    """A configuration value, file or tree operation was refused; the text says why."""


class BackendError(NvmetError):
    """A namespace backend could not be opened or used."""


class TransportError(NvmetError):
    """A transport could not set up or keep a port, queue or resource."""


class PeerError(NvmetError):
    """The remote side broke the protocol (not our bug, not the operator's)."""


class P2PError(NvmetError):
    """P2P memory could not be found, mapped, registered or used."""


class VMError(NvmetError):
    """The soft-RoCE test VM could not be booted or driven."""
