"""nvmetcli-compatible JSON for the configuration tree: dump, restore, atomic save, read.

The shape is what upstream nvmetcli's `save` writes against Linux 6.12 (top level
"hosts", "ports", "subsystems"; attribute groups as dicts of the strings the configfs
files read back; "nsid", "portid", "enable" and "ana_grpid" as integers; every port
carrying its default ANA group 1), so a file nvmetcli wrote loads unchanged.

nvmet-p2p's own keys are written only when their value differs from the default, so
that `to_dict()` of a tree loaded from an nvmetcli file equals the file:
  * namespace "device": "backend", "size", "block_size", "create";
  * namespace top level: "p2pmem" (kernel file, but nvmetcli does not save it) and
    "buffered_io" (likewise);
  * port "attr": {"allow_p2pmem": "1"} (the whole group is left out at its default).

Read but never written: a namespace "resv" group and "param.mdts" / "attr.tbkas" from
newer kernels, accepted only at the kernel default (the features are not supported);
a subsystem "passthru" entry, accepted only when disabled.

Restore runs in dependency order (hosts, subsystems with their attributes, allowed
hosts and namespaces, then ports with attributes, referrals and finally links) and
reports every problem with the file, the JSON path and what is wrong.

Reading is bounded before anything is parsed: only regular files (never a FIFO, a
device or a directory, which could block or never end), at most MAX_DOC_BYTES, at
most MAX_DEPTH levels of nesting and numbers of at most MAX_NUMBER_CHARS digits.
`parse_json` applies the same limits to JSON from the control socket.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from typing import Any

from nvmet_p2p.config.values import MAX_NUMBER_CHARS
from nvmet_p2p.errors import ConfigError

MAX_DOC_BYTES = 16 << 20  # a configuration of thousands of objects is a few MiB
MAX_DEPTH = 32  # an nvmetcli document nests 6 deep; json's C parser recurses per level

# Attributes of newer kernels that nvmet-p2p does not implement, accepted at these values.
_TOLERATED = {("param", "mdts"): "-1", ("attr", "tbkas"): "0", ("resv", "enable"): "0"}
_DEFAULT_ANA_GROUPS = [{"ana": {"state": "optimized"}, "grpid": 1}]
_ROOT_KEYS = ("hosts", "ports", "subsystems")
_HOST_KEYS = ("nqn",)
_SUBSYS_KEYS = ("nqn", "attr", "allowed_hosts", "namespaces", "passthru")
_NS_KEYS = ("nsid", "device", "ana", "ana_grpid", "resv", "buffered_io", "p2pmem", "enable")
_PORT_KEYS = ("portid", "addr", "param", "attr", "ana_groups", "referrals", "subsystems")
_REFERRAL_KEYS = ("name", "addr", "enable")


# -- dump -----------------------------------------------------------------------------

def _group(obj: Any, group: str) -> dict[str, str]:
    out = {}
    for spec in obj.ATTRS:
        if spec.group != group:
            continue
        value = obj._get(spec)
        if spec.extension and value == spec.make_default():
            continue
        out[spec.name] = spec.show(value)
    return out


def _dump_namespace(ns: Any) -> dict:
    d = {"ana": _group(ns, "ana"), "ana_grpid": ns.ana_grpid, "device": _group(ns, "device"),
         "enable": int(ns.enable), "nsid": ns.nsid}
    if ns.buffered_io:
        d["buffered_io"] = 1
    if ns.p2pmem != "1":
        d["p2pmem"] = ns.p2pmem
    return d


def _dump_subsystem(subsys: Any) -> dict:
    return {"allowed_hosts": subsys.allowed_hosts, "attr": _group(subsys, "attr"),
            "namespaces": [_dump_namespace(ns) for ns in subsys.namespaces.values()],
            "nqn": subsys.nqn}


def _dump_port(port: Any) -> dict:
    d = {"addr": _group(port, "addr"), "ana_groups": [dict(g) for g in _DEFAULT_ANA_GROUPS],
         "param": _group(port, "param"), "portid": port.portid,
         "referrals": [{"addr": _group(r, "addr"), "enable": int(r.enable), "name": r.name}
                       for r in port.referrals.values()],
         "subsystems": port.subsystems}
    attr = _group(port, "attr")
    if attr:
        d["attr"] = attr
    return d


def dump_root(root: Any) -> dict:
    return {"hosts": [{"nqn": h.nqn} for h in root.hosts.values()],
            "ports": [_dump_port(p) for p in root.ports.values()],
            "subsystems": [_dump_subsystem(s) for s in root.subsystems.values()]}


# -- restore --------------------------------------------------------------------------

class _Restorer:
    def __init__(self, root: Any, source: str, on_error: Callable[[str], None] | None):
        self.root, self.source, self.on_error = root, source, on_error
        self.errors: list[str] = []

    def err(self, path: str, problem: str) -> None:
        msg = f"{self.source}: {path}: {problem}"
        self.errors.append(msg)
        if self.on_error is not None:
            self.on_error(msg)

    def obj(self, value: Any, path: str, keys: tuple[str, ...]) -> bool:
        """Check that `value` is a JSON object with only known keys (reporting the rest)."""
        if not isinstance(value, dict):
            self.err(path, f"expected an object, found {type(value).__name__}")
            return False
        for key in value:
            if key not in keys:
                self.err(f"{path}.{key}", f"unknown key {key!r}; valid: {', '.join(keys)}")
        return True

    def items(self, doc: dict, key: str, path: str) -> list[tuple[str, Any]]:
        value = doc.get(key, [])
        if not isinstance(value, list):
            self.err(f"{path}{key}", f"expected a list, found {type(value).__name__}")
            return []
        return [(f"{path}{key}[{i}]", v) for i, v in enumerate(value)]

    def attempt(self, path: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except ConfigError as e:
            self.err(path, str(e))
            return None

    def ident(self, doc: dict, key: str, path: str, kind: type) -> Any:
        if key not in doc:
            self.err(path, f"{key!r} is missing")
            return None
        value = doc[key]
        if kind is int and isinstance(value, str) and value.isascii() and \
                value.isdigit() and len(value) <= MAX_NUMBER_CHARS:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, kind):
            self.err(f"{path}.{key}", f"expected {'an integer' if kind is int else 'a string'}, "
                                      f"found {value!r}")
            return None
        return value

    def group(self, obj: Any, doc: dict, group: str, path: str,
              key: str | None = None, first: tuple[str, ...] = (),
              last: tuple[str, ...] = ()) -> None:
        key = key or group
        if key not in doc:
            return
        values = doc[key]
        if not isinstance(values, dict):
            self.err(f"{path}.{key}", "expected an object of attribute: value")
            return
        names = sorted(values, key=lambda n: (0 if n in first else 2 if n in last else 1))
        for name in names:
            where = f"{path}.{key}.{name}"
            tolerated = _TOLERATED.get((group, name))
            if tolerated is not None:
                if str(values[name]) != tolerated:
                    self.err(where, f"{group}_{name} is not supported by nvmet-p2p; set it "
                                    f"to {tolerated} or remove it")
                continue
            spec = self.attempt(where, obj.spec, group, name)
            if spec is not None:
                self.attempt(where, obj._set, spec, values[name])

    def plain(self, obj: Any, doc: dict, name: str, path: str) -> None:
        if name in doc:
            self.attempt(f"{path}.{name}", obj._set, obj.spec("", name), doc[name])

    def run(self, doc: Any) -> list[str]:
        if not self.obj(doc, "(top)", _ROOT_KEYS):
            return self.errors
        for path, h in self.items(doc, "hosts", ""):
            if self.obj(h, path, _HOST_KEYS):
                nqn = self.ident(h, "nqn", path, str)
                if nqn is not None:
                    self.attempt(f"{path}.nqn", self.root.create_host, nqn)
        for path, s in self.items(doc, "subsystems", ""):
            self.subsystem(s, path)
        for path, p in self.items(doc, "ports", ""):
            self.port(p, path)
        return self.errors

    def subsystem(self, doc: Any, path: str) -> None:
        if not self.obj(doc, path, _SUBSYS_KEYS):
            return
        nqn = self.ident(doc, "nqn", path, str)
        subsys = None if nqn is None else self.attempt(f"{path}.nqn",
                                                       self.root.create_subsystem, nqn)
        if not subsys:
            return
        self.group(subsys, doc, "attr", path)
        for hpath, host in self.items(doc, "allowed_hosts", f"{path}."):
            if not isinstance(host, str):
                self.err(hpath, f"expected a host NQN string, found {host!r}")
            else:
                self.attempt(hpath, subsys.add_allowed_host, host)
        for npath, ns in self.items(doc, "namespaces", f"{path}."):
            self.namespace(subsys, ns, npath)
        for ppath, pt in self.items(doc, "passthru", f"{path}."):
            if not isinstance(pt, dict) or pt.get("enable", 0) not in (0, "0", False):
                self.err(ppath, "passthru subsystems are not supported by nvmet-p2p; remove "
                                "the passthru entry or set its enable to 0")

    def namespace(self, subsys: Any, doc: Any, path: str) -> None:
        if not self.obj(doc, path, _NS_KEYS):
            return
        nsid = self.ident(doc, "nsid", path, int)
        ns = nsid is not None and self.attempt(f"{path}.nsid", subsys.create_namespace, nsid)
        if not ns:
            return
        self.group(ns, doc, "device", path, first=("backend", "block_size"))
        self.group(ns, doc, "ana", path)
        if "ana_grpid" in doc:
            grp = doc.get("ana", {}).get("grpid") if isinstance(doc.get("ana"), dict) else None
            if grp is not None and str(grp) != str(doc["ana_grpid"]):
                self.err(f"{path}.ana_grpid", f"ana_grpid {doc['ana_grpid']} disagrees with "
                                              f"ana.grpid {grp}; make them equal")
            else:
                self.attempt(f"{path}.ana_grpid", ns._set, ns.spec("ana", "grpid"),
                             doc["ana_grpid"])
        self.group(ns, doc, "resv", path)
        self.plain(ns, doc, "buffered_io", path)
        self.plain(ns, doc, "p2pmem", path)
        self.plain(ns, doc, "enable", path)  # last: the hooks see the final attributes

    def port(self, doc: Any, path: str) -> None:
        if not self.obj(doc, path, _PORT_KEYS):
            return
        portid = self.ident(doc, "portid", path, int)
        port = portid is not None and self.attempt(f"{path}.portid", self.root.create_port,
                                                   portid)
        if not port:
            return
        # trtype first: tsas and the trsvcid default depend on it.
        self.group(port, doc, "addr", path, first=("trtype",), last=("tsas",))
        self.group(port, doc, "param", path)
        self.group(port, doc, "attr", path)
        for gpath, grp in self.items(doc, "ana_groups", f"{path}."):
            if grp != _DEFAULT_ANA_GROUPS[0]:
                self.err(gpath, "only the default ANA group 1 in state optimized is "
                                "supported; remove other ANA groups")
        for rpath, ref in self.items(doc, "referrals", f"{path}."):
            self.referral(port, ref, rpath)
        for spath, nqn in self.items(doc, "subsystems", f"{path}."):
            if not isinstance(nqn, str):
                self.err(spath, f"expected a subsystem NQN string, found {nqn!r}")
            else:
                self.attempt(spath, port.link_subsystem, nqn)

    def referral(self, port: Any, doc: Any, path: str) -> None:
        if not self.obj(doc, path, _REFERRAL_KEYS):
            return
        name = self.ident(doc, "name", path, str)
        ref = name is not None and self.attempt(f"{path}.name", port.create_referral, name)
        if not ref:
            return
        self.group(ref, doc, "addr", path, first=("trtype",))
        self.plain(ref, doc, "enable", path)


def restore_root(root: Any, doc: Any, *, source: str,
                 on_error: Callable[[str], None] | None) -> list[str]:
    if not root.is_empty():
        raise ConfigError(f"cannot restore {source} over an existing configuration; "
                          "clear() it first")
    errors = _Restorer(root, source, on_error).run(doc)
    if errors and on_error is None:
        raise ConfigError(f"{len(errors)} error(s) in {source}:\n" + "\n".join(errors))
    return errors


# -- files ----------------------------------------------------------------------------

_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET_RE = re.compile(r"[\[\]{}]")
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _depth_exceeds(text: str, limit: int) -> bool:
    depth = 0
    for m in _BRACKET_RE.finditer(_STRING_RE.sub("", text)):
        if m.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_NUMBER_CHARS:
        raise ValueError(f"a number of {len(text)} digits is longer than any value here "
                         f"(at most {MAX_NUMBER_CHARS})")
    return int(text)


def parse_json(data: str | bytes, source: str) -> Any:
    """JSON text -> value, within the limits above; ConfigError names what is wrong."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{source}: not UTF-8 text at byte {e.start}; is this JSON?") \
                from None
    if _depth_exceeds(data, MAX_DEPTH):
        raise ConfigError(f"{source}: JSON nested deeper than {MAX_DEPTH} levels; an nvmetcli "
                          "configuration needs 6")
    try:
        return json.loads(data, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}: line {e.lineno} column {e.colno}: not valid JSON: "
                          f"{e.msg}") from None
    except (ValueError, RecursionError) as e:  # _parse_int, or a float too long to parse
        raise ConfigError(f"{source}: not valid JSON: {e}") from None


