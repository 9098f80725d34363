"""Log pages and the Get Log Page command's fields.

Owns: log page identifiers, `GetLogPageCmd` (the fields of CDW10-14), the supported
log pages, error information, SMART / health, firmware slot, changed namespace list, command effects
and ANA log pages, the discovery log page (header + entries, with the transport
constants its entries carry), and `slice_log`, which cuts the part of a page a Get
Log Page asks for.  Layouts follow the kernel's include/linux/nvme.h.  Bytes in,
values out, and back; nothing here does I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any

from nvmet_p2p.wire.command import Sqe
from nvmet_p2p.wire.identify import decode_ns_list
from nvmet_p2p.wire.layout import Kind, Layout, fields, pad_list
from nvmet_p2p.wire.limits import (
    NVME_AQ_DEPTH,
    NVME_CNTLID_DYNAMIC,
    NVME_MAX_CHANGED_NAMESPACES,
    NVMET_MAX_TRANSFER,
)


class LogId(IntEnum):
    """Get Log Page CDW10 bits 7:0 (kernel NVME_LOG_*)."""

    SUPPORTED = 0x00
    ERROR = 0x01
    SMART = 0x02
    FW_SLOT = 0x03
    CHANGED_NS = 0x04
    CMD_EFFECTS = 0x05
    ANA = 0x0C
    DISC = 0x70


@dataclass
class GetLogPageCmd:
    """The Get Log Page fields of an SQE.  `numd` is 0's based; `length` is in bytes."""

    lid: int
    lsp: int
    rae: bool  # retain asynchronous event: reading the log does not clear the AEN
    numd: int
    lsi: int
    lpo: int
    csi: int

    @classmethod
    def from_sqe(cls, sqe: Sqe) -> GetLogPageCmd:
        return cls(
            lid=sqe.cdw10 & 0xFF,
            lsp=(sqe.cdw10 >> 8) & 0x7F,
            rae=bool(sqe.cdw10 & (1 << 15)),
            numd=(sqe.cdw10 >> 16) | ((sqe.cdw11 & 0xFFFF) << 16),  # NUMDL | NUMDU << 16
            lsi=sqe.cdw11 >> 16,
            lpo=sqe.cdw12 | (sqe.cdw13 << 32),
            csi=sqe.cdw14 >> 24,
        )

    @property
    def length(self) -> int:
        return (self.numd + 1) * 4


# The kernel target's MDTS: no log reply we build is longer, so a larger request is
# refused rather than zero-filled (NUMD can ask for 16 GiB).
MAX_LOG_LEN = NVMET_MAX_TRANSFER


def slice_log(page: bytes, lpo: int, length: int, limit: int = MAX_LOG_LEN) -> bytes | None:
    """The `length` bytes of `page` from byte `lpo`, zero-filled past its end.

    None means Invalid Field in Command: LPO not dword aligned, LPO past the end of the
    page (LPO == len(page) is allowed and reads zeros, as the kernel does since its
    discovery log fix), or a length that is not positive or above `limit`.
    """
    if lpo % 4 or lpo < 0 or lpo > len(page) or length <= 0 or length > limit:
        return None
    return page[lpo:lpo + length].ljust(length, b"\0")


# -- supported log pages (00h) ---------------------------------------------------------

SUPPORTED_LOG_SIZE = 1024  # one 32-bit LID descriptor for each of the 256 LIDs
LIDS = 256


class LidSupport(IntFlag):
    """A LID Supported and Effects descriptor (kernel NVME_LIDS_*); bits 31:16 are the
    log page's own parameters (LIDSP)."""

    LSUPP = 1 << 0  # the log page is supported
    IOS = 1 << 1  # index offset supported: LPO may count entries instead of bytes


