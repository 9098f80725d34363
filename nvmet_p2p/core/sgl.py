"""Where a command's data lives: the rules for its single SGL descriptor.

Transports call `map_sgl` once the core has parsed a command and knows how many
bytes it moves (`transfer_len`).  The rules follow the kernel target
(`nvmet_rdma_map_sgl` and `nvmet_check_transfer_len`): one descriptor (MSDBD = 1),
in-capsule data only for host-to-controller transfers and only inside the
in-capsule area, keyed descriptors only where the transport supports them, and
transport data blocks (NVMe/TCP: the data follows in R2T/H2CData or C2HData PDUs)
only where the transport moves data in its own PDUs (`nvmet_tcp_map_data`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from nvmet_p2p.wire.command import Sgl, SglType
from nvmet_p2p.wire.status import DNR, Status


class SglKind(Enum):
    NONE = 0  # no data (zero-length descriptor)
    INLINE = 1  # in-capsule data at `offset`
    KEYED = 2  # host memory: addr + key (RDMA)
    TRANSPORT = 3  # data in the transport's own PDUs (NVMe/TCP)


@dataclass
class DataMap:
    kind: SglKind
    length: int = 0
    offset: int = 0  # INLINE: offset into the in-capsule data area
    addr: int = 0  # KEYED: remote address
    key: int = 0  # KEYED: rkey
    invalidate: bool = False  # KEYED 0x4F: reply with SEND_WITH_INV(key)


def map_sgl(sgl: Sgl, *, transfer_len: int, host_write: bool, inline_data_size: int,
            capsule_data_len: int, keyed_sgls: bool, max_transfer: int,
            transport_sgls: bool = False) -> DataMap | int:
    """Validate `sgl` for a command that moves `transfer_len` bytes.

    Returns a DataMap, or an NVMe status (with DNR) for the completion.
    `capsule_data_len` is how many in-capsule bytes actually arrived; Python ints
    cannot wrap, so `offset + length` is checked as the true sum (the kernel had to
    guard against 32-bit wrap-around here).
    """
    sgl_type, subtype = sgl.type >> 4, sgl.type & 0xF
    if sgl_type == 0x0:  # data block
        if subtype != 0x1:  # only the offset subtype (in-capsule data) is meaningful here
            return Status.INVALID_FIELD | DNR
        if not host_write and sgl.length:
            return Status.INVALID_FIELD | DNR  # in-capsule data flows host-to-controller only
        end = sgl.addr + sgl.length
        if end > inline_data_size or end > capsule_data_len:
            return Status.SGL_INVALID_OFFSET | DNR
        if sgl.length != transfer_len:
            return Status.SGL_INVALID_DATA | DNR
        if not sgl.length:
            return DataMap(SglKind.NONE)
        return DataMap(SglKind.INLINE, length=sgl.length, offset=sgl.addr)
    if sgl_type == 0x4 and keyed_sgls:
        if subtype not in (0x0, 0xF):
            return Status.INVALID_FIELD | DNR
        if sgl.length > max_transfer:
            return Status.SGL_INVALID_DATA | DNR
        if sgl.length != transfer_len:
            return Status.SGL_INVALID_DATA | DNR
        if not sgl.length:  # no data: nothing to invalidate either, as in the kernel
            return DataMap(SglKind.NONE)
        return DataMap(SglKind.KEYED, length=sgl.length, addr=sgl.addr, key=sgl.key,
                       invalidate=subtype == 0xF)
    if sgl.type == SglType.TRANSPORT_DATA_BLOCK and transport_sgls:
        if sgl.length > max_transfer or sgl.length != transfer_len:
            return Status.SGL_INVALID_DATA | DNR
        if not sgl.length:
            return DataMap(SglKind.NONE)
        return DataMap(SglKind.TRANSPORT, length=sgl.length)
    return Status.SGL_INVALID_TYPE | DNR
