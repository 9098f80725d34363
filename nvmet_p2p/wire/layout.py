"""Fixed-offset data structures as tables: a field list plus one small pack/unpack driver.

The Identify structures and log pages are long runs of little-endian integers and
padded strings at offsets the spec (and the kernel's `include/linux/nvme.h`) fixes.
Writing each one out as a table keeps the offsets readable next to the kernel struct
and lets one driver, checked once, do the byte work for all of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Kind(Enum):
    INT = "int"  # unsigned little-endian integer of `size` bytes
    ASCII = "ascii"  # ASCII text, space padded (sn, mn, fr: the kernel pads with ' ')
    CSTR = "cstr"  # UTF-8 text, NUL padded (NQNs)
    ADDR = "addr"  # ASCII transport address/service id: NUL padded, like the kernel target
    BYTES = "bytes"  # raw bytes (GUIDs, EUI-64, TSAS); shorter values are zero padded


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    size: int
    kind: Kind = Kind.INT


@dataclass(frozen=True)
class Layout:
    """The fields of one structure of `size` bytes; bytes no field covers are reserved (0)."""

    size: int
    fields: tuple[Field, ...]

    def __post_init__(self) -> None:
        # A table typo must fail at import, not on the wire.
        end = 0
        for f in sorted(self.fields, key=lambda f: f.offset):
            if f.offset < end or f.offset + f.size > self.size or f.size <= 0:
                raise AssertionError(f"layout field {f.name} @{f.offset}+{f.size} overlaps "
                                     f"or leaves the {self.size}-byte structure")
            end = f.offset + f.size

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def offset(self, name: str) -> int:
        for f in self.fields:
            if f.name == name:
                return f.offset
        raise KeyError(name)

    def pack_into(self, buf: bytearray, base: int, values: Mapping[str, Any] | Any) -> None:
        """Write the fields of `values` (a mapping or an object with those attributes)."""
        get = values.__getitem__ if isinstance(values, Mapping) else values.__getattribute__
        for f in self.fields:
            buf[base + f.offset:base + f.offset + f.size] = _encode_field(f, get(f.name))

    def pack(self, values: Mapping[str, Any] | Any) -> bytes:
        buf = bytearray(self.size)
        self.pack_into(buf, 0, values)
        return bytes(buf)

    def unpack(self, b: bytes | memoryview, base: int = 0, what: str = "structure") -> dict[str, Any]:
        if len(b) < base + self.size:
            raise ValueError(f"{what} needs {self.size} bytes, got {max(len(b) - base, 0)}")
        return {f.name: _decode_field(f, b[base + f.offset:base + f.offset + f.size])
                for f in self.fields}


def _encode_field(f: Field, value: Any) -> bytes:
    if f.kind is Kind.INT:
        try:
            return int(value).to_bytes(f.size, "little")
        except OverflowError as e:
            raise ValueError(f"{f.name}={value!r} does not fit in {f.size} bytes") from e
    if f.kind is Kind.BYTES:
        raw = bytes(value)
    elif f.kind is Kind.ASCII:
        raw = str(value).encode("ascii")  # UnicodeEncodeError is a ValueError
        if len(raw) > f.size:
            raise ValueError(f"{f.name}={value!r} is longer than {f.size} bytes")
        return raw.ljust(f.size, b" ")
    elif f.kind is Kind.ADDR:
        raw = str(value).encode("ascii")
    else:
        raw = str(value).encode("utf-8")
    if len(raw) > f.size:
        raise ValueError(f"{f.name} is {len(raw)} bytes, the field holds {f.size}")
    return raw.ljust(f.size, b"\0")


def _decode_field(f: Field, b: bytes | memoryview) -> Any:
    if f.kind is Kind.INT:
        return int.from_bytes(b, "little")
    if f.kind is Kind.BYTES:
        return bytes(b)
    text = bytes(b).split(b"\0", 1)[0]
    if f.kind is Kind.ASCII:
        # Space padding is the rule; a NUL-padded peer (or ours, reading ourselves) also reads
        # back to the bare text.
        return text.rstrip(b" ").decode("ascii", errors="replace")
    if f.kind is Kind.ADDR:
        # libnvme strips trailing spaces too: some targets space-pad these fields.
        return text.rstrip(b" ").decode("ascii", errors="replace")
    return text.decode("utf-8", errors="replace")


def fields(*spec: tuple[Any, ...]) -> tuple[Field, ...]:
    """Build a field tuple from `(name, offset, size[, kind])` rows."""
    return tuple(Field(*row) for row in spec)


def pad_list(items: Iterable[Any], count: int, fill: Any, what: str) -> list[Any]:
    """A fixed-length array field as a list: pad with `fill`, refuse too many entries."""
    out = list(items)
    if len(out) > count:
        raise ValueError(f"{what} holds at most {count} entries, got {len(out)}")
    return out + [fill() for _ in range(count - len(out))]
