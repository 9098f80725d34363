"""The project's error hierarchy.

What a peer gets wrong (a host sending something malformed) is answered with an NVMe
status, a value inside the protocol layers, never an exception.  These exceptions are
errors of ours, the operator's or the environment's, raised at API edges (config,
CLI, RPC, setup).
"""


class NvmetError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(NvmetError):
    """A configuration value, file or tree operation was refused; the text says why."""


class BackendError(NvmetError):
    """A namespace backend could not be opened or used."""


class TransportError(NvmetError):
    """A transport could not set up or keep a port, queue or resource."""


class P2PError(NvmetError):
    """P2P memory could not be found, mapped, registered or used."""


class VMError(NvmetError):
    """The soft-RoCE test VM could not be booted or driven."""