def read_doc(path: str | os.PathLike) -> Any:
    """Read a configuration file: a regular file of at most MAX_DOC_BYTES, never blocking."""
    try:
        kind = _kind_problem(os.stat(path))
        if kind is None:
            # O_NONBLOCK: should the path turn into a FIFO meanwhile, open() still returns
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            try:
                kind = _kind_problem(os.fstat(fd))
                data = b"" if kind else os.read(fd, MAX_DOC_BYTES + 1)
            finally:
                os.close(fd)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration: {e.strerror}") from e
    if kind is not None:
        raise ConfigError(f"{path} is {kind}, not a configuration file; give the path of a "
                          "JSON file")
    if len(data) > MAX_DOC_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_DOC_BYTES >> 20} MiB; that is not a "
                          "configuration file")
    return parse_json(data, str(path))


def _kind_problem(st: os.stat_result) -> str | None:
    for test, kind in _FILE_KINDS:
        if test(st.st_mode):
            return kind
    return None if stat.S_ISREG(st.st_mode) else "not a regular file"


BACKUPS = 10  # as targetcli keeps: the newest configurations before each save
BACKUP_DIR = "backup"


def save_doc(path: str | os.PathLike, doc: dict) -> None:
    """Write `doc` as nvmetcli does (sorted keys, indent 2), atomically and durably.

    The directory is created (nvmetcli creates /etc/nvmet); a file already there keeps
    its mode (new files are 0600: they may name hosts) and is first copied to
    backup/<name>.<time> beside it, the newest BACKUPS copies kept.  A file that already
    holds this very text is left alone, so that repeated saves (the shell's
    auto_save_on_exit) do not push real backups out with copies of the same file.
    """
    path = os.fspath(path)
    text = json.dumps(doc, sort_keys=True, indent=2) + "\n"
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        try:
            old = os.stat(path)
        except FileNotFoundError:
            mode = 0o600
        else:
            mode = stat.S_IMODE(old.st_mode)
            if _holds(path, text):
                return
            _backup(path, directory)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                   suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)  # make the rename itself durable
        finally:
            os.close(dfd)
    except OSError as e:
        raise ConfigError(f"{path}: cannot save the configuration: {e}") from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _holds(path: str, text: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(len(text) + 1) == text
    except (OSError, UnicodeDecodeError):
        return False  # unreadable: write it anew


def _backup(path: str, directory: str) -> None:
    backups = os.path.join(directory, BACKUP_DIR)
    os.makedirs(backups, mode=0o700, exist_ok=True)
    name = os.path.basename(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = os.path.join(backups, f"{name}.{stamp}")
    n = 1
    while os.path.exists(target):  # two saves in one second
        target = os.path.join(backups, f"{name}.{stamp}.{n}")
        n += 1
    shutil.copy2(path, target)
    mine = sorted((e for e in os.scandir(backups) if e.name.startswith(name + ".")),
                  key=lambda e: e.stat().st_mtime_ns)
    for old in mine[:-BACKUPS]:
        os.unlink(old.path)
