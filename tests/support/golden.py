"""Shared helpers of the wire-format tests: golden byte tables written from the spec's
offsets, and Hypothesis values for every field of a layout."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from nvmet_p2p.wire.layout import Kind, Layout


def golden(size: int, parts: dict[int, str]) -> bytes:
    """`size` zero bytes with hex strings placed at their offsets."""
    buf = bytearray(size)
    for off, hx in parts.items():
        raw = bytes.fromhex(hx)
        assert off + len(raw) <= size
        buf[off:off + len(raw)] = raw
    return bytes(buf)


def layout_strategy(layout: Layout) -> st.SearchStrategy[dict[str, Any]]:
    """Any value each field of `layout` can carry (strings without padding characters)."""
    per_field = {}
    for f in layout.fields:
        if f.kind is Kind.INT:
            per_field[f.name] = st.integers(0, 2 ** (8 * f.size) - 1)
        elif f.kind is Kind.BYTES:
            per_field[f.name] = st.binary(min_size=f.size, max_size=f.size)
        else:
            # printable ASCII with inner spaces; trailing padding characters cannot round-trip
            chars = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
            per_field[f.name] = st.text(chars, max_size=f.size).map(lambda s: s.rstrip(" "))
    return st.fixed_dictionaries(per_field)
