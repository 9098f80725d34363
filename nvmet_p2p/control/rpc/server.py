"""The control socket's server: JSON-RPC 2.0 over a Unix socket on the daemon's loop.

Requests and responses are one JSON document per line (batches are JSON arrays).  A
client can only hurt itself, and every limit is checked before a request runs:
  * a line is at most MAX_LINE bytes and must be finished within LINE_TIMEOUT_S of its
    first byte; a connection idle for IDLE_TIMEOUT_S is closed;
  * JSON is parsed within the limits of `jsonfile.parse_json` (nesting, number size);
  * a batch has at most MAX_BATCH requests;
  * at MAX_CLIENTS connections a new one evicts the connection idle the longest (one
    not running a request), so stalled clients never lock an operator out.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
import stat
from typing import Any

from nvmet_p2p import logfmt
from nvmet_p2p.config.jsonfile import parse_json
from nvmet_p2p.control.rpc.errors import (
    BUSY,
    CONFIG_ERROR,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    TARGET_ERROR,
    RpcError,
)
from nvmet_p2p.control.rpc.methods import METHODS, Methods
from nvmet_p2p.control.rpc.params import bind
from nvmet_p2p.errors import ConfigError, NvmetError

log = logging.getLogger("nvmet_p2p.rpc")

MAX_LINE = 1 << 20  # one request line; a full nvmetcli config of thousands of objects fits
MAX_CLIENTS = 64  # connections at once; the next one evicts the longest idle
MAX_BATCH = 1024  # requests in one batch
LINE_TIMEOUT_S = 10.0  # from a line's first byte to its newline
IDLE_TIMEOUT_S = 600.0  # a shell left open for ten minutes reconnects on its next command
READ_CHUNK = 1 << 16


class _Conn:
    """One client connection: what eviction needs to know about it."""

    def __init__(self, writer: asyncio.StreamWriter, now: float) -> None:
        self.writer = writer
        self.last = now  # the last complete request or answer
        self.busy = False  # running a request: never evicted mid-request


class RpcServer:
    """JSON-RPC 2.0 on a Unix socket (mode 0600), served on the daemon's event loop."""

    def __init__(self, daemon: Any, path: str) -> None:
        self.path = path
        self.methods = Methods(daemon)
        self._server: asyncio.AbstractServer | None = None
        self._clients: dict[asyncio.Task, _Conn] = {}
        self._inode: int | None = None

    async def start(self) -> None:
        sock = listen_socket(self.path)
        self._inode = os.stat(self.path).st_ino
        self._server = await asyncio.start_unix_server(self._serve_client, sock=sock,
                                                       limit=MAX_LINE)
        logfmt.info(log, "rpc_listening", socket=self.path, protocol="JSON-RPC 2.0")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:  # still ours, not a successor's
                os.unlink(self.path)

    def _make_room(self) -> bool:
        """At the limit, close the connection idle the longest; False if all are busy."""
        idle = [(c.last, t) for t, c in self._clients.items() if not c.busy]
        if not idle:
            return False
        _, task = min(idle, key=lambda x: x[0])
        logfmt.warning(log, "rpc_client_evicted", clients=len(self._clients),
                       reason="connection limit; the one idle longest is closed")
        task.cancel()
        return True

    async def _serve_client(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        if len(self._clients) >= MAX_CLIENTS and not self._make_room():
            with contextlib.suppress(Exception):
                await _send(writer, _error(None, RpcError(
                    BUSY, f"too many control connections (limit {MAX_CLIENTS}), all "
                    "running requests; retry later")))
            writer.close()
            return
        conn = self._clients[task] = _Conn(writer, loop.time())
        try:
            await self._read_lines(reader, writer, conn)
        except (ConnectionError, asyncio.CancelledError, TimeoutError):
            pass
        finally:
            self._clients.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_lines(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        buf = bytearray()
        started = 0.0  # when the unfinished line in buf began
        while True:
            if buf:
                timeout = started + LINE_TIMEOUT_S - loop.time()
            else:
                timeout = conn.last + IDLE_TIMEOUT_S - loop.time()
            try:
                chunk = await asyncio.wait_for(reader.read(READ_CHUNK), max(timeout, 0))
            except TimeoutError:
                if buf:
                    await _send(writer, _error(None, RpcError(
                        PARSE_ERROR, f"request line not finished within {LINE_TIMEOUT_S:g} "
                        "s; closing the connection")))
                return
            if not chunk:  # EOF: a last request without a newline still counts
                if buf.strip():
                    await self._answer(writer, conn, bytes(buf))
                return
            if not buf:
                started = loop.time()
            buf += chunk
            while (end := buf.find(b"\n")) >= 0:
                line = bytes(buf[:end])
                del buf[:end + 1]
                started = loop.time()
                if line.strip():
                    await self._answer(writer, conn, line)
            if len(buf) > MAX_LINE:
                await _send(writer, _error(None, RpcError(
                    PARSE_ERROR, f"request line longer than {MAX_LINE} bytes; closing the "
                    "connection")))
                return

    async def _answer(self, writer: asyncio.StreamWriter, conn: _Conn, line: bytes) -> None:
        conn.busy = True
        try:
            response = await self.handle(line)
            if response is not None:
                await _send(writer, response)
        finally:
            conn.busy = False
            conn.last = asyncio.get_running_loop().time()

    async def handle(self, line: bytes) -> Any:
        """One request line -> the response document (None for notifications only)."""
        try:
            doc = parse_json(line, "request")
        except ConfigError as e:
            return _error(None, RpcError(PARSE_ERROR, f"parse error: {e}"))
        if isinstance(doc, list):
            if not doc:
                return _error(None, RpcError(INVALID_REQUEST, "invalid request: empty batch"))
            if len(doc) > MAX_BATCH:
                return _error(None, RpcError(INVALID_REQUEST, f"invalid request: a batch of "
                                             f"{len(doc)}; at most {MAX_BATCH}"))
            out = [r for r in [await self._one(d) for d in doc] if r is not None]
            return out or None
        return await self._one(doc)

    async def _one(self, req: Any) -> dict | None:
        rid = req.get("id") if isinstance(req, dict) else None
        if not isinstance(rid, (str, int, type(None))) or isinstance(rid, bool):
            return _error(None, RpcError(INVALID_REQUEST, "invalid request: id must be a "
                                         "string, an integer or null"))
        result: Any = None
        error: RpcError | None
        try:
            method = _check_request(req)
        except RpcError as e:
            if e.code == INVALID_REQUEST:
                return _error(rid, e)
            error = e
        else:
            result, error = await self.call(method, req.get("params"))
        if "id" not in req:  # a notification: never answered, as the spec requires
            if error is not None:
                logfmt.warning(log, "rpc_notification_failed", method=req.get("method"),
                               reason=error.message)
            return None
        if error is not None:
            return _error(rid, error)
        return {"jsonrpc": "2.0", "id": rid, "result": result}

    async def call(self, method: str, params: Any) -> tuple[Any, RpcError | None]:
        """Run one method; its result (JSON-safe) or the error to answer with.

        A method that changes something runs in one transaction: whatever it raises,
        the tree is back as it was before the answer goes out.
        """
        entry = METHODS[method]
        root = self.methods.root
        try:
            kwargs = bind(method, entry.params, params)
            fn = getattr(self.methods, entry.attr)
            if entry.mutates:
                with root.transaction():
                    result = fn(**kwargs)
            else:
                result = fn(**kwargs)
            if inspect.isawaitable(result):
                result = await result
            return json.loads(json.dumps(result, default=str)), None  # fail here, not mid-send
        except RpcError as e:
            return None, e
        except ConfigError as e:
            return None, RpcError(CONFIG_ERROR, str(e))
        except NvmetError as e:
            return None, RpcError(TARGET_ERROR, str(e))
        except Exception as e:
            log.exception("%s", logfmt.line("event", "rpc_internal_error", {
                "method": method, "reason": "the configuration is unchanged"}))
            return None, RpcError(INTERNAL_ERROR, f"internal error: {type(e).__name__}: {e}; "
                                  "the configuration is unchanged; see the nvmet-p2p log")


def _check_request(req: Any) -> str:
    if not isinstance(req, dict):
        raise RpcError(INVALID_REQUEST, "invalid request: expected a JSON object with "
                       "jsonrpc, method, params, id")
    if req.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, "invalid request: \"jsonrpc\" must be \"2.0\"")
    method = req.get("method")
    if not isinstance(method, str):
        raise RpcError(INVALID_REQUEST, "invalid request: \"method\" must be a string")
    if method not in METHODS:
        raise RpcError(METHOD_NOT_FOUND, f"unknown method {method!r}; valid methods: "
                       f"{', '.join(METHODS)}", {"methods": list(METHODS)})
    return method


def _error(rid: Any, e: RpcError) -> dict:
    return {"jsonrpc": "2.0", "id": rid, "error": e.to_json()}


async def _send(writer: asyncio.StreamWriter, doc: Any) -> None:
    writer.write(json.dumps(doc).encode() + b"\n")
    await writer.drain()


def listen_socket(path: str) -> socket.socket:
    """A bound Unix socket at `path` with mode 0600, not yet listening.

    chmod happens between bind and listen: until listen() nobody can connect, so no
    other user ever reaches the socket while it has the umask's mode.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{path} exists and is not a socket; remove it or choose "
                              "another --rpc-socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # left behind by a process that died
        else:
            raise ConfigError(f"another process is serving on {path}; stop it or choose "
                              "another --rpc-socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot create the control socket {path}: {e.strerror}") from e
    sock.setblocking(False)
    return sock
