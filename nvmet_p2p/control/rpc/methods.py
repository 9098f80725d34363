"""The control socket's methods and their table: each a thin call into the tree.

The tree's rules and error texts reach the client unchanged (ConfigError becomes
-32000).  Every method that changes something runs inside one `Root.transaction()`
(see `METHODS[...].mutates`), so an exception of any kind leaves the tree and the
live target as they were.  Every change is logged as one `key=value` line.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import nvmet_p2p
from nvmet_p2p import logfmt
from nvmet_p2p.config import jsonfile
from nvmet_p2p.config.shape import CHILD_DIRS, DIRS, ENTRY_DIR, join, path_kind, split_path
from nvmet_p2p.configfs import (
    Host,
    Namespace,
    Port,
    Referral,
    Root,
    Subsystem,
    attr_choices,
    attr_groups,
    get_attr,
    list_attrs,
    lookup,
    set_attr,
)
from nvmet_p2p.control.rpc.errors import CONFIG_ERROR, RpcError, bad_param
from nvmet_p2p.control.rpc.params import (
    ATTRS_WHAT,
    PATH,
    PORT,
    SUBSYS,
    VALUE_TYPES,
    Param,
    check_attrs,
    int_name,
    text,
)
from nvmet_p2p.errors import ConfigError

log = logging.getLogger("nvmet_p2p.rpc")


def log_change(change: str, **fields: Any) -> None:
    """One structured line per change: change=<what> key=value ... (see logfmt)."""
    if log.isEnabledFor(logging.INFO):
        log.info("%s", logfmt.line("change", change, fields))


def _resolve(root: Root, path: str, *kinds: str) -> Any:
    kind = path_kind(path)
    if kinds and kind not in kinds:
        raise ConfigError(f"{path} is a {kind}; this needs a path to a "
                          f"{' or '.join(kinds)}")
    return lookup(root, path)


def _port_of(root: Root, port: Any) -> Port:
    """A port by id (3 or "3") or by path ("/ports/3")."""
    if isinstance(port, str) and "/" in port:
        return _resolve(root, port, "port")
    portid = int_name(port, "port id")
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


def _ordered(attrs: dict[str, dict[str, Any]]) -> list[tuple[str, str, Any]]:
    """Flatten {group: {name: value}}, disabling first and enabling last.

    "enable" gates most other attributes, so a request that changes both works in one
    call whichever order the client wrote it in.
    """
    flat = [(g, n, v) for g, names in attrs.items() for n, v in names.items()]

    def rank(item: tuple[str, str, Any]) -> int:
        group, name, value = item
        if group == "" and name == "enable":
            return 2 if text(value) not in ("0", "n", "no", "false", "off") else 0
        return 1
    return sorted(flat, key=rank)


def _set_all(obj: Any, attrs: dict[str, dict[str, Any]], path: str) -> None:
    """Write every attribute; the caller's transaction undoes them all on any error."""
    for group, name, value in _ordered(attrs):
        set_attr(obj, group, name, text(value))
        log_change("set", path=path, attr=f"{group}_{name}" if group else name,
                   value=get_attr(obj, group, name))


def _needs_attrs(obj: Any, path: str) -> None:
    if not hasattr(obj, "ATTRS"):
        raise ConfigError(f"{path} has no attributes; it is a directory")