@dataclass
class SupportedLogPages:
    """The Supported Log Pages log: `lids[lid]` is the descriptor of each LID that has
    one (a LID left out reads 0, not supported)."""

    lids: dict[int, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        words = [0] * LIDS
        for lid, desc in self.lids.items():
            if not 0 <= lid < LIDS:
                raise ValueError(f"log identifier {lid} is not 0..{LIDS - 1}")
            words[lid] = desc
        try:
            return struct.pack(f"<{LIDS}I", *words)
        except struct.error as e:
            raise ValueError(f"LID descriptors must be 32-bit: {e}") from e

    @classmethod
    def decode(cls, b: bytes | memoryview) -> SupportedLogPages:
        if len(b) < SUPPORTED_LOG_SIZE:
            raise ValueError(f"supported log pages log needs {SUPPORTED_LOG_SIZE} bytes, "
                             f"got {len(b)}")
        words = struct.unpack_from(f"<{LIDS}I", b)
        return cls({lid: desc for lid, desc in enumerate(words) if desc})


# -- error information (01h) ----------------------------------------------------------

ERROR_LOG_ENTRY_SIZE = 64

ERROR_ENTRY_LAYOUT = Layout(ERROR_LOG_ENTRY_SIZE, fields(
    ("error_count", 0, 8),
    ("sqid", 8, 2),
    ("cmdid", 10, 2),
    ("status_field", 12, 2),  # bits 15:1 the status (as in a CQE), bit 0 the phase tag
    ("param_error_location", 14, 2),  # bits 7:0 byte, 10:8 bit of the offending field
    ("lba", 16, 8),
    ("nsid", 24, 4),
    ("vs", 28, 1),
    ("trtype", 29, 1),
    ("cs", 32, 8),
    ("trtype_spec_info", 40, 2),
))


@dataclass
class ErrorLogEntry:
    """One 64-byte error information entry; error_count 0 marks an unused slot."""

    error_count: int = 0
    sqid: int = 0
    cmdid: int = 0
    status_field: int = 0
    param_error_location: int = 0
    lba: int = 0
    nsid: int = 0
    vs: int = 0
    trtype: int = 0
    cs: int = 0
    trtype_spec_info: int = 0

    @property
    def status(self) -> int:
        """The 15-bit status (with DNR/More); `status_field` holds it shifted left by one,
        as the kernel's `status << 1` fills it."""
        return self.status_field >> 1

    def encode(self) -> bytes:
        return ERROR_ENTRY_LAYOUT.pack(self)

    @classmethod
    def decode(cls, b: bytes | memoryview) -> ErrorLogEntry:
        return cls(**ERROR_ENTRY_LAYOUT.unpack(b, what="error log entry"))


def error_log(entries: list[ErrorLogEntry], slots: int) -> bytes:
    """`slots` (ELPE + 1) entries, newest first as given, unused slots zero."""
    if len(entries) > slots:
        raise ValueError(f"{len(entries)} error entries for {slots} slots")
    return b"".join(e.encode() for e in entries).ljust(slots * ERROR_LOG_ENTRY_SIZE, b"\0")


def decode_error_log(b: bytes | memoryview) -> list[ErrorLogEntry]:
    """The used entries (error_count != 0) of an error log page."""
    if len(b) % ERROR_LOG_ENTRY_SIZE:
        raise ValueError(f"error log is whole 64-byte entries, got {len(b)} bytes")
    out = [ErrorLogEntry.decode(b[i:i + ERROR_LOG_ENTRY_SIZE])
           for i in range(0, len(b), ERROR_LOG_ENTRY_SIZE)]
    return [e for e in out if e.error_count]


# -- SMART / health information (02h) ---------------------------------------------------

SMART_LOG_SIZE = 512
TEMP_SENSORS = 8

SMART_CRIT_SPARE = 1 << 0
SMART_CRIT_TEMPERATURE = 1 << 1
SMART_CRIT_RELIABILITY = 1 << 2
SMART_CRIT_MEDIA = 1 << 3  # read-only
SMART_CRIT_VOLATILE_MEMORY = 1 << 4

SMART_LAYOUT = Layout(SMART_LOG_SIZE, fields(
    ("critical_warning", 0, 1),
    ("temperature", 1, 2),  # Kelvin
    ("avail_spare", 3, 1),  # percent
    ("spare_thresh", 4, 1),
    ("percent_used", 5, 1),
    ("endu_grp_crit_warn_sumry", 6, 1),
    ("data_units_read", 32, 16),  # thousands of 512-byte units, rounded up
    ("data_units_written", 48, 16),
    ("host_reads", 64, 16),  # commands
    ("host_writes", 80, 16),
    ("ctrl_busy_time", 96, 16),  # minutes
    ("power_cycles", 112, 16),
    ("power_on_hours", 128, 16),
    ("unsafe_shutdowns", 144, 16),
    ("media_errors", 160, 16),
    ("num_err_log_entries", 176, 16),
    ("warning_temp_time", 192, 4),
    ("critical_comp_time", 196, 4),
    ("thm_temp1_trans_count", 216, 4),
    ("thm_temp2_trans_count", 220, 4),
    ("thm_temp1_total_time", 224, 4),
    ("thm_temp2_total_time", 228, 4),
))
_TEMP_SENSOR_OFFSET = 200


def data_units(nbytes: int) -> int:
    """A byte count as SMART data units: 1000 units of 512 bytes, rounded up."""
    return -(-nbytes // (512 * 1000))


@dataclass
class SmartLog:
    """The SMART / health information log (kernel `struct nvme_smart_log`)."""

    critical_warning: int = 0
    temperature: int = 0
    avail_spare: int = 0
    spare_thresh: int = 0
    percent_used: int = 0
    endu_grp_crit_warn_sumry: int = 0
    data_units_read: int = 0
    data_units_written: int = 0
    host_reads: int = 0
    host_writes: int = 0
    ctrl_busy_time: int = 0
    power_cycles: int = 0
    power_on_hours: int = 0
    unsafe_shutdowns: int = 0
    media_errors: int = 0
    num_err_log_entries: int = 0
    warning_temp_time: int = 0
    critical_comp_time: int = 0
    temp_sensor: list[int] = field(default_factory=list)  # Kelvin, 0 = not implemented
    thm_temp1_trans_count: int = 0
    thm_temp2_trans_count: int = 0
    thm_temp1_total_time: int = 0
    thm_temp2_total_time: int = 0

    def __post_init__(self) -> None:
        self.temp_sensor = pad_list(self.temp_sensor, TEMP_SENSORS, int, "temp_sensor")

    def encode(self) -> bytes:
        buf = bytearray(SMART_LAYOUT.pack(self))
        try:
            struct.pack_into(f"<{TEMP_SENSORS}H", buf, _TEMP_SENSOR_OFFSET,
                             *pad_list(self.temp_sensor, TEMP_SENSORS, int, "temp_sensor"))
        except struct.error as e:
            raise ValueError(f"temp_sensor {self.temp_sensor}: {e}") from e
        return bytes(buf)

    @classmethod
    def decode(cls, b: bytes | memoryview) -> SmartLog:
        values: dict[str, Any] = SMART_LAYOUT.unpack(b, what="SMART log")
        values["temp_sensor"] = list(struct.unpack_from(f"<{TEMP_SENSORS}H", b,
                                                        _TEMP_SENSOR_OFFSET))
        return cls(**values)


# -- firmware slot information (03h) ----------------------------------------------------

FW_SLOT_LOG_SIZE = 512
FW_SLOTS = 7


@dataclass
class FwSlotLog:
    """Active firmware info and the revision (8 ASCII bytes) of each of the 7 slots."""

    afi: int = 0  # bits 2:0 active slot, bits 6:4 slot active after the next reset
    frs: list[str] = field(default_factory=list)  # "" = slot empty (all zero bytes)

    def __post_init__(self) -> None:
        self.frs = pad_list(self.frs, FW_SLOTS, str, "frs")

    def encode(self) -> bytes:
        out = bytearray(FW_SLOT_LOG_SIZE)
        out[0] = self.afi
        for i, rev in enumerate(pad_list(self.frs, FW_SLOTS, str, "frs")):
            raw = rev.encode("ascii")
            if len(raw) > 8:
                raise ValueError(f"firmware revision {rev!r} is longer than 8 bytes")
            # ASCII fields are space padded; an empty slot is all zeros per the spec.
            out[8 + 8 * i:16 + 8 * i] = raw.ljust(8, b" ") if raw else bytes(8)
        return bytes(out)

    @classmethod
    def decode(cls, b: bytes | memoryview) -> FwSlotLog:
        if len(b) < FW_SLOT_LOG_SIZE:
            raise ValueError(f"firmware slot log needs {FW_SLOT_LOG_SIZE} bytes, got {len(b)}")
        frs = [bytes(b[8 + 8 * i:16 + 8 * i]).split(b"\0", 1)[0].rstrip(b" ")
               .decode("ascii", errors="replace") for i in range(FW_SLOTS)]
        return cls(b[0], frs)


# -- changed namespace list (04h) -------------------------------------------------------

CHANGED_NS_LOG_SIZE = 4096
CHANGED_NS_OVERFLOW = 0xFFFFFFFF  # sole entry when more than 1024 namespaces changed


def changed_ns_list(nsids: list[int]) -> bytes:
    """The changed namespace list: the NSIDs ascending, or 0xFFFFFFFF if over 1024."""
    picked = sorted(set(nsids))
    if len(picked) > NVME_MAX_CHANGED_NAMESPACES:
        picked = [CHANGED_NS_OVERFLOW]
    try:
        return struct.pack(f"<{len(picked)}I", *picked).ljust(CHANGED_NS_LOG_SIZE, b"\0")
    except struct.error as e:
        raise ValueError(f"NSIDs must be 32-bit: {e}") from e


def decode_changed_ns_list(b: bytes | memoryview) -> list[int]:
    """The NSIDs of a changed namespace list ([0xFFFFFFFF] means 'more than 1024')."""
    return decode_ns_list(b)


# -- commands supported and effects (05h) ------------------------------------------------

CMD_EFFECTS_LOG_SIZE = 4096


class CmdEffects(IntFlag):
    CSUPP = 1 << 0  # command supported
    LBCC = 1 << 1  # logical block content may change
    NCC = 1 << 2  # namespace capability may change
    NIC = 1 << 3  # namespace inventory may change
    CCC = 1 << 4  # controller capability may change


@dataclass
class CmdEffectsLog:
    """`acs[opcode]` for admin commands, `iocs[opcode]` for I/O commands (256 each)."""

    acs: list[int] = field(default_factory=list)
    iocs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.acs = pad_list(self.acs, 256, int, "acs")
        self.iocs = pad_list(self.iocs, 256, int, "iocs")

    def encode(self) -> bytes:
        try:
            words = pad_list(self.acs, 256, int, "acs") + pad_list(self.iocs, 256, int, "iocs")
            return struct.pack("<512I", *words).ljust(CMD_EFFECTS_LOG_SIZE, b"\0")
        except struct.error as e:
            raise ValueError(f"command effects must be 32-bit: {e}") from e

    @classmethod
    def decode(cls, b: bytes | memoryview) -> CmdEffectsLog:
        if len(b) < CMD_EFFECTS_LOG_SIZE:
            raise ValueError(f"command effects log needs {CMD_EFFECTS_LOG_SIZE} bytes, "
                             f"got {len(b)}")
        words = struct.unpack_from("<512I", b)
        return cls(list(words[:256]), list(words[256:]))


# -- asymmetric namespace access (0Ch) ---------------------------------------------------

class AnaState(IntEnum):
    OPTIMIZED = 0x01
    NONOPTIMIZED = 0x02
    INACCESSIBLE = 0x03
    PERSISTENT_LOSS = 0x04
    CHANGE = 0x0F


ANA_LOG_RGO = 1 << 0  # LSP bit: return groups only, no NSID lists


@dataclass
class AnaGroupDesc:
    """One ANA group descriptor: 32-byte header then the group's NSIDs."""

    grpid: int
    state: int
    chgcnt: int = 0
    nsids: list[int] = field(default_factory=list)


_ANA_HDR = struct.Struct("<QH6x")  # chgcnt, ngrps
_ANA_DESC = struct.Struct("<IIQB15x")  # grpid, nnsids, chgcnt, state


def ana_log(chgcnt: int, groups: list[AnaGroupDesc], rgo: bool = False) -> bytes:
    """The ANA log page; with `rgo` (LSP bit 0) the NSID lists are left out."""
    try:
        out = bytearray(_ANA_HDR.pack(chgcnt, len(groups)))
        for g in groups:
            nsids = [] if rgo else sorted(g.nsids)
            out += _ANA_DESC.pack(g.grpid, len(nsids), g.chgcnt, g.state)
            out += struct.pack(f"<{len(nsids)}I", *nsids)
    except struct.error as e:
        raise ValueError(f"ANA log field out of range: {e}") from e
    return bytes(out)


def decode_ana_log(b: bytes | memoryview) -> tuple[int, list[AnaGroupDesc]]:
    """(chgcnt, groups) of an ANA log page."""
    b = bytes(b)
    if len(b) < _ANA_HDR.size:
        raise ValueError(f"ANA log needs a {_ANA_HDR.size}-byte header, got {len(b)} bytes")
    chgcnt, ngrps = _ANA_HDR.unpack_from(b)
    pos, groups = _ANA_HDR.size, []
    for _ in range(ngrps):
        if len(b) < pos + _ANA_DESC.size:
            raise ValueError("ANA log ends inside a group descriptor")
        grpid, nnsids, gchg, state = _ANA_DESC.unpack_from(b, pos)
        pos += _ANA_DESC.size
        if len(b) < pos + 4 * nnsids:
            raise ValueError("ANA log ends inside a group's NSID list")
        nsids = list(struct.unpack_from(f"<{nnsids}I", b, pos))
        pos += 4 * nnsids
        groups.append(AnaGroupDesc(grpid, state, gchg, nsids))
    return chgcnt, groups


# -- discovery log page (70h) --------------------------------------------------------------

DISC_HDR_SIZE = 1024
DISC_ENTRY_SIZE = 1024
TSAS_SIZE = 256


class Trtype(IntEnum):
    PCI = 0
    RDMA = 1
    FC = 2
    TCP = 3
    LOOP = 254  # reserved for host usage


class Adrfam(IntEnum):
    PCI = 0
    IPV4 = 1
    IPV6 = 2
    IB = 3
    FC = 4
    LOOP = 254


class Subtype(IntEnum):
    REFERRAL = 1  # another discovery subsystem (kernel NVME_NQN_DISC)
    NVME = 2
    CURRENT_DISC = 3


class Treq(IntFlag):
    NOT_SPECIFIED = 0
    REQUIRED = 1  # secure channel required
    NOT_REQUIRED = 2
    DISABLE_SQFLOW = 1 << 2  # the port allows the host to disable SQ flow control


class RdmaQptype(IntEnum):
    CONNECTED = 1
    DATAGRAM = 2


class RdmaPrtype(IntEnum):
    NOT_SPECIFIED = 1
    IB = 2
    ROCE = 3
    ROCEV2 = 4
    IWARP = 5


class RdmaCms(IntEnum):
    RDMA_CM = 1


class TcpSectype(IntEnum):
    NONE = 0
    TLS12 = 1
    TLS13 = 2


_RDMA_TSAS = struct.Struct("<BBB5xH")  # qptype, prtype, cms, pkey


def rdma_tsas(qptype: int = RdmaQptype.CONNECTED, prtype: int = RdmaPrtype.NOT_SPECIFIED,
              cms: int = RdmaCms.RDMA_CM, pkey: int = 0) -> bytes:
    """The RDMA transport specific address subtype (the kernel's defaults as arguments)."""
    return _RDMA_TSAS.pack(qptype, prtype, cms, pkey).ljust(TSAS_SIZE, b"\0")


def tcp_tsas(sectype: int = TcpSectype.NONE) -> bytes:
    """The TCP transport specific address subtype: the security type at byte 0."""
    return bytes([sectype]).ljust(TSAS_SIZE, b"\0")


def decode_rdma_tsas(tsas: bytes) -> tuple[int, int, int, int]:
    """(qptype, prtype, cms, pkey) of an RDMA TSAS."""
    if len(tsas) < _RDMA_TSAS.size:
        raise ValueError(f"RDMA TSAS needs {_RDMA_TSAS.size} bytes, got {len(tsas)}")
    qptype, prtype, cms, pkey = _RDMA_TSAS.unpack_from(tsas)
    return qptype, prtype, cms, pkey


DISC_HDR_LAYOUT = Layout(DISC_HDR_SIZE, fields(
    ("genctr", 0, 8),
    ("numrec", 8, 8),
    ("recfmt", 16, 2),
))

DISC_ENTRY_LAYOUT = Layout(DISC_ENTRY_SIZE, fields(
    ("trtype", 0, 1),
    ("adrfam", 1, 1),
    ("subtype", 2, 1),
    ("treq", 3, 1),
    ("portid", 4, 2),
    ("cntlid", 6, 2),
    ("asqsz", 8, 2),
    ("eflags", 10, 2),
    ("trsvcid", 32, 32, Kind.ADDR),
    ("subnqn", 256, 256, Kind.CSTR),
    ("traddr", 512, 256, Kind.ADDR),
    ("tsas", 768, TSAS_SIZE, Kind.BYTES),
))


@dataclass
class DiscEntry:
    """One discovery log entry (kernel `struct nvmf_disc_rsp_page_entry`).

    trsvcid and traddr are NUL padded as the kernel target writes them; decoding also
    drops trailing spaces, as libnvme does for targets that space-pad.
    """

    trtype: int = Trtype.RDMA
    adrfam: int = Adrfam.IPV4
    subtype: int = Subtype.NVME
    treq: int = Treq.NOT_SPECIFIED
    portid: int = 0
    cntlid: int = NVME_CNTLID_DYNAMIC  # only dynamic controllers
    asqsz: int = NVME_AQ_DEPTH
    eflags: int = 0
    trsvcid: str = ""
    subnqn: str = ""
    traddr: str = ""
    tsas: bytes = bytes(TSAS_SIZE)

    def encode(self) -> bytes:
        return DISC_ENTRY_LAYOUT.pack(self)

    @classmethod
    def decode(cls, b: bytes | memoryview) -> DiscEntry:
        return cls(**DISC_ENTRY_LAYOUT.unpack(b, what="discovery log entry"))


@dataclass
class DiscLog:
    genctr: int
    numrec: int
    recfmt: int
    entries: list[DiscEntry]


def disc_log(genctr: int, entries: list[DiscEntry]) -> bytes:
    """The whole discovery log page: header (recfmt 0) then one 1024-byte record each."""
    hdr = DISC_HDR_LAYOUT.pack({"genctr": genctr, "numrec": len(entries), "recfmt": 0})
    return hdr + b"".join(e.encode() for e in entries)


def decode_disc_log_header(b: bytes | memoryview) -> tuple[int, int, int]:
    """(genctr, numrec, recfmt): what a host reads first to size the full read."""
    h = DISC_HDR_LAYOUT.unpack(b, what="discovery log header")
    return h["genctr"], h["numrec"], h["recfmt"]


def decode_disc_log(b: bytes | memoryview) -> DiscLog:
    genctr, numrec, recfmt = decode_disc_log_header(b)
    need = DISC_HDR_SIZE + numrec * DISC_ENTRY_SIZE
    if len(b) < need:
        raise ValueError(f"discovery log with {numrec} records needs {need} bytes, got {len(b)}")
    entries = [DiscEntry.decode(b[DISC_HDR_SIZE + i * DISC_ENTRY_SIZE:
                                  DISC_HDR_SIZE + (i + 1) * DISC_ENTRY_SIZE])
               for i in range(numrec)]
    return DiscLog(genctr, numrec, recfmt, entries)
