"""The one shape of every log line the target writes: `event=<what> key=value ...`.

Operators grep and parse the daemon's log (journalctl, a log shipper), so a line is a
list of fields, never a Python repr: `event=ctrl_connected cntlid=1 hostnqn=nqn...
subnqn=nqn... kato=5`.  A value holding a space, a quote, an '=' or nothing at all is
written as a JSON string (`reason="no RDMA device"`); a mapping is flattened into
dotted keys (`backend.path=/dev/nvme0n1`) unless its keys are sentences (a count per
reason), then it is one JSON value; a list is joined by commas.  Configuration
changes use the same form with `change=` as the first key (control/rpc/methods.py).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

_KEY = re.compile(r"[A-Za-z0-9_.:/-]+")  # what may stand left of '=' in a line


def value(v: Any) -> str:
    """One field value as it is written in a line."""
    if isinstance(v, bool):
        shown = "1" if v else "0"
    elif v is None:
        shown = ""
    elif isinstance(v, (list, tuple, set, frozenset)):
        shown = ",".join(str(x) for x in v)
    else:
        shown = str(v)
    if not shown or any(c.isspace() or c in "\"=" for c in shown):
        return json.dumps(shown, ensure_ascii=False)
    return shown


def _is_key(key: Any) -> bool:
    return isinstance(key, str) and bool(_KEY.fullmatch(key))


def _flat(prefix: str, fields: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key, v in fields.items():
        name = f"{prefix}{key}"
        if isinstance(v, Mapping) and all(_is_key(k) for k in v):
            out += _flat(f"{name}.", v)
        elif isinstance(v, Mapping):  # keys that are sentences (reasons): one JSON value
            out.append(f"{name}={value(json.dumps(v, sort_keys=True, default=str))}")
        else:
            out.append(f"{name}={value(v)}")
    return out


def line(head: str, what: str, fields: Mapping[str, Any]) -> str:
    """`head=what key=value ...` (head is "event" or "change")."""
    return " ".join([f"{head}={value(what)}", *_flat("", fields)])


def parse(text: str) -> dict[str, str]:
    """The fields of one line (for tests and log readers): the inverse of `line`."""
    out: dict[str, str] = {}
    dec = json.JSONDecoder()
    i = 0
    while i < len(text):
        if text[i] == " ":
            i += 1
            continue
        eq = text.index("=", i)
        key = text[i:eq]
        if text.startswith('"', eq + 1):
            v, i = dec.raw_decode(text, eq + 1)
        else:
            end = text.find(" ", eq + 1)
            i = len(text) if end < 0 else end
            v = text[eq + 1:i]
        out[key] = v
    return out


def event(logger: logging.Logger, level: int, what: str, /, **fields: Any) -> None:
    """Log one event line at `level`; the fields are formatted only when it is shown."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", line("event", what, fields), stacklevel=2)


def info(logger: logging.Logger, what: str, /, **fields: Any) -> None:
    if logger.isEnabledFor(logging.INFO):
        logger.log(logging.INFO, "%s", line("event", what, fields), stacklevel=2)


def warning(logger: logging.Logger, what: str, /, **fields: Any) -> None:
    if logger.isEnabledFor(logging.WARNING):
        logger.log(logging.WARNING, "%s", line("event", what, fields), stacklevel=2)


def error(logger: logging.Logger, what: str, /, **fields: Any) -> None:
    if logger.isEnabledFor(logging.ERROR):
        logger.log(logging.ERROR, "%s", line("event", what, fields), stacklevel=2)

