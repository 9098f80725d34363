"""Method parameters: how each is declared, and the checks made before a method runs.

Every check here runs before the tree is touched, so a malformed request changes
nothing and its error names the field and what a valid value looks like.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nvmet_p2p.config.values import MAX_NUMBER_CHARS
from nvmet_p2p.control.rpc.errors import INVALID_PARAMS, RpcError, bad_param
from nvmet_p2p.errors import ConfigError

VALUE_TYPES = (str, int, bool)
ATTRS_WHAT = "an object {group: {name: value}}, e.g. {\"attr\": {\"allow_p2pmem\": \"1\"}}"


@dataclass(frozen=True)
class Param:
    name: str
    types: tuple[type, ...]
    what: str  # how the error message describes a valid value
    required: bool = True


PATH = Param("path", (str,), "a tree path such as /subsystems/<nqn>/namespaces/1")
SUBSYS = Param("subsystem", (str,), "a subsystem NQN")
PORT = Param("port", (int, str), "a port id or a path /ports/<id>")


def bind(method: str, spec: tuple[Param, ...], params: Any) -> dict:
    """Check params against the method's table; the error names the field and the fix."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, "invalid params: pass params as an object of named "
                       f"values, e.g. {{\"path\": \"/\"}} (not {type(params).__name__})",
                       {"field": None})
    names = {p.name for p in spec}
    for key in params:
        if key not in names:
            raise bad_param(key, f"is not a param of {method}; valid: "
                            f"{', '.join(p.name for p in spec) or '(none)'}")
    params = {k: v for k, v in params.items()  # null is "not given" for optional params
              if v is not None or any(p.name == k and p.required for p in spec)}
    for p in spec:
        if p.name not in params:
            if p.required:
                raise bad_param(p.name, f"is missing: {method} needs {p.what}")
            continue
        value = params[p.name]
        ok = isinstance(value, p.types) and not (isinstance(value, bool) and
                                                 bool not in p.types and int in p.types)
        if not ok:
            raise bad_param(p.name, f"must be {p.what}, not {json.dumps(value)[:60]}")
    return dict(params)


def check_attrs(attrs: Any) -> None:
    if not isinstance(attrs, dict):
        raise bad_param("attrs", f"must be {ATTRS_WHAT}")
    for group, names in attrs.items():
        if not isinstance(names, dict):
            raise bad_param("attrs", f"group {group!r} must map names to values: "
                            f"{ATTRS_WHAT}")
        for name, value in names.items():
            if not isinstance(value, VALUE_TYPES):
                raise bad_param("attrs", f"value of {group}.{name} must be a string, "
                                f"number or boolean, not {type(value).__name__}")


def int_name(name: Any, what: str) -> int:
    """A port id or NSID given as a number or as ASCII digits ("²" is no digit here)."""
    if isinstance(name, int) and not isinstance(name, bool):
        return name
    if isinstance(name, str):
        text = name.strip()
        if text.isascii() and text.isdigit() and len(text) <= MAX_NUMBER_CHARS:
            return int(text)
    raise ConfigError(f"{what} must be a number, not {name!r}")


def text(value: Any) -> str:
    """An attribute value as the text a configfs file would be written with."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int) and value.bit_length() > 64:  # str() of it may even raise
        raise ConfigError("a number of more than 64 bits is larger than any value here")
    return str(value)
