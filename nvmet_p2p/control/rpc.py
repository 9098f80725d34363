"""The control socket: JSON-RPC 2.0 over a Unix socket, its methods, and a small client.

`RpcServer` runs on the daemon's event loop.  Requests and responses are one JSON
document per line (newline-delimited; batches are JSON arrays).  Every change the
shell can make is one of the methods in METHODS, and each method is a thin call into
the configuration tree (`nvmet_p2p.configfs`), so the tree's rules and error texts
reach the client unchanged as application errors (code -32000).  A client can only
hurt itself: a line longer than MAX_LINE, malformed JSON or an abrupt disconnect
ends or answers that connection and nothing else.

`RpcClient(path).call(method, **params)` is the synchronous client the shell and
`nvmet-p2p rpc` use; failures are `RpcError(code, message, data)`, and a daemon that
cannot be reached is `RpcUnreachable` with a sentence saying what to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

from nvmet_p2p.config import jsonfile
from nvmet_p2p.configfs import (
    Port,
    Root,
    Subsystem,
    attr_choices,
    attr_groups,
    get_attr,
    list_attrs,
    lookup,
    set_attr,
)
from nvmet_p2p.errors import ConfigError, NvmetError

log = logging.getLogger("nvmet_p2p.rpc")

MAX_LINE = 1 << 20  # one request line; a full nvmetcli config of thousands of objects fits
MAX_CLIENTS = 64  # connections beyond this are answered with an error and closed
CLIENT_TIMEOUT_S = 60.0  # how long the client waits for one answer (save fsyncs)

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


def _bad_param(field: str, problem: str) -> RpcError:
    return RpcError(INVALID_PARAMS, f"invalid params: {field!r} {problem}", {"field": field})


# -- tree paths ------------------------------------------------------------------------

# What each position of a tree path is; "*" matches any name at that level.
_KINDS: dict[tuple[str, ...], str] = {
    (): "root",
    ("hosts",): "hosts",
    ("hosts", "*"): "host",
    ("subsystems",): "subsystems",
    ("subsystems", "*"): "subsystem",
    ("subsystems", "*", "namespaces"): "namespaces",
    ("subsystems", "*", "namespaces", "*"): "namespace",
    ("subsystems", "*", "allowed_hosts"): "allowed_hosts",
    ("subsystems", "*", "allowed_hosts", "*"): "allowed_host",
    ("ports",): "ports",
    ("ports", "*"): "port",
    ("ports", "*", "subsystems"): "port_subsystems",
    ("ports", "*", "subsystems", "*"): "port_subsystem",
    ("ports", "*", "referrals"): "referrals",
    ("ports", "*", "referrals", "*"): "referral",
}
_FIXED_NAMES = {"hosts", "subsystems", "namespaces", "allowed_hosts", "ports", "referrals"}


def split_path(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def path_kind(path: str) -> str:
    """The kind of tree node a path names, from its shape alone (see _KINDS)."""
    parts = split_path(path)
    for pattern, kind in _KINDS.items():
        if len(pattern) == len(parts) and all(p == "*" or p == q
                                              for p, q in zip(pattern, parts, strict=True)):
            return kind
    raise ConfigError(f"{path} is not a path of the nvmet tree: paths look like /hosts/<nqn>, "
                      "/subsystems/<nqn>/namespaces/<nsid>, /ports/<id>/subsystems/<nqn>")


def _join(*parts: Any) -> str:
    return "/" + "/".join(str(p).strip("/") for p in parts if str(p).strip("/"))


def _resolve(root: Root, path: str, *kinds: str) -> Any:
    kind = path_kind(path)
    if kinds and kind not in kinds:
        raise ConfigError(f"{path} is a {kind}; this needs a path to a "
                          f"{' or '.join(kinds)}")
    return lookup(root, path)


def _int_name(name: Any, what: str) -> int:
    if isinstance(name, int) and not isinstance(name, bool):
        return name
    if isinstance(name, str) and name.strip().isdigit():
        return int(name)
    raise ConfigError(f"{what} must be a number, not {name!r}")


def _port_of(root: Root, port: Any) -> Port:
    """A port by id (3 or "3") or by path ("/ports/3")."""
    if isinstance(port, str) and "/" in port:
        return _resolve(root, port, "port")
    portid = _int_name(port, "port id")
    found = root.ports.get(portid)
    if found is None:
        raise ConfigError(f"no port {portid}; existing: "
                          f"{', '.join(str(p) for p in root.ports) or '(none)'}")
    return found


def _subsys_of(root: Root, subsys: str) -> Subsystem:
    if "/" in subsys:
        return _resolve(root, subsys, "subsystem")
    found = root.subsystems.get(subsys)
    if found is None:
        raise ConfigError(f"no subsystem {subsys}; existing: "
                          f"{', '.join(root.subsystems) or '(none)'}")
    return found


def _text(value: Any) -> str:
    """An attribute value as the text a configfs file would be written with."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _ordered(attrs: dict[str, dict[str, Any]]) -> list[tuple[str, str, Any]]:
    """Flatten {group: {name: value}}, disabling first and enabling last.

    "enable" gates most other attributes, so a request that changes both works in one
    call whichever order the client wrote it in.
    """
    flat = [(g, n, v) for g, names in attrs.items() for n, v in names.items()]
    def rank(item: tuple[str, str, Any]) -> int:
        group, name, value = item
        if group == "" and name == "enable":
            return 2 if _text(value) not in ("0", "n", "no", "false", "off") else 0
        return 1
    return sorted(flat, key=rank)


