"""PCI addresses as sysfs spells them (domain:bus:device.function).

The lowest layer, beside `errors`: the configuration, the backends and the P2P
topology all name PCI functions, and all read them the same way.
"""

from __future__ import annotations

import re

_BDF_RE = re.compile(r"^(?:([0-9a-f]{4,}):)?([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")


def normalize_bdf(text: str) -> str | None:
    """Return ``text`` as a full lower-case BDF (domain 0000 if omitted), or None."""
    m = _BDF_RE.match(text.strip().lower())
    if not m:
        return None
    domain, bus, dev, fn = m.groups()
    return f"{domain or '0000'}:{bus}:{dev}.{fn}"
