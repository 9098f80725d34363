"""Attribute tables and generic attribute access for configfs-like objects.

Every object of the tree (Subsystem, Namespace, Port, Referral, Host) declares its
attributes as a table of AttrSpec rows: group prefix and name exactly as the kernel
names the configfs file (`attr_serial` is group "attr", name "serial"; a file without
a prefix such as `enable` has group ""), a parser, a printer and a default.  From the
table this module derives the Python properties (`ns.device_path = ...`) and the
generic string access the RPC API and the shell use (`set_attr(ns, "device", "path",
...)`); both paths go through the same validation, locks and hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from nvmet_p2p.config.values import Parser
from nvmet_p2p.errors import ConfigError


@dataclass(frozen=True)
class AttrSpec:
    group: str  # configfs file prefix: "attr", "addr", "param", "device", "ana", "" (none)
    name: str  # configfs file name after the prefix
    parse: Parser  # user/JSON value -> canonical Python value (raises ConfigError)
    show: Callable[[Any], str]  # Python value -> the text the kernel file reads back
    default: Any  # a value, or a zero-argument callable for per-object defaults
    choices: tuple[str, ...] | None = None  # enumerated values, for completion
    extension: bool = False  # nvmet-p2p's own, saved only when not at its default

    @property
    def pyname(self) -> str:
        return f"{self.group}_{self.name}" if self.group else self.name

    def make_default(self) -> Any:
        return self.default() if callable(self.default) else self.default


class Node:
    """Base of every tree object: attribute storage, validation, liveness."""

    ATTRS: ClassVar[tuple[AttrSpec, ...]] = ()
    KIND: ClassVar[str] = "object"
    _root: Any
    _deleted: bool
    _values: dict[str, Any]

    if TYPE_CHECKING:
        # The attribute properties are generated from ATTRS (see __init_subclass__).
        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, root: Any) -> None:
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "_deleted", False)
        object.__setattr__(self, "_values",
                           {spec.pyname: spec.make_default() for spec in self.ATTRS})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for spec in cls.__dict__.get("ATTRS", ()):
            setattr(cls, spec.pyname, _attr_property(spec))

    def __setattr__(self, name: str, value: Any) -> None:
        # Plain assignment to a misspelt name must not silently create a new field.
        if name.startswith("_") or isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
            return
        valid = ", ".join(spec.pyname for spec in self.ATTRS) or "(none)"
        raise ConfigError(f"{self.describe()} has no attribute {name!r}; valid: {valid}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    # -- overridable behaviour -------------------------------------------------
    def describe(self) -> str:
        return self.KIND

    def _get(self, spec: AttrSpec) -> Any:
        return self._values[spec.pyname]

    def _check_writable(self, spec: AttrSpec) -> None:
        """Raise ConfigError when the object's live state forbids changing `spec`."""

    def _apply(self, spec: AttrSpec, old: Any, new: Any) -> None:
        """Commit a changed value; subclasses call hooks here (and may veto)."""
        self._values[spec.pyname] = new

    # -- shared machinery ------------------------------------------------------
    def _check_live(self) -> None:
        if self._deleted:
            raise ConfigError(f"{self.describe()} was deleted; look it up again or create it")

    def _set(self, spec: AttrSpec, value: Any) -> None:
        self._check_live()
        self._check_writable(spec)
        try:
            new = spec.parse(value)
        except ConfigError as e:
            raise ConfigError(f"{self.describe()}: {spec.pyname}: {e}") from None
        old = self._get(spec)
        if new != old:
            self._apply(spec, old, new)
            # Undone by committing the old value again: in reverse order the object is
            # in the state this change left it in, so the parse and the checks are moot.
            self._root.record(lambda: self._apply(spec, new, old))

    def spec(self, group: str, name: str) -> AttrSpec:
        for spec in self.ATTRS:
            if spec.group == group and spec.name == name:
                return spec
        groups = attr_groups(self)
        if group not in groups:
            shown = ", ".join(repr(g) for g in groups) or "(none)"
            raise ConfigError(f"{self.describe()} has no attribute group {group!r}; "
                              f"groups: {shown}")
        valid = ", ".join(s.name for s in self.ATTRS if s.group == group)
        raise ConfigError(f"unknown attribute {name!r} in group {group!r} of "
                          f"{self.describe()}; valid: {valid}")


def _attr_property(spec: AttrSpec) -> property:
    def fget(self: Node) -> Any:
        return self._get(spec)

    def fset(self: Node, value: Any) -> None:
        self._set(spec, value)

    return property(fget, fset, doc=f"configfs {spec.pyname}")


def attr_groups(obj: Node) -> list[str]:
    """Attribute groups of `obj` in kernel order; "" is the group of unprefixed files."""
    groups: list[str] = []
    for spec in obj.ATTRS:
        if spec.group not in groups:
            groups.append(spec.group)
    return groups


def get_attr(obj: Node, group: str, name: str) -> str:
    """The attribute's value as the kernel's configfs file would read it."""
    spec = obj.spec(group, name)
    return spec.show(obj._get(spec))


def set_attr(obj: Node, group: str, name: str, value: str) -> None:
    """Write an attribute as text, with the same checks and hooks as assignment."""
    obj._set(obj.spec(group, name), value)


def list_attrs(obj: Node, group: str) -> dict[str, str]:
    if group not in attr_groups(obj):
        obj.spec(group, "")  # raises the "no such group" error
    return {s.name: s.show(obj._get(s)) for s in obj.ATTRS if s.group == group}


def attr_choices(obj: Node, group: str, name: str) -> list[str] | None:
    spec = obj.spec(group, name)
    return list(spec.choices) if spec.choices is not None else None
