"""JSON-RPC 2.0 error codes and the error type both ends use."""

from __future__ import annotations

from typing import Any

from nvmet_p2p.errors import NvmetError

# JSON-RPC 2.0 error codes (spec section 5.1) and ours (-32000..-32099 are ours to assign).
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
CONFIG_ERROR = -32000  # the configuration tree refused; the message says what to do
TARGET_ERROR = -32001  # another nvmet-p2p error (backend, transport, P2P)
NOT_AVAILABLE = -32002  # the feature is not part of this build
BUSY = -32003  # too many clients connected


class RpcError(NvmetError):
    """A JSON-RPC error object, raised by handlers (server) or returned by calls (client)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


class RpcUnreachable(NvmetError):
    """The control socket could not be reached, or the daemon went away mid-call."""


def bad_param(field: str, problem: str) -> RpcError:
    return RpcError(INVALID_PARAMS, f"invalid params: {field!r} {problem}", {"field": field})