class Methods:
    """The method implementations; each takes validated keyword params."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    @property
    def root(self) -> Root:
        return self.daemon.target.root

    def list_children(self, path: str) -> dict:
        node = _resolve(self.root, path)
        kind = path_kind(path)
        if kind in DIRS:
            names = [str(k) for k in node]
        else:
            names = list(CHILD_DIRS.get(kind, ()))
        children = [{"name": n, "kind": path_kind(join(path, n))} for n in names]
        return {"path": join(path), "kind": kind, "children": children}

    def get(self, path: str, group: str | None = None, name: str | None = None) -> dict:
        obj = _resolve(self.root, path)
        if name is not None and group is None:
            raise bad_param("group", "is needed with 'name' (use \"\" for enable, "
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
        _needs_attrs(obj, path)
        return attr_choices(obj, group, name)

    def attr_names(self, kind: str) -> dict[str, dict[str, list[str] | None]]:
        cls = _KIND_CLASSES.get(kind)
        if cls is None:
            raise ConfigError(f"{kind!r} is not a kind of object; kinds: "
                              f"{', '.join(_KIND_CLASSES)}")
        out: dict[str, dict[str, list[str] | None]] = {}
        for spec in cls.ATTRS:
            out.setdefault(spec.group, {})[spec.name] = (list(spec.choices)
                                                         if spec.choices else None)
        return out

    def set_attrs(self, path: str, group: str | None = None, name: str | None = None,
                  value: Any = None, attrs: dict | None = None) -> dict:
        single = (group, name, value)
        if attrs is not None and any(x is not None for x in single):
            raise bad_param("attrs", "cannot be combined with group/name/value; pass one form")
        if attrs is None:
            for field, x in zip(("group", "name", "value"), single, strict=True):
                if x is None:
                    raise bad_param(field, "is missing (or pass attrs: {group: {name: "
                                    "value}} instead of group/name/value)")
            attrs = {str(group): {str(name): value}}
        check_attrs(attrs)
        obj = _resolve(self.root, path)
        _needs_attrs(obj, path)
        _set_all(obj, attrs, join(path))
        return {g: {n: get_attr(obj, g, n) for n in names} for g, names in attrs.items()}

    def create(self, path: str, name: Any, attrs: dict | None = None) -> dict:
        if attrs is not None:
            check_attrs(attrs)
        kind = path_kind(path)
        if kind not in DIRS:
            raise ConfigError(f"{path} is a {kind}; create needs a directory such as "
                              "/subsystems or /subsystems/<nqn>/namespaces")
        directory = DIRS[kind]
        new_path = join(path, name)
        if attrs and directory.link:  # refused before the link is made
            raise bad_param("attrs", f"does not apply to a link ({new_path})")
        _resolve(self.root, path)  # the parent must exist
        parts = split_path(path)
        root = self.root
        made: Any = None
        if kind == "hosts":
            made = root.create_host(str(name))
        elif kind == "subsystems":
            made = root.create_subsystem(str(name))
        elif kind == "ports":
            made = root.create_port(int_name(name, "port id"))
        elif kind == "namespaces":
            made = root.subsystems[parts[1]].create_namespace(int_name(name, "NSID"))
        elif kind == "referrals":
            made = _port_of(root, parts[1]).create_referral(str(name))
        elif kind == "port_subsystems":
            _port_of(root, parts[1]).link_subsystem(str(name))
        else:  # allowed_hosts
            root.subsystems[parts[1]].add_allowed_host(str(name))
        log_change("created", path=new_path)
        if attrs:
            _set_all(made, attrs, new_path)
        return {"path": new_path}

    def delete(self, path: str) -> dict:
        kind = path_kind(path)
        if kind not in ENTRY_DIR:
            raise ConfigError(f"{path} is a {kind}; delete needs the path of an object or "
                              "a link")
        obj = _resolve(self.root, path)
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
        log_change("deleted", path=join(path))
        return {"deleted": join(path)}

    def link(self, port: Any, subsystem: str) -> dict:
        p = _port_of(self.root, port)
        nqn = _subsys_of(self.root, subsystem).nqn
        p.link_subsystem(nqn)
        path = join("ports", p.portid, "subsystems", nqn)
        log_change("linked", path=path)
        return {"path": path}

    def unlink(self, port: Any, subsystem: str) -> dict:
        p = _port_of(self.root, port)
        nqn = subsystem.rstrip("/").rsplit("/", 1)[-1]
        p.unlink_subsystem(nqn)
        path = join("ports", p.portid, "subsystems", nqn)
        log_change("unlinked", path=path)
        return {"deleted": path}

    def allow_host(self, subsystem: str, host: str) -> dict:
        s = _subsys_of(self.root, subsystem)
        s.add_allowed_host(host)
        path = join("subsystems", s.nqn, "allowed_hosts", host)
        log_change("allowed", path=path)
        return {"path": path}

    def disallow_host(self, subsystem: str, host: str) -> dict:
        s = _subsys_of(self.root, subsystem)
        s.remove_allowed_host(host)
        path = join("subsystems", s.nqn, "allowed_hosts", host)
        log_change("disallowed", path=path)
        return {"deleted": path}

    def _enable(self, path: str, on: bool) -> dict:
        obj = _resolve(self.root, path, "namespace", "referral")
        obj.enable = on
        log_change("enabled" if on else "disabled", path=join(path))
        return {"path": join(path), "enable": get_attr(obj, "", "enable")}

    def enable(self, path: str) -> dict:
        return self._enable(path, True)

    def disable(self, path: str) -> dict:
        return self._enable(path, False)

    async def save_config(self, path: str | None = None) -> dict:
        path = path or self.daemon.config_path
        if not path:
            raise bad_param("path", "is missing and the daemon was started without --config; "
                            "pass the file to write")
        doc = self.root.to_dict()  # on the loop: the tree is only touched here
        await asyncio.get_running_loop().run_in_executor(None, jsonfile.save_doc, path, doc)
        log_change("saved", file=path)
        return {"path": path}

    async def load_config(self, path: str | None = None, doc: dict | None = None,
                          replace: bool = False) -> dict:
        if path is not None and doc is not None:
            raise bad_param("path", "and 'doc' cannot both be given: pass a file the daemon "
                            "can read, or the nvmetcli JSON itself")
        if path is None and doc is None:
            path = self.daemon.config_path
            if not path:
                raise bad_param("path", "is missing and the daemon has no configuration "
                                "file; pass path or doc")
        if path is not None:  # off the loop: a slow file system must not stall the hosts
            doc = await asyncio.get_running_loop().run_in_executor(None, jsonfile.read_doc,
                                                                   path)
        return replace_config(self.root, doc, path or "<doc>", replace=replace)

    def clear_config(self) -> dict:
        self.root.clear()
        log_change("cleared")
        return {"cleared": True}

    def status(self) -> dict:
        out = self.daemon.target.status()
        out["warnings"] = self.root.warnings()
        return out

    def version(self) -> dict:
        return {"version": nvmet_p2p.__version__, "methods": list(METHODS)}

    def p2p_explain(self, path: str | None = None) -> list[dict]:
        # imported here: the shell's RpcClient shares this package and needs none of P2P
        from nvmet_p2p.p2p.explain import explain

        result = explain(self.daemon.target, self.daemon.p2p)
        if path is None:
            return result
        return [e for e in result if _explains(e, path)]


def replace_config(root: Root, doc: Any, source: str, *, replace: bool) -> dict:
    """Load `doc` as the whole configuration, all or nothing (load_config, SIGHUP).

    The document is first restored into a scratch tree without hooks: every error it
    has is found there and reported together while the live target is untouched.  Only
    a clean document then replaces the live tree, in one transaction, so what the
    scratch tree cannot foresee (a backend that will not open) still changes nothing.
    """
    if not root.is_empty() and not replace:
        raise ConfigError("the target already has a configuration; pass replace: true to "
                          "replace it, or call clear_config first")
    errors = Root().restore(doc, source=source, on_error=lambda msg: None)
    if not errors:
        with root.transaction():
            root.clear()
            errors = root.restore(doc, source=source, on_error=lambda msg: None)
            if errors:
                raise _load_failed(source, errors)
    if errors:
        raise _load_failed(source, errors)
    log_change("loaded", source=source, hosts=len(root.hosts),
               subsystems=len(root.subsystems), ports=len(root.ports))
    return {"hosts": len(root.hosts), "subsystems": len(root.subsystems),
            "ports": len(root.ports)}


SHOWN_ERRORS = 20  # in the message; the data carries up to MAX_ERRORS
MAX_ERRORS = 100


def _load_failed(source: str, errors: list[str]) -> RpcError:
    shown = errors[:SHOWN_ERRORS]
    if len(errors) > SHOWN_ERRORS:
        shown.append(f"... and {len(errors) - SHOWN_ERRORS} more")
    return RpcError(CONFIG_ERROR, f"{len(errors)} error(s) in {source}; nothing was "
                    "loaded:\n" + "\n".join(shown),
                    {"errors": errors[:MAX_ERRORS], "count": len(errors)})


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


@dataclass(frozen=True)
class Method:
    attr: str  # the Methods attribute that implements it
    params: tuple[Param, ...]
    help: str  # one line, shown by `nvmet-p2p rpc --help` and `version`
    mutates: bool = False  # runs inside one transaction: all or nothing


_HOST_P = Param("host", (str,), "a host NQN")
_KIND_CLASSES = {"host": Host, "subsystem": Subsystem, "namespace": Namespace, "port": Port,
                 "referral": Referral}

METHODS: dict[str, Method] = {
    "list": Method("list_children", (PATH,), "children of a tree node"),
    "get": Method("get", (PATH, Param("group", (str,), "an attribute group", False),
                          Param("name", (str,), "an attribute name", False)),
                  "attribute values of a node, as {group: {name: value}}"),
    "attr_choices": Method("attr_choices", (PATH, Param("group", (str,), "an attribute group"),
                                            Param("name", (str,), "an attribute name")),
                           "the enumerated values of an attribute, or null"),
    "attr_names": Method("attr_names", (Param("kind", (str,), "an object kind: host, "
                                              "subsystem, namespace, port or referral"),),
                         "the attributes a kind of object has, with enumerated values"),
    "set": Method("set_attrs", (PATH, Param("group", (str,), "an attribute group", False),
                                Param("name", (str,), "an attribute name", False),
                                Param("value", VALUE_TYPES, "a string, number or boolean",
                                      False),
                                Param("attrs", (dict,), ATTRS_WHAT, False)),
                  "write one attribute or several, all or nothing", True),
    "create": Method("create", (Param("path", (str,), "the parent directory, e.g. /subsystems"),
                                Param("name", (str, int), "the new object's NQN, id or name"),
                                Param("attrs", (dict,), ATTRS_WHAT, False)),
                     "create an object (or a link) under a directory, with attributes, "
                     "all or nothing", True),
    "delete": Method("delete", (PATH,), "delete an object or remove a link", True),
    "link": Method("link", (PORT, SUBSYS), "export a subsystem through a port", True),
    "unlink": Method("unlink", (PORT, SUBSYS), "stop exporting a subsystem through a port",
                     True),
    "allow_host": Method("allow_host", (SUBSYS, _HOST_P),
                         "add a host to a subsystem's allowed_hosts", True),
    "disallow_host": Method("disallow_host", (SUBSYS, _HOST_P),
                            "remove a host from a subsystem's allowed_hosts", True),
    "enable": Method("enable", (PATH,), "enable a namespace or referral", True),
    "disable": Method("disable", (PATH,), "disable a namespace or referral", True),
    "save_config": Method("save_config", (Param("path", (str,), "a file path", False),),
                          "write the configuration as nvmetcli JSON, atomically"),
    # its own transaction: the file is read first, off the loop
    "load_config": Method("load_config", (Param("path", (str,), "a file path", False),
                                          Param("doc", (dict,), "an nvmetcli JSON object",
                                                False),
                                          Param("replace", (bool,), "true or false", False)),
                          "restore a configuration (default: the daemon's file); all or "
                          "nothing, every error reported"),
    "clear_config": Method("clear_config", (), "delete the whole configuration", True),
    "status": Method("status", (), "controllers, namespaces with I/O counters, ports "
                     "(listening or why not), P2P, warnings"),
    "version": Method("version", (), "the nvmet-p2p version and the method names"),
    "p2p_explain": Method("p2p_explain", (Param("path", (str,), "a port or namespace path",
                                                False),),
                          "the P2P decision and its reason per (port, namespace)"),
}

__all__ = ["METHODS", "Method", "Methods", "log_change", "replace_config"]
