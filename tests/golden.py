"""Golden byte tables for the wire-format tests, written from the spec's offsets."""


def golden(size: int, parts: dict[int, str]) -> bytes:
    """`size` zero bytes with hex strings placed at their offsets."""
    buf = bytearray(size)
    for off, hx in parts.items():
        raw = bytes.fromhex(hx)
        assert off + len(raw) <= size
        buf[off:off + len(raw)] = raw
    return bytes(buf)
