"""The Identify data structures (4096 bytes each) and the Identify command's fields.

Owns: Identify Controller (`IdCtrl`, CNS 01h), Identify Namespace (`IdNs`, CNS 00h),
the active namespace ID list (CNS 02h) and the namespace identification descriptor
list (CNS 03h).  Field names and offsets follow the kernel's `struct nvme_id_ctrl` /
`struct nvme_id_ns` in include/linux/nvme.h, which is what a Linux host parses.
Bytes in, values out, and back; nothing here does I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from nvmet_p2p.wire.command import Sqe
from nvmet_p2p.wire.layout import Kind, Layout, fields, pad_list

IDENTIFY_DATA_SIZE = 4096  # every CNS this target answers transfers 4 KiB
NS_LIST_MAX = IDENTIFY_DATA_SIZE // 4  # 1024 NSIDs fit in one active NSID list
PSD_COUNT = 32  # power state descriptors in Identify Controller
LBAF_COUNT = 64  # NLBAF is 0's based up to 63 since NVMe 2.0 (kernel: lbaf[64])


class Cns(IntEnum):
    """Identify CDW10 bits 7:0: which structure to return (kernel NVME_ID_CNS_*)."""

    NS = 0x00
    CTRL = 0x01
    NS_ACTIVE_LIST = 0x02
    NS_DESC_LIST = 0x03
    CS_NS = 0x05
    CS_CTRL = 0x06
    NS_ACTIVE_LIST_CS = 0x07
    NS_CS_INDEP = 0x08
    NS_PRESENT_LIST = 0x10
    NS_PRESENT = 0x11
    CTRL_NS_LIST = 0x12
    CTRL_LIST = 0x13
    SCNDRY_CTRL_LIST = 0x15
    NS_GRANULARITY = 0x16
    UUID_LIST = 0x17
    ENDGRP_LIST = 0x19


class Csi(IntEnum):
    """Command set identifiers (namespace descriptor type 4, Identify CDW11 CSI)."""

    NVM = 0x00
    ZNS = 0x02


@dataclass
class IdentifyCmd:
    """The Identify fields of an SQE: CDW10 CNS/CNTID, CDW11 CNSSID/CSI."""

    cns: int
    cntid: int
    cnssid: int
    csi: int

    @classmethod
    def from_sqe(cls, sqe: Sqe) -> IdentifyCmd:
        return cls(sqe.cdw10 & 0xFF, sqe.cdw10 >> 16, sqe.cdw11 & 0xFFFF, sqe.cdw11 >> 24)


# -- Identify Controller --------------------------------------------------------

# Bits the kernel target and the Linux host use, named as in include/linux/nvme.h.
CTRL_ONCS_COMPARE = 1 << 0
CTRL_ONCS_WRITE_UNCORRECTABLE = 1 << 1
CTRL_ONCS_DSM = 1 << 2
CTRL_ONCS_WRITE_ZEROES = 1 << 3
CTRL_VWC_PRESENT = 1 << 0
CTRL_LPA_CMD_EFFECTS_LOG = 1 << 1
CTRL_LPA_EXTENDED_DATA = 1 << 2  # Get Log Page supports NUMDU and LPO
CTRL_CMIC_MULTI_PORT = 1 << 0
CTRL_CMIC_MULTI_CTRL = 1 << 1
CTRL_CMIC_ANA = 1 << 3
CTRL_SGLS_SUPPORTED = 1 << 0  # SGLs, byte aligned
CTRL_SGLS_KEYED = 1 << 2  # keyed SGL data block descriptors (RDMA)
CTRL_SGLS_OFFSET = 1 << 20  # the address field may be an offset (in-capsule data)
CTRL_CTRATT_128_ID = 1 << 0  # 128-bit host identifier
CTRL_OAES_NS_ATTR = 1 << 8  # namespace attribute notices
CTRL_OAES_ANA_CHANGE = 1 << 11
CTRL_OAES_DISC_CHANGE = 1 << 31


class CntrlType(IntEnum):
    IO = 1
    DISC = 2
    ADMIN = 3


POWER_STATE_LAYOUT = Layout(32, fields(
    ("max_power", 0, 2),  # centiwatts (or 0.0001 W with flags bit 0)
    ("flags", 3, 1),
    ("entry_lat", 4, 4),  # microseconds
    ("exit_lat", 8, 4),  # microseconds
    ("read_tput", 12, 1),
    ("read_lat", 13, 1),
    ("write_tput", 14, 1),
    ("write_lat", 15, 1),
    ("idle_power", 16, 2),
    ("idle_scale", 18, 1),
    ("active_power", 20, 2),
    ("active_work_scale", 22, 1),
))


@dataclass
class PowerState:
    """One 32-byte power state descriptor (kernel `struct nvme_id_power_state`)."""

    max_power: int = 0
    flags: int = 0
    entry_lat: int = 0
    exit_lat: int = 0
    read_tput: int = 0
    read_lat: int = 0
    write_tput: int = 0
    write_lat: int = 0
    idle_power: int = 0
    idle_scale: int = 0
    active_power: int = 0
    active_work_scale: int = 0


_PSD_OFFSET = 2048

ID_CTRL_LAYOUT = Layout(IDENTIFY_DATA_SIZE, fields(
    ("vid", 0, 2),
    ("ssvid", 2, 2),
    ("sn", 4, 20, Kind.ASCII),
    ("mn", 24, 40, Kind.ASCII),
    ("fr", 64, 8, Kind.ASCII),
    ("rab", 72, 1),
    ("ieee", 73, 3),  # IEEE OUI, least significant byte first
    ("cmic", 76, 1),
    ("mdts", 77, 1),  # max transfer = 2^mdts * CAP.MPSMIN pages; 0 = no limit
    ("cntlid", 78, 2),
    ("ver", 80, 4),
    ("rtd3r", 84, 4),
    ("rtd3e", 88, 4),
    ("oaes", 92, 4),
    ("ctratt", 96, 4),
    ("cntrltype", 111, 1),
    ("fguid", 112, 16, Kind.BYTES),
    ("crdt1", 128, 2),
    ("crdt2", 130, 2),
    ("crdt3", 132, 2),
    ("oacs", 256, 2),
    ("acl", 258, 1),
    ("aerl", 259, 1),  # 0's based: outstanding AERs allowed - 1
    ("frmw", 260, 1),
    ("lpa", 261, 1),
    ("elpe", 262, 1),  # 0's based error log entries
    ("npss", 263, 1),
    ("avscc", 264, 1),
    ("apsta", 265, 1),
    ("wctemp", 266, 2),
    ("cctemp", 268, 2),
    ("mtfa", 270, 2),
    ("hmpre", 272, 4),
    ("hmmin", 276, 4),
    ("tnvmcap", 280, 16),
    ("unvmcap", 296, 16),
    ("rpmbs", 312, 4),
    ("edstt", 316, 2),
    ("dsto", 318, 1),
    ("fwug", 319, 1),
    ("kas", 320, 2),  # keep-alive granularity, 100 ms units
    ("hctma", 322, 2),
    ("mntmt", 324, 2),
    ("mxtmt", 326, 2),
    ("sanicap", 328, 4),
    ("hmminds", 332, 4),
    ("hmmaxd", 336, 2),
    ("nvmsetidmax", 338, 2),
    ("endgidmax", 340, 2),
    ("anatt", 342, 1),
    ("anacap", 343, 1),
    ("anagrpmax", 344, 4),
    ("nanagrpid", 348, 4),
    ("sqes", 512, 1),  # bits 3:0 required, 7:4 maximum entry size, log2
    ("cqes", 513, 1),
    ("maxcmd", 514, 2),
    ("nn", 516, 4),
    ("oncs", 520, 2),
    ("fuses", 522, 2),
    ("fna", 524, 1),
    ("vwc", 525, 1),
    ("awun", 526, 2),
    ("awupf", 528, 2),
    ("nvscc", 530, 1),
    ("nwpc", 531, 1),
    ("acwu", 532, 2),
    ("sgls", 536, 4),
    ("mnan", 540, 4),
    ("subnqn", 768, 256, Kind.CSTR),
    ("ioccsz", 1792, 4),  # I/O command capsule size, 16-byte units (SQE + in-capsule data)
    ("iorcsz", 1796, 4),  # I/O response capsule size, 16-byte units
    ("icdoff", 1800, 2),
    ("fcatt", 1802, 1),  # kernel: ctrattr; bit 0 = static controller model
    ("msdbd", 1803, 1),  # SGL descriptors per command; 1 for the kernel target
    ("ofcs", 1804, 2),
    ("dctype", 1806, 1),
))


@dataclass
class IdCtrl:
    """Identify Controller data (kernel `struct nvme_id_ctrl`); `psd` has 32 entries."""

    vid: int = 0
    ssvid: int = 0
    sn: str = ""
    mn: str = ""
    fr: str = ""
    rab: int = 0
    ieee: int = 0
    cmic: int = 0
    mdts: int = 0
    cntlid: int = 0
    ver: int = 0
    rtd3r: int = 0
    rtd3e: int = 0
    oaes: int = 0
    ctratt: int = 0
    cntrltype: int = 0
    fguid: bytes = bytes(16)
    crdt1: int = 0
    crdt2: int = 0
    crdt3: int = 0
    oacs: int = 0
    acl: int = 0
    aerl: int = 0
    frmw: int = 0
    lpa: int = 0
    elpe: int = 0
    npss: int = 0
    avscc: int = 0
    apsta: int = 0
    wctemp: int = 0
    cctemp: int = 0
    mtfa: int = 0
    hmpre: int = 0
    hmmin: int = 0
    tnvmcap: int = 0
    unvmcap: int = 0
    rpmbs: int = 0
    edstt: int = 0
    dsto: int = 0
    fwug: int = 0
    kas: int = 0
    hctma: int = 0
    mntmt: int = 0
    mxtmt: int = 0
    sanicap: int = 0
    hmminds: int = 0
    hmmaxd: int = 0
    nvmsetidmax: int = 0
    endgidmax: int = 0
    anatt: int = 0
    anacap: int = 0
    anagrpmax: int = 0
    nanagrpid: int = 0
    sqes: int = 0
    cqes: int = 0
    maxcmd: int = 0
    nn: int = 0
    oncs: int = 0
    fuses: int = 0
    fna: int = 0
    vwc: int = 0
    awun: int = 0
    awupf: int = 0
    nvscc: int = 0
    nwpc: int = 0
    acwu: int = 0
    sgls: int = 0
    mnan: int = 0
    subnqn: str = ""
    ioccsz: int = 0
    iorcsz: int = 0
    icdoff: int = 0
    fcatt: int = 0
    msdbd: int = 0
    ofcs: int = 0
    dctype: int = 0
    psd: list[PowerState] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.psd = pad_list(self.psd, PSD_COUNT, PowerState, "psd")

    def encode(self) -> bytes:
        buf = bytearray(ID_CTRL_LAYOUT.pack(self))
        # re-checked here: `psd` may have been reassigned after construction
        for i, ps in enumerate(pad_list(self.psd, PSD_COUNT, PowerState, "psd")):
            POWER_STATE_LAYOUT.pack_into(buf, _PSD_OFFSET + 32 * i, ps)
        return bytes(buf)

    @classmethod
    def decode(cls, b: bytes | memoryview) -> IdCtrl:
        values: dict[str, Any] = ID_CTRL_LAYOUT.unpack(b, what="Identify Controller")
        values["psd"] = [PowerState(**POWER_STATE_LAYOUT.unpack(b, _PSD_OFFSET + 32 * i))
                         for i in range(PSD_COUNT)]
        return cls(**values)


# -- Identify Namespace ---------------------------------------------------------

NS_FEAT_THIN = 1 << 0
NS_FEAT_ATOMICS = 1 << 1
NS_FEAT_IO_OPT = 1 << 4  # NPWG/NPWA/NPDG/NPDA/NOWS are valid
NS_NMIC_SHARED = 1 << 0
NS_ATTR_RO = 1 << 0
FLBAS_LBA_MASK = 0xF


LBAF_LAYOUT = Layout(4, fields(("ms", 0, 2), ("ds", 2, 1), ("rp", 3, 1)))
_LBAF_OFFSET = 128


@dataclass
class Lbaf:
    """An LBA format: metadata bytes, log2 of the LBA data size, relative performance."""

    ms: int = 0
    ds: int = 0
    rp: int = 0


ID_NS_LAYOUT = Layout(IDENTIFY_DATA_SIZE, fields(
    ("nsze", 0, 8),
    ("ncap", 8, 8),
    ("nuse", 16, 8),
    ("nsfeat", 24, 1),
    ("nlbaf", 25, 1),  # 0's based number of LBA formats
    ("flbas", 26, 1),  # bits 3:0 (and 6:5 since NVMe 2.0) index the LBA format in use
    ("mc", 27, 1),
    ("dpc", 28, 1),
    ("dps", 29, 1),
    ("nmic", 30, 1),
    ("rescap", 31, 1),
    ("fpi", 32, 1),
    ("dlfeat", 33, 1),
    ("nawun", 34, 2),
    ("nawupf", 36, 2),
    ("nacwu", 38, 2),
    ("nabsn", 40, 2),
    ("nabo", 42, 2),
    ("nabspf", 44, 2),
    ("noiob", 46, 2),
    ("nvmcap", 48, 16),
    ("npwg", 64, 2),
    ("npwa", 66, 2),
    ("npdg", 68, 2),
    ("npda", 70, 2),
    ("nows", 72, 2),
    ("anagrpid", 92, 4),
    ("nsattr", 99, 1),
    ("nvmsetid", 100, 2),
    ("endgid", 102, 2),
    ("nguid", 104, 16, Kind.BYTES),
    ("eui64", 120, 8, Kind.BYTES),
))


@dataclass
class IdNs:
    """Identify Namespace data (kernel `struct nvme_id_ns`); `lbaf` has 64 entries."""

    nsze: int = 0
    ncap: int = 0
    nuse: int = 0
    nsfeat: int = 0
    nlbaf: int = 0
    flbas: int = 0
    mc: int = 0
    dpc: int = 0
    dps: int = 0
    nmic: int = 0
    rescap: int = 0
    fpi: int = 0
    dlfeat: int = 0
    nawun: int = 0
    nawupf: int = 0
    nacwu: int = 0
    nabsn: int = 0
    nabo: int = 0
    nabspf: int = 0
    noiob: int = 0
    nvmcap: int = 0
    npwg: int = 0
    npwa: int = 0
    npdg: int = 0
    npda: int = 0
    nows: int = 0
    anagrpid: int = 0
    nsattr: int = 0
    nvmsetid: int = 0
    endgid: int = 0
    nguid: bytes = bytes(16)
    eui64: bytes = bytes(8)
    lbaf: list[Lbaf] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lbaf = pad_list(self.lbaf, LBAF_COUNT, Lbaf, "lbaf")

    @property
    def lba_shift(self) -> int:
        """log2 of the LBA size in use (the format FLBAS selects)."""
        return self.lbaf[(self.flbas & FLBAS_LBA_MASK) | ((self.flbas & 0x60) >> 1)].ds

    def encode(self) -> bytes:
        buf = bytearray(ID_NS_LAYOUT.pack(self))
        for i, lbaf in enumerate(pad_list(self.lbaf, LBAF_COUNT, Lbaf, "lbaf")):
            LBAF_LAYOUT.pack_into(buf, _LBAF_OFFSET + 4 * i, lbaf)
        return bytes(buf)

    @classmethod
    def decode(cls, b: bytes | memoryview) -> IdNs:
        values: dict[str, Any] = ID_NS_LAYOUT.unpack(b, what="Identify Namespace")
        values["lbaf"] = [Lbaf(**LBAF_LAYOUT.unpack(b, _LBAF_OFFSET + 4 * i)) for i in range(LBAF_COUNT)]
        return cls(**values)


# -- CNS 02h: active namespace ID list ----------------------------------------------

def active_ns_list(nsids: list[int], start_after: int) -> bytes:
    """The active NSID list: up to 1024 NSIDs greater than `start_after`, ascending.

    `start_after` is the command's NSID; 0xFFFFFFFE and 0xFFFFFFFF are the caller's
    to refuse (Invalid Namespace), since this returns data, not status.
    """
    picked = sorted(n for n in set(nsids) if n > start_after)[:NS_LIST_MAX]
    if picked and picked[-1] > 0xFFFFFFFF:
        raise ValueError(f"NSID {picked[-1]:#x} does not fit in 32 bits")
    return struct.pack(f"<{len(picked)}I", *picked).ljust(IDENTIFY_DATA_SIZE, b"\0")


def decode_ns_list(b: bytes | memoryview) -> list[int]:
    """NSIDs of an NSID list (active NS list, changed NS log), up to the first 0."""
    if len(b) % 4:
        raise ValueError(f"an NSID list is a whole number of dwords, got {len(b)} bytes")
    out = []
    for (nsid,) in struct.iter_unpack("<I", bytes(b)):
        if nsid == 0:
            break
        out.append(nsid)
    return out


# -- CNS 03h: namespace identification descriptor list --------------------------------

class Nidt(IntEnum):
    EUI64 = 0x01
    NGUID = 0x02
    UUID = 0x03
    CSI = 0x04


_NIDL = {Nidt.EUI64: 8, Nidt.NGUID: 16, Nidt.UUID: 16, Nidt.CSI: 1}
_NID_KEY = {Nidt.EUI64: "eui64", Nidt.NGUID: "nguid", Nidt.UUID: "uuid", Nidt.CSI: "csi"}


def ns_desc_list(eui64: bytes | None = None, nguid: bytes | None = None,
                 uuid: bytes | None = None, csi: int | None = None) -> bytes:
    """The descriptor list: header nidt u8, nidl u8, 2 reserved, then nidl bytes of id."""
    out = bytearray()
    for nidt, value in ((Nidt.EUI64, eui64), (Nidt.NGUID, nguid), (Nidt.UUID, uuid),
                        (Nidt.CSI, csi)):
        if value is None:
            continue
        nid = bytes([value]) if isinstance(value, int) else bytes(value)  # int: the CSI
        if len(nid) != _NIDL[nidt]:
            raise ValueError(f"{_NID_KEY[nidt]} must be {_NIDL[nidt]} bytes, got {len(nid)}")
        out += bytes([nidt, len(nid), 0, 0]) + nid
    return bytes(out).ljust(IDENTIFY_DATA_SIZE, b"\0")


def decode_ns_desc_list(b: bytes | memoryview) -> dict[str, Any]:
    """{'eui64'|'nguid'|'uuid': bytes, 'csi': int} for the descriptors present.

    Unknown descriptor types are skipped by their length; a descriptor running past
    the buffer or a known type with the wrong length is a ValueError.
    """
    b = bytes(b)
    out: dict[str, Any] = {}
    pos = 0
    while pos + 4 <= len(b):
        nidt, nidl = b[pos], b[pos + 1]
        if nidt == 0:
            break
        nid = b[pos + 4:pos + 4 + nidl]
        if len(nid) != nidl:
            raise ValueError(f"descriptor at {pos} runs past the {len(b)}-byte list")
        if nidt in _NIDL:
            if nidl != _NIDL[Nidt(nidt)]:
                raise ValueError(f"descriptor type {nidt} with length {nidl}")
            out[_NID_KEY[Nidt(nidt)]] = nid[0] if nidt == Nidt.CSI else nid
        pos += 4 + nidl
    return out
