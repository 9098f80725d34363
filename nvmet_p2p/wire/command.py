"""Submission and completion queue entries, SGL descriptors and fabrics commands.

Bytes in, values out, and back: nothing here touches a queue, a socket or a file.
All multi-byte fields are little-endian, as on the wire.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from nvmet_p2p.wire.limits import NVME_CNTLID_DYNAMIC
from nvmet_p2p.wire.sqe_layout import SQE_SIZE

CQE_SIZE = 16
SGL_SIZE = 16
CONNECT_DATA_SIZE = 1024
NVME_DSM_RANGE = struct.Struct("<IIQ")  # context attributes, NLB (1's based), SLBA


class AdminOpcode(IntEnum):
    DELETE_SQ = 0x00
    CREATE_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_CQ = 0x04
    CREATE_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT = 0x0C
    KEEP_ALIVE = 0x18
    FABRICS = 0x7F


class IoOpcode(IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_ZEROES = 0x08
    DSM = 0x09
    FABRICS = 0x7F


class FabricsType(IntEnum):
    PROPERTY_SET = 0x00
    CONNECT = 0x01
    PROPERTY_GET = 0x04


class Psdt(IntEnum):
    """SQE flags bits 7:6: how the data pointer is to be read."""

    PRP = 0
    SGL_MPTR_CONTIG = 1
    SGL_MPTR_SGL = 2


class SglType(IntEnum):
    """Byte 15 of a descriptor: type in the high nibble, subtype in the low one."""

    DATA_BLOCK_OFFSET = 0x01  # in-capsule data, address is an offset
    KEYED_DATA_BLOCK = 0x40
    KEYED_DATA_BLOCK_INV = 0x4F  # keyed, and the host asks us to invalidate the key
    TRANSPORT_DATA_BLOCK = 0x5A  # NVMe/TCP: the data moves in the transport's own PDUs


@dataclass
class Sgl:
    """One SGL descriptor (16 bytes).  `key` is 0 for non-keyed types."""

    type: int = 0
    addr: int = 0
    length: int = 0
    key: int = 0

    @property
    def keyed(self) -> bool:
        return (self.type >> 4) == 0x4

    @property
    def transport(self) -> bool:
        return self.type == SglType.TRANSPORT_DATA_BLOCK

    @classmethod
    def decode(cls, b: bytes | memoryview) -> Sgl:
        if len(b) < SGL_SIZE:
            raise ValueError(f"SGL descriptor needs {SGL_SIZE} bytes, got {len(b)}")
        t = b[15]
        addr = int.from_bytes(b[0:8], "little")
        if (t >> 4) == 0x4:
            length = int.from_bytes(b[8:11], "little")
            key = int.from_bytes(b[11:15], "little")
            return cls(t, addr, length, key)
        return cls(t, addr, int.from_bytes(b[8:12], "little"), 0)

    def encode(self) -> bytes:
        if (self.type >> 4) == 0x4:
            return (self.addr.to_bytes(8, "little") + self.length.to_bytes(3, "little")
                    + self.key.to_bytes(4, "little") + bytes([self.type]))
        return struct.pack("<QI3xB", self.addr, self.length, self.type)


_SQE = struct.Struct("<BBHIIIQ16sIIIIII")


@dataclass
class Sqe:
    """A 64-byte submission queue entry.

    `dptr` holds the 16 raw bytes of the data pointer; `sgl` decodes it.  Fabrics
    commands reuse the same layout (`fctype` is byte 4, i.e. the low byte of `nsid`).
    """

    opcode: int = 0
    flags: int = 0
    cid: int = 0
    nsid: int = 0
    cdw2: int = 0
    cdw3: int = 0
    mptr: int = 0
    dptr: bytes = bytes(16)
    cdw10: int = 0
    cdw11: int = 0
    cdw12: int = 0
    cdw13: int = 0
    cdw14: int = 0
    cdw15: int = 0
    raw: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def decode(cls, b: bytes | memoryview) -> Sqe:
        if len(b) < SQE_SIZE:
            raise ValueError(f"SQE needs {SQE_SIZE} bytes, got {len(b)}")
        raw = bytes(b[:SQE_SIZE])
        sqe = cls(*_SQE.unpack(raw))
        sqe.raw = raw
        return sqe

    def encode(self) -> bytes:
        return _SQE.pack(self.opcode, self.flags, self.cid, self.nsid, self.cdw2, self.cdw3,
                         self.mptr, bytes(self.dptr), self.cdw10, self.cdw11, self.cdw12,
                         self.cdw13, self.cdw14, self.cdw15)

    @property
    def psdt(self) -> int:
        return (self.flags >> 6) & 0x3

    @property
    def fuse(self) -> int:
        return self.flags & 0x3

    @property
    def sgl(self) -> Sgl:
        return Sgl.decode(self.dptr)

    @property
    def fctype(self) -> int:
        return self.nsid & 0xFF

    def u8(self, off: int) -> int:
        return self.raw[off] if self.raw else self.encode()[off]

    def u16(self, off: int) -> int:
        return int.from_bytes((self.raw or self.encode())[off:off + 2], "little")

    def u32(self, off: int) -> int:
        return int.from_bytes((self.raw or self.encode())[off:off + 4], "little")

    def u64(self, off: int) -> int:
        return int.from_bytes((self.raw or self.encode())[off:off + 8], "little")


_CQE = struct.Struct("<QHHHH")


@dataclass
class Cqe:
    """A 16-byte completion: `status` is the 15-bit field (with DNR/More), `result` dw0-1."""

    result: int = 0
    sq_head: int = 0
    sq_id: int = 0
    cid: int = 0
    status: int = 0
    phase: int = 0

    @classmethod
    def decode(cls, b: bytes | memoryview) -> Cqe:
        if len(b) < CQE_SIZE:
            raise ValueError(f"CQE needs {CQE_SIZE} bytes, got {len(b)}")
        result, head, sqid, cid, st = _CQE.unpack(bytes(b[:CQE_SIZE]))
        return cls(result, head, sqid, cid, st >> 1, st & 1)

    def encode(self) -> bytes:
        return _CQE.pack(self.result, self.sq_head, self.sq_id, self.cid,
                         (self.status << 1) | (self.phase & 1))

    def encode_into(self, buf: bytearray | memoryview, offset: int) -> None:
        """`encode()` written straight into `buf` (a transport's response slot)."""
        _CQE.pack_into(buf, offset, self.result, self.sq_head, self.sq_id, self.cid,
                       (self.status << 1) | (self.phase & 1))


# -- fabrics commands ---------------------------------------------------------

def fabrics_sqe(fctype: int, cid: int = 0, sgl: Sgl | None = None, **fields: int) -> Sqe:
    """Build a fabrics SQE; `fields` are the fctype-specific ones (see the encoders)."""
    sqe = Sqe(opcode=AdminOpcode.FABRICS, flags=Psdt.SGL_MPTR_CONTIG << 6, cid=cid,
              nsid=fctype, dptr=(sgl or Sgl()).encode())
    raw = bytearray(sqe.encode())
    if fctype == FabricsType.CONNECT:
        struct.pack_into("<HHHBxI", raw, 40, fields.get("recfmt", 0), fields.get("qid", 0),
                         fields.get("sqsize", 0), fields.get("cattr", 0), fields.get("kato", 0))
    elif fctype in (FabricsType.PROPERTY_SET, FabricsType.PROPERTY_GET):
        struct.pack_into("<B3xI", raw, 40, fields.get("attrib", 0), fields.get("offset", 0))
        if fctype == FabricsType.PROPERTY_SET:
            struct.pack_into("<Q", raw, 48, fields.get("value", 0))
    return Sqe.decode(bytes(raw))


@dataclass
class ConnectCmd:
    """The Connect-specific fields of a fabrics SQE (bytes 40..51)."""

    recfmt: int
    qid: int
    sqsize: int  # 0's based
    cattr: int
    kato: int  # milliseconds

    @classmethod
    def from_sqe(cls, sqe: Sqe) -> ConnectCmd:
        recfmt, qid, sqsize, cattr, kato = struct.unpack_from("<HHHBxI", sqe.raw or sqe.encode(), 40)
        return cls(recfmt, qid, sqsize, cattr, kato)

    @property
    def disable_sqflow(self) -> bool:
        return bool(self.cattr & 0x4)  # CATTR bit 2: host disables SQ flow control


@dataclass
class PropertyCmd:
    attrib: int  # bits 2:0 size: 0 = 4 bytes, 1 = 8 bytes
    offset: int
    value: int = 0

    @classmethod
    def from_sqe(cls, sqe: Sqe) -> PropertyCmd:
        raw = sqe.raw or sqe.encode()
        attrib, offset = struct.unpack_from("<B3xI", raw, 40)
        (value,) = struct.unpack_from("<Q", raw, 48)
        return cls(attrib, offset, value)

    @property
    def size(self) -> int | None:
        """4 or 8 bytes; None for the reserved sizes 2..7 (Invalid Field)."""
        return {0: 4, 1: 8}.get(self.attrib & 0x7)


def _nqn_field(s: str) -> bytes:
    b = s.encode()
    if len(b) > 255:
        raise ValueError("NQN field holds at most 255 bytes")
    return b.ljust(256, b"\0")


def _cstr(b: bytes | memoryview) -> str:
    return bytes(b).split(b"\0", 1)[0].decode("utf-8", errors="replace")


@dataclass
class ConnectData:
    """The 1024-byte data of a Connect command."""

    hostid: bytes = bytes(16)
    cntlid: int = NVME_CNTLID_DYNAMIC
    subnqn: str = ""
    hostnqn: str = ""

    @classmethod
    def decode(cls, b: bytes | memoryview) -> ConnectData:
        if len(b) < CONNECT_DATA_SIZE:
            raise ValueError(f"Connect data needs {CONNECT_DATA_SIZE} bytes, got {len(b)}")
        return cls(bytes(b[0:16]), int.from_bytes(b[16:18], "little"),
                   _cstr(b[256:512]), _cstr(b[512:768]))

    def encode(self) -> bytes:
        out = bytearray(CONNECT_DATA_SIZE)
        out[0:16] = bytes(self.hostid).ljust(16, b"\0")[:16]
        out[16:18] = self.cntlid.to_bytes(2, "little")
        out[256:512] = _nqn_field(self.subnqn)
        out[512:768] = _nqn_field(self.hostnqn)
        return bytes(out)


# Connect Invalid Parameters: dword 0 of the response points at the bad field.
# Bits 23:16 IATTR (1 = in the Connect data, 0 = in the SQE), bits 15:0 IPO (byte offset),
# as the kernel's IPO_IATTR_CONNECT_DATA / IPO_IATTR_CONNECT_SQE build it.
def connect_invalid_result(in_data: bool, offset: int) -> int:
    return ((1 if in_data else 0) << 16) | offset

