"""The shape of the nvmet configfs tree, written once: which directories hold what.

/hosts/<nqn>, /subsystems/<nqn>/{namespaces/<nsid>, allowed_hosts/<nqn>},
/ports/<portid>/{subsystems/<nqn>, referrals/<name>}.  Each directory has a kind
("subsystems", "port_subsystems", ...) and so has each entry ("subsystem",
"port_subsystem", ...); links (allowed hosts, a port's subsystems) are entries that
name an object elsewhere.  The tree's lookup, the RPC methods and the shell all take
paths and kinds from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nvmet_p2p.errors import ConfigError


@dataclass(frozen=True)
class Dir:
    name: str  # the path component
    kind: str  # the kind of the directory itself
    member: str  # the kind of each entry
    key: str  # what an entry's name is: "nqn", "portid", "nsid" or "name"
    children: tuple[Dir, ...] = ()  # the directories inside each entry
    link: bool = False  # entries are links to objects that live elsewhere


TREE = (
    Dir("hosts", "hosts", "host", "nqn"),
    Dir("ports", "ports", "port", "portid", (
        Dir("referrals", "referrals", "referral", "name"),
        Dir("subsystems", "port_subsystems", "port_subsystem", "nqn", link=True),
    )),
    Dir("subsystems", "subsystems", "subsystem", "nqn", (
        Dir("allowed_hosts", "allowed_hosts", "allowed_host", "nqn", link=True),
        Dir("namespaces", "namespaces", "namespace", "nsid"),
    )),
)


def _patterns() -> dict[tuple[str, ...], Dir | str]:
    out: dict[tuple[str, ...], Dir | str] = {(): "root"}

    def walk(prefix: tuple[str, ...], dirs: tuple[Dir, ...]) -> None:
        for d in dirs:
            out[prefix + (d.name,)] = d
            out[prefix + (d.name, "*")] = d.member
            walk(prefix + (d.name, "*"), d.children)
    walk((), TREE)
    return out


# path pattern ("*" is any name) -> the Dir at that place, or the kind of the entry
PATTERNS = _patterns()
DIRS = {d.kind: d for d in PATTERNS.values() if isinstance(d, Dir)}
ENTRY_DIR = {d.member: d for d in DIRS.values()}  # entry kind -> its directory
CHILD_DIRS: dict[str, tuple[str, ...]] = {"root": tuple(d.name for d in TREE)}
CHILD_DIRS.update({d.member: tuple(c.name for c in d.children) for d in DIRS.values()
                   if d.children})
LINK_KINDS = frozenset(d.member for d in DIRS.values() if d.link)


def split_path(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def join(*parts: Any) -> str:
    return "/" + "/".join(str(p).strip("/") for p in parts if str(p).strip("/"))


def path_kind(path: str) -> str:
    """The kind of tree node a path names, from its shape alone."""
    parts = split_path(path)
    for pattern, what in PATTERNS.items():
        if len(pattern) == len(parts) and all(p == "*" or p == q
                                              for p, q in zip(pattern, parts, strict=True)):
            return what.kind if isinstance(what, Dir) else what
    raise ConfigError(f"{path} is not a path of the nvmet tree: paths look like /hosts/<nqn>, "
                      "/subsystems/<nqn>/namespaces/<nsid>, /ports/<id>/subsystems/<nqn>")