def _set_all(obj: Any, attrs: dict[str, dict[str, Any]]) -> None:
    """Write every attribute or none: on a refusal, the ones already written go back."""
    done: list[tuple[str, str, str]] = []
    try:
        for group, name, value in _ordered(attrs):
            old = get_attr(obj, group, name)
            set_attr(obj, group, name, _text(value))
            done.append((group, name, old))
    except ConfigError:
        for group, name, old in reversed(done):
            try:
                set_attr(obj, group, name, old)
            except ConfigError as e:  # leave it, but say so: the tree is still valid
                log.warning("rpc: could not put %s_%s of %s back: %s", group, name,
                            obj.describe(), e)
        raise


# -- methods ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    name: str
    types: tuple[type, ...]
    what: str  # how the error message describes a valid value
    required: bool = True


_PATH = Param("path", (str,), "a tree path such as /subsystems/<nqn>/namespaces/1")
_ATTRS_WHAT = "an object {group: {name: value}}, e.g. {\"attr\": {\"allow_p2pmem\": \"1\"}}"
_VALUE_TYPES = (str, int, bool)


class Methods:
    """The method implementations; each takes validated keyword params."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    @property
    def root(self) -> Root:
        return self.daemon.target.root

    def list_children(self, path: str) -> dict:
        node = _resolve(self.root, path)
        parts = split_path(path)
        if isinstance(node, Root):
            names = ["hosts", "ports", "subsystems"]
        elif isinstance(node, Subsystem) and len(parts) == 2:
            names = ["allowed_hosts", "namespaces"]
        elif isinstance(node, Port):
            names = ["referrals", "subsystems"]
        elif hasattr(node, "items") and parts and parts[-1] in _FIXED_NAMES:
            names = [str(k) for k in node]
        else:
            names = []
        children = [{"name": n, "kind": path_kind(_join(path, n))} for n in names]
        return {"path": _join(path), "kind": path_kind(path), "children": children}

    def get(self, path: str, group: str | None = None, name: str | None = None) -> dict:
        obj = _resolve(self.root, path)
        if name is not None and group is None:
            raise _bad_param("group", "is needed with 'name' (use \"\" for enable, "
                             "buffered_io, p2pmem)")
        if not hasattr(obj, "ATTRS"):
            if group is not None:
                raise ConfigError(f"{path} has no attributes; it is a directory")
            return {}
        if group is None:
            return {g: list_attrs(obj, g) for g in attr_groups(obj)}
        if name is None:
            return {group: list_attrs(obj, group)}
        return {group: {name: get_attr(obj, group, name)}}

    def attr_choices(self, path: str, group: str, name: str) -> list[str] | None:
        obj = _resolve(self.root, path)
        if not hasattr(obj, "ATTRS"):
            raise ConfigError(f"{path} has no attributes; it is a directory")
        return attr_choices(obj, group, name)

    def set_attrs(self, path: str, group: str | None = None, name: str | None = None,
            value: Any = None, attrs: dict | None = None) -> dict:
        single = (group, name, value)
        if attrs is not None and any(x is not None for x in single):
            raise _bad_param("attrs", "cannot be combined with group/name/value; pass one form")
        if attrs is None:
            for field, x in zip(("group", "name", "value"), single, strict=True):
                if x is None:
                    raise _bad_param(field, "is missing (or pass attrs: {group: {name: "
                                     "value}} instead of group/name/value)")
            attrs = {str(group): {str(name): value}}
        _check_attrs(attrs)
        obj = _resolve(self.root, path)
        if not hasattr(obj, "ATTRS"):
            raise ConfigError(f"{path} has no attributes; it is a directory")
        _set_all(obj, attrs)
        return {g: {n: get_attr(obj, g, n) for n in names} for g, names in attrs.items()}

    def create(self, path: str, name: Any, attrs: dict | None = None) -> dict:
        if attrs is not None:
            _check_attrs(attrs)
        kind = path_kind(path)
        parent = _resolve(self.root, path, "hosts", "subsystems", "namespaces", "ports",
                          "referrals", "port_subsystems", "allowed_hosts")
        del parent  # resolved only to check that the parent exists
        parts = split_path(path)
        root = self.root
        made: Any
        undo: Callable[[], None]
        if kind == "hosts":
            made = root.create_host(str(name))
            undo = lambda: root.delete_host(made.nqn)
        elif kind == "subsystems":
            made = root.create_subsystem(str(name))
            undo = lambda: root.delete_subsystem(made.nqn)
        elif kind == "ports":
            made = root.create_port(_int_name(name, "port id"))
            undo = lambda: root.delete_port(made.portid)
        elif kind == "namespaces":
            subsys = root.subsystems[parts[1]]
            made = subsys.create_namespace(_int_name(name, "NSID"))
            undo = lambda: subsys.delete_namespace(made.nsid)
        elif kind == "referrals":
            port = _port_of(root, parts[1])
            made = port.create_referral(str(name))
            undo = lambda: port.delete_referral(made.name)
        elif kind == "port_subsystems":
            _port_of(root, parts[1]).link_subsystem(str(name))
            made = None
        else:  # allowed_hosts
            root.subsystems[parts[1]].add_allowed_host(str(name))
            made = None
        new_path = _join(path, name)
        if attrs:
            if made is None:
                raise _bad_param("attrs", f"does not apply to a link ({new_path})")
            try:
                _set_all(made, attrs)
            except ConfigError:
                undo()  # all or nothing: no half-configured object stays behind
                raise
        log.info("rpc: created %s", new_path)
        return {"path": new_path}

    def delete(self, path: str) -> dict:
        kind = path_kind(path)
        obj = _resolve(self.root, path, "host", "subsystem", "namespace", "port", "referral",
                       "port_subsystem", "allowed_host")
        parts = split_path(path)
        root = self.root
        if kind == "host":
            root.delete_host(obj.nqn)
        elif kind == "subsystem":
            root.delete_subsystem(obj.nqn)
        elif kind == "namespace":
            obj.subsys.delete_namespace(obj.nsid)
        elif kind == "port":
            root.delete_port(obj.portid)
        elif kind == "referral":
            obj.port.delete_referral(obj.name)
        elif kind == "port_subsystem":
            _port_of(root, parts[1]).unlink_subsystem(parts[3])
        else:  # allowed_host
            root.subsystems[parts[1]].remove_allowed_host(parts[3])
        log.info("rpc: deleted %s", _join(path))
        return {"deleted": _join(path)}

    def link(self, port: Any, subsystem: str) -> dict:
        p = _port_of(self.root, port)
        nqn = _subsys_of(self.root, subsystem).nqn
        p.link_subsystem(nqn)
        log.info("rpc: linked %s to port %d", nqn, p.portid)
        return {"path": _join("ports", p.portid, "subsystems", nqn)}

    def unlink(self, port: Any, subsystem: str) -> dict:
        p = _port_of(self.root, port)
        nqn = subsystem.rstrip("/").rsplit("/", 1)[-1]
        p.unlink_subsystem(nqn)
        log.info("rpc: unlinked %s from port %d", nqn, p.portid)
        return {"deleted": _join("ports", p.portid, "subsystems", nqn)}

    def allow_host(self, subsystem: str, host: str) -> dict:
        s = _subsys_of(self.root, subsystem)
        s.add_allowed_host(host)
        log.info("rpc: %s allows %s", s.nqn, host)
        return {"path": _join("subsystems", s.nqn, "allowed_hosts", host)}

    def disallow_host(self, subsystem: str, host: str) -> dict:
        s = _subsys_of(self.root, subsystem)
        s.remove_allowed_host(host)
        log.info("rpc: %s no longer allows %s", s.nqn, host)
        return {"deleted": _join("subsystems", s.nqn, "allowed_hosts", host)}

    def _enable(self, path: str, on: bool) -> dict:
        obj = _resolve(self.root, path, "namespace", "referral")
        obj.enable = on
        log.info("rpc: %s %s", "enabled" if on else "disabled", obj.describe())
        return {"path": _join(path), "enable": get_attr(obj, "", "enable")}

    def enable(self, path: str) -> dict:
        return self._enable(path, True)

    def disable(self, path: str) -> dict:
        return self._enable(path, False)

    async def save_config(self, path: str | None = None) -> dict:
        path = path or self.daemon.config_path
        if not path:
            raise _bad_param("path", "is missing and the daemon was started without --config; "
                             "pass the file to write")
        doc = self.root.to_dict()  # on the loop: the tree is only touched here
        await asyncio.get_running_loop().run_in_executor(None, jsonfile.save_doc, path, doc)
        log.info("rpc: configuration saved to %s", path)
        return {"path": path}

    def load_config(self, path: str | None = None, doc: dict | None = None,
                    replace: bool = False) -> dict:
        if (path is None) == (doc is None):
            raise _bad_param("path", "or 'doc' is needed, exactly one of them (a file the "
                             "daemon can read, or the nvmetcli JSON itself)")
        source = path if path is not None else "<doc>"
        doc = jsonfile.read_doc(path) if path is not None else doc
        assert doc is not None
        root = self.root
        if not root.is_empty() and not replace:
            raise ConfigError("the target already has a configuration; pass replace: true to "
                              "replace it, or call clear_config first")
        previous = root.to_dict()
        root.clear()
        errors = root.restore(doc, source=source, on_error=lambda msg: None)
        if errors:
            root.clear()  # nothing half-loaded stays live: back to what was there
            lost = root.restore(previous, source="<previous configuration>",
                                on_error=lambda msg: None)
            for msg in lost:
                log.error("rpc: restoring the previous configuration: %s", msg)
            raise RpcError(CONFIG_ERROR, f"{len(errors)} error(s) in {source}; nothing was "
                           "loaded:\n" + "\n".join(errors), {"errors": errors})
        log.info("rpc: configuration loaded from %s", source)
        return {"hosts": len(root.hosts), "subsystems": len(root.subsystems),
                "ports": len(root.ports)}

    def clear_config(self) -> dict:
        self.root.clear()
        log.info("rpc: configuration cleared")
        return {"cleared": True}

    def status(self) -> dict:
        return self.daemon.target.status()

    def p2p_explain(self, path: str | None = None) -> list[dict]:
        # imported here: the shell's RpcClient lives in this module and needs none of P2P
        from nvmet_p2p.p2p.explain import explain

        result = explain(self.daemon.target, self.daemon.p2p)
        if path is None:
            return result
        return [e for e in result if _explains(e, path)]


def _explains(entry: Any, path: str) -> bool:
    """Whether an explain entry ({"portid", "subnqn", "nsid", ...}) concerns `path`."""
    if not isinstance(entry, dict):
        return True
    parts = split_path(path)
    kind = path_kind(path)
    if kind == "port":
        return str(entry.get("portid")) == parts[1]
    nqn = entry.get("subnqn", entry.get("nqn"))
    if kind == "subsystem":
        return nqn == parts[1]
    if kind == "namespace":
        return nqn == parts[1] and str(entry.get("nsid")) == parts[3]
    return True


def _check_attrs(attrs: Any) -> None:
    if not isinstance(attrs, dict):
        raise _bad_param("attrs", f"must be {_ATTRS_WHAT}")
    for group, names in attrs.items():
        if not isinstance(names, dict):
            raise _bad_param("attrs", f"group {group!r} must map names to values: "
                             f"{_ATTRS_WHAT}")
        for name, value in names.items():
            if not isinstance(value, _VALUE_TYPES):
                raise _bad_param("attrs", f"value of {group}.{name} must be a string, "
                                 f"number or boolean, not {type(value).__name__}")


_SUBSYS_P = Param("subsystem", (str,), "a subsystem NQN")
_PORT_P = Param("port", (int, str), "a port id or a path /ports/<id>")

METHODS: dict[str, tuple[str, tuple[Param, ...], str]] = {
    # name: (Methods attribute, params, one-line help)
    "list": ("list_children", (_PATH,), "children of a tree node"),
    "get": ("get", (_PATH, Param("group", (str,), "an attribute group", False),
                    Param("name", (str,), "an attribute name", False)),
            "attribute values of a node, as {group: {name: value}}"),
    "attr_choices": ("attr_choices", (_PATH, Param("group", (str,), "an attribute group"),
                                      Param("name", (str,), "an attribute name")),
                     "the enumerated values of an attribute, or null"),
    "set": ("set_attrs", (_PATH, Param("group", (str,), "an attribute group", False),
                    Param("name", (str,), "an attribute name", False),
                    Param("value", _VALUE_TYPES, "a string, number or boolean", False),
                    Param("attrs", (dict,), _ATTRS_WHAT, False)),
            "write one attribute or several, all or nothing"),
    "create": ("create", (Param("path", (str,), "the parent directory, e.g. /subsystems"),
                          Param("name", (str, int), "the new object's NQN, id or name"),
                          Param("attrs", (dict,), _ATTRS_WHAT, False)),
               "create an object (or a link) under a directory"),
    "delete": ("delete", (_PATH,), "delete an object or remove a link"),
    "link": ("link", (_PORT_P, _SUBSYS_P), "export a subsystem through a port"),
    "unlink": ("unlink", (_PORT_P, _SUBSYS_P), "stop exporting a subsystem through a port"),
    "allow_host": ("allow_host", (_SUBSYS_P, Param("host", (str,), "a host NQN")),
                   "add a host to a subsystem's allowed_hosts"),
    "disallow_host": ("disallow_host", (_SUBSYS_P, Param("host", (str,), "a host NQN")),
                      "remove a host from a subsystem's allowed_hosts"),
    "enable": ("enable", (_PATH,), "enable a namespace or referral"),
    "disable": ("disable", (_PATH,), "disable a namespace or referral"),
    "save_config": ("save_config", (Param("path", (str,), "a file path", False),),
                    "write the configuration as nvmetcli JSON, atomically"),
    "load_config": ("load_config", (Param("path", (str,), "a file path", False),
                                    Param("doc", (dict,), "an nvmetcli JSON object", False),
                                    Param("replace", (bool,), "true or false", False)),
                    "restore a configuration; all or nothing, every error reported"),
    "clear_config": ("clear_config", (), "delete the whole configuration"),
    "status": ("status", (), "controllers, namespaces with I/O counters, ports, P2P"),
    "p2p_explain": ("p2p_explain", (Param("path", (str,), "a port or namespace path",
                                          False),),
                    "the P2P decision and its reason per (port, namespace)"),
}


def _bind(method: str, params: Any) -> dict:
    """Check params against the method's table; the error names the field and the fix."""
    _, spec, _ = METHODS[method]
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, "invalid params: pass params as an object of named "
                       f"values, e.g. {{\"path\": \"/\"}} (not {type(params).__name__})",
                       {"field": None})
    names = {p.name for p in spec}
    for key in params:
        if key not in names:
            raise _bad_param(key, f"is not a param of {method}; valid: "
                             f"{', '.join(p.name for p in spec) or '(none)'}")
    params = {k: v for k, v in params.items()  # null is "not given" for optional params
              if v is not None or any(p.name == k and p.required for p in spec)}
    for p in spec:
        if p.name not in params:
            if p.required:
                raise _bad_param(p.name, f"is missing: {method} needs {p.what}")
            continue
        value = params[p.name]
        ok = isinstance(value, p.types) and not (isinstance(value, bool) and
                                                 bool not in p.types and int in p.types)
        if not ok:
            raise _bad_param(p.name, f"must be {p.what}, not {json.dumps(value)[:60]}")
    return dict(params)


