"""The control socket: JSON-RPC 2.0 over a Unix socket, its methods, and a client.

`errors` (codes, RpcError), `params` (declared parameters and their checks),
`methods` (the method table and implementations, each change in one transaction),
`server` (the socket, its limits and timeouts), `client` (the blocking client),
`cli` (`nvmet-p2p rpc`).  See docs/rpc.md.
"""

from nvmet_p2p.control.rpc.client import RpcClient
from nvmet_p2p.control.rpc.errors import (
    BUSY,
    CONFIG_ERROR,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NOT_AVAILABLE,
    PARSE_ERROR,
    TARGET_ERROR,
    RpcError,
    RpcUnreachable,
)
from nvmet_p2p.control.rpc.methods import METHODS, replace_config
from nvmet_p2p.control.rpc.server import MAX_CLIENTS, MAX_LINE, RpcServer

__all__ = ["BUSY", "CONFIG_ERROR", "INTERNAL_ERROR", "INVALID_PARAMS", "INVALID_REQUEST",
           "MAX_CLIENTS", "MAX_LINE", "METHODS", "METHOD_NOT_FOUND", "NOT_AVAILABLE",
           "PARSE_ERROR", "TARGET_ERROR", "RpcClient", "RpcError", "RpcServer",
           "RpcUnreachable", "replace_config"]
