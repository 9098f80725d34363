"""The blocking JSON-RPC client the shell, the CLI and the tests use.

`RpcClient(path).call(method, **params)` answers the result or raises
`RpcError(code, message, data)`; a daemon that cannot be reached is `RpcUnreachable`
with a sentence saying what to start.  `wait_ready(seconds)` retries the first
connection, for a daemon started a moment earlier (as SPDK's rpc.py -t).
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from typing import Any, Self

from nvmet_p2p.control.rpc.errors import INTERNAL_ERROR, RpcError, RpcUnreachable

CLIENT_TIMEOUT_S = 60.0  # how long the client waits for one answer (save fsyncs)
MAX_ANSWER = 64 << 20  # the status of a huge target is still bounded
RETRY_S = 0.1


class RpcClient:
    """A blocking JSON-RPC client on one connection (made on first call, kept open)."""

    def __init__(self, path: str, timeout: float = CLIENT_TIMEOUT_S) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._ids = itertools.count(1)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buf = b""

    def wait_ready(self, seconds: float) -> None:
        """Connect, retrying for up to `seconds` while the socket is missing or refuses."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                self._connect()
                return
            except RpcUnreachable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(RETRY_S)

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except OSError as e:
                sock.close()
                raise RpcUnreachable(
                    f"cannot reach nvmet-p2p at {self.path}: {e.strerror or e} (is "
                    f"`nvmet-p2p serve --rpc-socket {self.path}` running?)") from e
            self._sock = sock
        return self._sock

    def call(self, method: str, **params: Any) -> Any:
        rid = next(self._ids)
        line = json.dumps({"jsonrpc": "2.0", "id": rid, "method": method,
                           "params": params}).encode() + b"\n"
        sock = self._connect()
        try:
            sock.sendall(line)
            while True:
                reply = json.loads(self._readline(sock))
                if isinstance(reply, dict) and reply.get("id") in (rid, None):
                    break
        except (OSError, ValueError) as e:
            self.close()
            raise RpcUnreachable(f"lost the connection to nvmet-p2p at {self.path}: "
                                 f"{e}") from e
        if "error" in reply:
            err = reply["error"]
            raise RpcError(err.get("code", INTERNAL_ERROR), err.get("message", "?"),
                           err.get("data"))
        return reply.get("result")

    def _readline(self, sock: socket.socket) -> bytes:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_ANSWER:
                raise ValueError("answer too long")
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line