# -- the server --------------------------------------------------------------------------

class RpcServer:
    """JSON-RPC 2.0 on a Unix socket (mode 0600), served on the daemon's event loop."""

    def __init__(self, daemon: Any, path: str) -> None:
        self.path = path
        self.methods = Methods(daemon)
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task] = set()
        self._inode: int | None = None

    async def start(self) -> None:
        sock = _listen_socket(self.path)
        self._inode = os.stat(self.path).st_ino
        self._server = await asyncio.start_unix_server(self._serve_client, sock=sock,
                                                       limit=MAX_LINE)
        log.info("control socket %s (JSON-RPC 2.0)", self.path)

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

    async def _serve_client(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            if len(self._clients) > MAX_CLIENTS:
                await _send(writer, _error(None, RpcError(
                    BUSY, f"too many control connections (limit {MAX_CLIENTS}); retry later")))
                return
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as e:
                    line = e.partial  # EOF: a last request without a newline still counts
                    if not line.strip():
                        return
                except asyncio.LimitOverrunError:
                    await _send(writer, _error(None, RpcError(
                        PARSE_ERROR, f"request line longer than {MAX_LINE} bytes; closing "
                        "the connection")))
                    return
                if not line.strip():
                    continue
                response = await self.handle(line)
                if response is not None:
                    await _send(writer, response)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def handle(self, line: bytes) -> Any:
        """One request line -> the response document (None for notifications only)."""
        try:
            doc = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return _error(None, RpcError(PARSE_ERROR, f"parse error: not valid JSON: {e}"))
        if isinstance(doc, list):
            if not doc:
                return _error(None, RpcError(INVALID_REQUEST, "invalid request: empty batch"))
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
            result, error = await self._call(method, req.get("params"))
        if "id" not in req:  # a notification: never answered, as the spec requires
            if error is not None:
                log.warning("rpc: notification %s failed: %s", req.get("method"), error)
            return None
        if error is not None:
            return _error(rid, error)
        return {"jsonrpc": "2.0", "id": rid, "result": result}

    async def _call(self, method: str, params: Any) -> tuple[Any, RpcError | None]:
        """Run one method; its result (JSON-safe) or the error to answer with."""
        try:
            fn = getattr(self.methods, METHODS[method][0])
            result = fn(**_bind(method, params))
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
            log.exception("rpc: %s failed", method)
            return None, RpcError(INTERNAL_ERROR, f"internal error: {type(e).__name__}: {e}; "
                                  "see the nvmet-p2p log")


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


def _listen_socket(path: str) -> socket.socket:
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


# -- the client ---------------------------------------------------------------------------

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
            if len(self._buf) > 64 * MAX_LINE:  # status of a huge target is still bounded
                raise ValueError("answer too long")
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line


def cli_call(path: str, method: str, params_json: str | None) -> int:
    """`nvmet-p2p rpc METHOD [JSON]`: print the result as JSON (exit 0) or the error (1)."""
    try:
        params = json.loads(params_json) if params_json else {}
    except json.JSONDecodeError as e:
        print(f"nvmet-p2p rpc: the params are not valid JSON: {e}", file=sys.stderr)
        return 1
    if not isinstance(params, dict):
        print("nvmet-p2p rpc: params must be a JSON object, e.g. '{\"path\": \"/\"}'",
              file=sys.stderr)
        return 1
    try:
        with RpcClient(path) as client:
            result = client.call(method, **params)
    except (RpcError, RpcUnreachable) as e:
        print(str(e), file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0
