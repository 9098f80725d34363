"""NVMe/TCP PDUs: bytes in, values out, and back; and the state machine that cuts a byte
stream into PDUs.

The layouts are the NVMe/TCP transport binding's, as the kernel spells them in
`include/linux/nvme-tcp.h`: an 8-byte common header (type, flags, hlen, pdo, plen), a
PDU-specific header, an optional header digest, padding up to PDO, data, and an
optional data digest.  Digests are CRC32C (the maintained `crc32c` package), stored
little-endian; header digests cover the common and PDU-specific header, data digests
the data only.  TermReq PDUs carry no digests (they may report a digest error).

`PduReceiver` is the receive side of one connection: it says where the next bytes
should land (`buffer()`: its own staging area, or the caller's data buffer for the
bulk of a large PDU, so payload can be received straight into it), is told how many
arrived (`received(n)`), and hands out events (`next_event()`), h11 style.  Header
checks that need no command state are made here and raise `PduError` with the fatal
error status and field offset a TermReq reports; nothing here touches a socket.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from crc32c import crc32c

from nvmet_p2p.wire.command import CQE_SIZE, SQE_SIZE

PFV_1_0 = 0x0
DIGEST_LEN = 4
CH_SIZE = 8
IC_SIZE = 128  # ICReq and ICResp, hlen == plen
CMD_HLEN = CH_SIZE + SQE_SIZE  # 72
RSP_HLEN = CH_SIZE + CQE_SIZE  # 24
DATA_HLEN = R2T_HLEN = TERM_HLEN = 24
MAX_TERM_PLEN = 152  # NVME_TCP_MAX_C2HTERM_PLEN: a TermReq header + 128 bytes of error data
TERM_ERROR_DATA = MAX_TERM_PLEN - TERM_HLEN  # how much of the bad PDU's header a TermReq echoes
MAX_PDA = 31  # HPDA/CPDA are 0's based dword counts, 0..31
MIN_MAXH2CDATA = 4096  # the smallest MAXH2CDATA the Linux host accepts
NVME_TCP_ADMIN_CCSZ = 8192  # in-capsule data the Linux host puts in admin queue capsules
STAGE_SIZE = 64 << 10  # bytes received at once when headers or small data are expected
DIRECT_MIN = 4096  # data left in a PDU from which it is received straight into its buffer


class PduType(IntEnum):
    ICREQ = 0x0
    ICRESP = 0x1
    H2C_TERM = 0x2
    C2H_TERM = 0x3
    CMD = 0x4
    RSP = 0x5
    H2C_DATA = 0x6
    C2H_DATA = 0x7
    R2T = 0x9


class Flag(IntFlag):
    HDGST = 1 << 0
    DDGST = 1 << 1
    DATA_LAST = 1 << 2
    DATA_SUCCESS = 1 << 3  # C2HData: no CapsuleResp follows (SQ flow control disabled)


# The flag bits as plain ints for the per-PDU paths: IntFlag arithmetic runs Python code.
F_HDGST, F_DDGST = int(Flag.HDGST), int(Flag.DDGST)
F_DATA_LAST, F_DATA_SUCCESS = int(Flag.DATA_LAST), int(Flag.DATA_SUCCESS)


class Digest(IntFlag):
    """ICReq/ICResp DGST: the digests asked for (ICReq) and granted (ICResp)."""

    HDR = 1 << 0
    DATA = 1 << 1


class Fes(IntEnum):
    """Fatal error status of a C2HTermReq (the H2CTermReq table differs only at 0x05)."""

    INVALID_PDU_HDR = 0x01  # FEI: byte offset of the bad header field
    PDU_SEQ_ERR = 0x02
    HDR_DIGEST_ERR = 0x03
    DATA_OUT_OF_RANGE = 0x04  # H2CData outside what the R2T asked for
    DATA_LIMIT_EXCEEDED = 0x05  # H2CData beyond MAXH2CDATA, in-capsule data beyond IOCCSZ
    UNSUPPORTED_PARAM = 0x06  # FEI: byte offset of the ICReq field we cannot honour


class Role(IntEnum):
    """Whose PDUs a receiver reads: a controller reads the host's, a host the controller's."""

    CONTROLLER = 0
    HOST = 1


HLEN = {PduType.ICREQ: IC_SIZE, PduType.ICRESP: IC_SIZE, PduType.H2C_TERM: TERM_HLEN,
        PduType.C2H_TERM: TERM_HLEN, PduType.CMD: CMD_HLEN, PduType.RSP: RSP_HLEN,
        PduType.H2C_DATA: DATA_HLEN, PduType.C2H_DATA: DATA_HLEN, PduType.R2T: R2T_HLEN}
INBOUND = {Role.CONTROLLER: frozenset({PduType.ICREQ, PduType.H2C_TERM, PduType.CMD,
                                       PduType.H2C_DATA}),
           Role.HOST: frozenset({PduType.ICRESP, PduType.C2H_TERM, PduType.RSP,
                                 PduType.C2H_DATA, PduType.R2T})}
_TYPES = {int(t): t for t in PduType}  # int -> member without an Enum call per PDU
_IC = frozenset({PduType.ICREQ, PduType.ICRESP})
_TERM = frozenset({PduType.H2C_TERM, PduType.C2H_TERM})
_DATA = frozenset({PduType.H2C_DATA, PduType.C2H_DATA})
_MUST_CARRY_DATA = _DATA

# Offsets of header fields, for FEI.
FEI_TYPE, FEI_FLAGS, FEI_HLEN, FEI_PDO, FEI_PLEN = 0, 1, 2, 3, 4
FEI_PFV, FEI_HPDA, FEI_DGST, FEI_MAXR2T = 8, 10, 11, 12
FEI_CCCID, FEI_TTAG, FEI_DATAO, FEI_DATAL = 8, 10, 12, 16

_CH = struct.Struct("<BBBBI")
_IC_PSH = struct.Struct("<HBBI")  # pfv, hpda|cpda, dgst, maxr2t|maxh2cdata
_DATA_PSH = struct.Struct("<HHII4x")  # cccid, ttag, datao|r2to, datal|r2tl
_TERM_PSH = struct.Struct("<HI10x")  # fes, fei, reserved


class PduError(Exception):
    """The peer sent a PDU that breaks the binding: fatal for the connection.

    The peer's mistake, not ours: it never leaves the transport, which answers it with a
    TermReq (no NVMe status can say it).  `fes` and `fei` go into the TermReq; `header`
    is what arrived of the bad PDU's header (the TermReq's error data).
    """

    def __init__(self, fes: Fes, fei: int, why: str, header: bytes = b"") -> None:
        super().__init__(f"{why} (FES {fes.name}, FEI {fei})")
        self.fes = fes
        self.fei = fei
        self.why = why
        self.header = header


# -- PDU-specific headers --------------------------------------------------------------

@dataclass(slots=True)
class IcReq:
    pfv: int = PFV_1_0
    hpda: int = 0  # host PDU data alignment, dwords, 0's based
    digest: int = 0  # Digest bits the host asks for
    maxr2t: int = 0  # R2Ts per command the host can have outstanding, 0's based


@dataclass(slots=True)
class IcResp:
    pfv: int = PFV_1_0
    cpda: int = 0  # controller PDU data alignment, dwords, 0's based
    digest: int = 0  # Digest bits granted
    maxh2cdata: int = 0  # bytes of data one H2CData PDU may carry


@dataclass(slots=True)
class TermReq:
    fes: int = 0
    fei: int = 0


@dataclass(slots=True)
class CapsuleCmd:
    sqe: bytes = bytes(SQE_SIZE)


@dataclass(slots=True)
class CapsuleResp:
    cqe: bytes = bytes(CQE_SIZE)


@dataclass(slots=True)
class DataPdu:
    """H2CData and C2HData: `ttag` is the R2T's transfer tag (reserved in C2HData)."""

    cccid: int = 0
    ttag: int = 0
    datao: int = 0
    datal: int = 0


@dataclass(slots=True)
class R2T:
    cccid: int = 0
    ttag: int = 0
    r2to: int = 0
    r2tl: int = 0


Psh = IcReq | IcResp | TermReq | CapsuleCmd | CapsuleResp | DataPdu | R2T


def _psh_bytes(ptype: PduType, psh: Psh) -> bytes:
    if isinstance(psh, IcReq):
        return _IC_PSH.pack(psh.pfv, psh.hpda, psh.digest, psh.maxr2t).ljust(IC_SIZE - CH_SIZE,
                                                                              b"\0")
    if isinstance(psh, IcResp):
        return _IC_PSH.pack(psh.pfv, psh.cpda, psh.digest,
                            psh.maxh2cdata).ljust(IC_SIZE - CH_SIZE, b"\0")
    if isinstance(psh, TermReq):
        return _TERM_PSH.pack(psh.fes, psh.fei)
    if isinstance(psh, CapsuleCmd):
        return bytes(psh.sqe)
    if isinstance(psh, CapsuleResp):
        return bytes(psh.cqe)
    if isinstance(psh, DataPdu):
        return _DATA_PSH.pack(psh.cccid, psh.ttag, psh.datao, psh.datal)
    return _DATA_PSH.pack(psh.cccid, psh.ttag, psh.r2to, psh.r2tl)


def _decode_psh(ptype: PduType, b: bytes | bytearray | memoryview) -> Psh:
    if ptype == PduType.ICREQ:
        return IcReq(*_IC_PSH.unpack_from(b, CH_SIZE))
    if ptype == PduType.ICRESP:
        return IcResp(*_IC_PSH.unpack_from(b, CH_SIZE))
    if ptype in _TERM:
        return TermReq(*_TERM_PSH.unpack_from(b, CH_SIZE))
    if ptype == PduType.CMD:
        return CapsuleCmd(bytes(b[CH_SIZE:CMD_HLEN]))
    if ptype == PduType.RSP:
        return CapsuleResp(bytes(b[CH_SIZE:RSP_HLEN]))
    if ptype in _DATA:
        return DataPdu(*_DATA_PSH.unpack_from(b, CH_SIZE))
    return R2T(*_DATA_PSH.unpack_from(b, CH_SIZE))


# -- encoding ------------------------------------------------------------------------------

def digest(*parts: bytes | bytearray | memoryview) -> bytes:
    """CRC32C of the parts in order, as the 4 little-endian bytes a PDU carries."""
    crc = 0
    for p in parts:
        crc = crc32c(p, crc)
    return crc.to_bytes(DIGEST_LEN, "little")


def data_offset(hlen: int, hdgst: bool, pda: int) -> int:
    """PDO for data behind a header of `hlen`: aligned to the peer's (pda + 1) dwords."""
    unit = (pda + 1) * 4
    start = hlen + (DIGEST_LEN if hdgst else 0)
    return -(-start // unit) * unit


def header(ptype: PduType, psh: Psh, *, flags: int = 0, data_len: int = 0,
           hdgst: bool = False, ddgst: bool = False, pda: int = 0) -> bytes:
    """Everything of a PDU up to its data: common header, PSH, header digest, padding.

    The caller sends `data_len` bytes of data and then, with `ddgst`, `digest(data)`.
    IC and TermReq PDUs carry no digests whatever is asked; a PDU without data has
    PDO 0 and no data digest.
    """
    psh_raw = _psh_bytes(ptype, psh)
    hlen = CH_SIZE + len(psh_raw)
    if ptype in _IC or ptype in _TERM:
        hdgst = ddgst = False
    hd = DIGEST_LEN if hdgst else 0
    if ptype in _TERM:
        pdo, plen = 0, hlen + data_len
    elif data_len:
        pdo = data_offset(hlen, hdgst, pda)
        plen = pdo + data_len + (DIGEST_LEN if ddgst else 0)
    else:
        pdo, plen = 0, hlen + hd
        ddgst = False
    flags |= (F_HDGST if hdgst else 0) | (F_DDGST if ddgst else 0)
    head = _CH.pack(ptype, flags, hlen, pdo, plen) + psh_raw
    if hdgst:
        head += digest(head)
    if data_len and ptype not in _TERM:
        head = head.ljust(pdo, b"\0")
    return head


_RSP_CH = struct.Struct("<BBBBI16s")  # common header + CQE
_DATA_CH = struct.Struct("<BBBBIHHII4x")  # common header + C2HData/H2CData PSH


def rsp_header(cqe: bytes, hdgst: bool) -> bytes:
    """A whole CapsuleResp: `header(RSP, CapsuleResp(cqe), hdgst=...)`, for every command."""
    if not hdgst:
        return _RSP_CH.pack(PduType.RSP, 0, RSP_HLEN, 0, RSP_HLEN, cqe)
    head = _RSP_CH.pack(PduType.RSP, F_HDGST, RSP_HLEN, 0, RSP_HLEN + DIGEST_LEN, cqe)
    return head + digest(head)


def c2h_data_header(cccid: int, datal: int, flags: int, hdgst: bool, ddgst: bool,
                    pda: int) -> bytes:
    """A C2HData header for `datal` bytes at offset 0 (`header(C2H_DATA, ...)`, per read)."""
    pdo = data_offset(DATA_HLEN, hdgst, pda)
    flags |= (F_HDGST if hdgst else 0) | (F_DDGST if ddgst else 0)
    head = _DATA_CH.pack(PduType.C2H_DATA, flags, DATA_HLEN, pdo,
                         pdo + datal + (DIGEST_LEN if ddgst else 0), cccid, 0, 0, datal)
    if hdgst:
        head += digest(head)
    return head.ljust(pdo, b"\0")


def encode(ptype: PduType, psh: Psh, data: bytes | bytearray | memoryview = b"", *,
           flags: int = 0, hdgst: bool = False, ddgst: bool = False, pda: int = 0) -> bytes:
    """A whole PDU as bytes (hosts, tests; the target sends data without copying it)."""
    out = header(ptype, psh, flags=flags, data_len=len(data), hdgst=hdgst, ddgst=ddgst,
                 pda=pda)
    if not data:
        return out
    tail = digest(data) if ddgst and ptype not in _TERM and ptype not in _IC else b""
    return out + bytes(data) + tail


def term_req(ptype: PduType, fes: int, fei: int, bad_header: bytes = b"") -> bytes:
    """A H2CTermReq or C2HTermReq echoing (the start of) the offending PDU header."""
    return encode(ptype, TermReq(fes, fei), bad_header[:TERM_ERROR_DATA])


# -- decoding --------------------------------------------------------------------------------

@dataclass(slots=True)
class Pdu:
    """One PDU as received: the common header, the PSH, and (once complete) the data."""

    type: PduType
    flags: int
    hlen: int
    pdo: int
    plen: int
    psh: Psh
    data_len: int = 0
    data: memoryview | None = None  # the data, once received (the caller's buffer or ours)
    ddgst_ok: bool | None = None  # None: no data digest on this PDU


@dataclass(slots=True)
class PduHeader:
    """A PDU with data has its header in: place its data with `set_sink` now, if wanted."""

    pdu: Pdu


@dataclass(slots=True)
class PduReceived:
    pdu: Pdu


Event = PduHeader | PduReceived


def check_h2c_window(data: DataPdu, *, cccid: int, r2to: int, r2tl: int,
                     expected: int) -> tuple[Fes, int, str] | None:
    """What is wrong with an H2CData PDU for a command with one R2T outstanding (its
    window r2to..r2to+r2tl, `expected` the next offset: data comes in order), or None."""
    if data.cccid != cccid:
        return (Fes.INVALID_PDU_HDR, FEI_CCCID,
                f"H2CData for command {data.cccid} under the transfer tag of command {cccid}")
    if data.datao != expected or data.datao < r2to:
        return (Fes.DATA_OUT_OF_RANGE, FEI_DATAO,
                f"H2CData at offset {data.datao}; offset {expected} is next")
    if data.datao + data.datal > r2to + r2tl:
        return (Fes.DATA_OUT_OF_RANGE, FEI_DATAL,
                f"H2CData up to offset {data.datao + data.datal}, beyond the R2T's end "
                + str(r2to + r2tl))
    return None


def check_icreq(ic: IcReq) -> tuple[Fes, int, str] | None:
    """What a controller cannot accept in an ICReq (FES, FEI, why), or None."""
    if ic.pfv != PFV_1_0:
        return Fes.UNSUPPORTED_PARAM, FEI_PFV, f"PDU format version {ic.pfv} (only 1.0)"
    if ic.hpda > MAX_PDA:
        return Fes.UNSUPPORTED_PARAM, FEI_HPDA, f"HPDA {ic.hpda} is beyond 31"
    return None


class _St(IntEnum):
    CH = 0  # waits for the 8-byte common header
    PSH = 1  # waits for the rest of the header and its digest
    PAD = 2  # skips padding up to PDO
    DATA = 3  # waits for the data
    DDGST = 4  # waits for the data digest


class PduReceiver:
    """Cuts the byte stream of one connection (as `role` reads it) into PDU events.

    Before the IC exchange only the IC PDU is accepted; `negotiated()` switches the
    digests on for everything that follows.  `max_cmd_data` (in-capsule data a
    CapsuleCmd may carry) and `maxh2cdata` bound what a controller will receive.
    """

    def __init__(self, role: Role, *, max_cmd_data: int = 0, maxh2cdata: int = 0,
                 max_c2h_data: int = 16 << 20) -> None:
        self.role = role
        self.inbound = INBOUND[role]
        self.hdgst = False
        self.ddgst = False
        self.ic_done = False
        self.max_cmd_data = max_cmd_data
        self.maxh2cdata = maxh2cdata
        self.max_c2h_data = max_c2h_data
        self._stage = bytearray(STAGE_SIZE)
        self._sv = memoryview(self._stage)
        self._start = 0  # staged bytes not yet consumed are _stage[_start:_end]
        self._end = 0
        self._direct = False  # the last buffer() was the data sink itself
        self._st = _St.CH
        self._need = CH_SIZE  # bytes the current state still waits for
        self._hdr = bytearray()
        self.last_header = b""  # the header of the PDU received last, for a TermReq
        self._ch = (PduType.ICREQ, 0, 0, 0, 0, 0)  # the common header: type .. plen, data_len
        self._pdu: Pdu | None = None
        self._sink: memoryview | None = None
        self._pos = 0  # data bytes in the sink so far
        self._dd = bytearray()

    def negotiated(self, hdgst: bool, ddgst: bool) -> None:
        """The IC exchange is done: digests as agreed from the next PDU on."""
        self.ic_done = True
        self.hdgst, self.ddgst = hdgst, ddgst

    @property
    def mid_pdu(self) -> bool:
        """True when part of a PDU has arrived but not all of it."""
        return self._st != _St.CH or self._end > self._start

    # -- where bytes go ------------------------------------------------------------------
    def buffer(self) -> memoryview:
        """Where the next received bytes should be written (never empty)."""
        if (self._st == _St.DATA and self._start == self._end
                and self._need >= DIRECT_MIN):
            self._direct = True
            sink = self._data_sink()
            return sink[self._pos:self._pos + self._need]
        self._direct = False
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._stage) - self._end < DIRECT_MIN:
            n = self._end - self._start
            self._stage[:n] = self._stage[self._start:self._end]
            self._start, self._end = 0, n
        return self._sv[self._end:]

    def received(self, n: int) -> None:
        """`n` bytes were written into the last `buffer()`."""
        if self._direct:
            self._pos += n
            self._need -= n
        else:
            self._end += n

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Copy `data` in and return every event it completes (tests and simple hosts;
        a PduHeader's sink cannot be set this way, so data lands in our own buffers)."""
        src = memoryview(data)
        events: list[Event] = []
        while True:
            while (ev := self.next_event()) is not None:
                events.append(ev)
            if not src:
                return events
            buf = self.buffer()
            n = min(len(buf), len(src))
            buf[:n] = src[:n]
            self.received(n)
            src = src[n:]

    def set_sink(self, view: memoryview) -> None:
        """After a PduHeader: receive that PDU's data into `view` (exactly data_len bytes)."""
        assert self._pdu is not None and self._st in (_St.PAD, _St.DATA) and self._pos == 0
        if len(view) != self._pdu.data_len:
            raise ValueError(f"sink of {len(view)} bytes for {self._pdu.data_len} of data")
        self._sink = view

    # -- the state machine ---------------------------------------------------------------
    def next_event(self) -> Event | None:
        """The next event the bytes received so far complete, or None (need more)."""
        while True:
            if self._st == _St.DATA:
                if self._take_data():
                    ev = self._data_done()
                    if ev is not None:
                        return ev
                    continue
                return None
            avail = self._end - self._start
            if not avail:
                return None
            take = min(avail, self._need)
            chunk = self._sv[self._start:self._start + take]
            self._start += take
            self._need -= take
            if self._st == _St.PAD:
                if not self._need:
                    self._st, self._need = _St.DATA, self._pdu.data_len if self._pdu else 0
                continue
            if self._st == _St.DDGST:
                self._dd += chunk
                if not self._need:
                    return self._finish_ddgst()
                continue
            self._hdr += chunk
            if self._need:
                return None
            if self._st == _St.CH:
                self._common_header()
                continue
            ev2 = self._header_done()
            if ev2 is not None:
                return ev2

    def _fail(self, fes: Fes, fei: int, why: str) -> PduError:
        return PduError(fes, fei, why, bytes(self._hdr[:TERM_ERROR_DATA]))

    def _common_header(self) -> None:
        ptype, flags, hlen, pdo, plen = _CH.unpack_from(self._hdr)
        if ptype not in self.inbound:
            raise self._fail(Fes.INVALID_PDU_HDR, FEI_TYPE, f"unexpected PDU type {ptype:#x}")
        ptype = _TYPES[ptype]
        if not self.ic_done and ptype not in _IC and ptype not in _TERM:  # a TermReq may
            # be the answer to a bad IC PDU
            raise self._fail(Fes.PDU_SEQ_ERR, FEI_TYPE,
                             f"{ptype.name} before the connection was initialized")
        if self.ic_done and ptype in _IC:
            raise self._fail(Fes.PDU_SEQ_ERR, FEI_TYPE, f"a second {ptype.name}")
        if hlen != HLEN[ptype]:
            raise self._fail(Fes.INVALID_PDU_HDR, FEI_HLEN,
                             f"{ptype.name} with hlen {hlen} (must be {HLEN[ptype]})")
        data_len, hd = self._framing(ptype, flags, hlen, pdo, plen)
        self._ch = (ptype, flags, hlen, pdo, plen, data_len)
        self._st, self._need = _St.PSH, hlen - CH_SIZE + hd

    def _framing(self, ptype: PduType, flags: int, hlen: int, pdo: int,
                 plen: int) -> tuple[int, int]:
        """(data length, header digest length) from the common header, or PduError."""
        if ptype in _IC:
            if plen != IC_SIZE:
                raise self._fail(Fes.INVALID_PDU_HDR, FEI_PLEN,
                                 f"{ptype.name} with plen {plen} (must be {IC_SIZE})")
            return 0, 0
        if ptype in _TERM:
            if not TERM_HLEN <= plen <= MAX_TERM_PLEN:
                raise self._fail(Fes.INVALID_PDU_HDR, FEI_PLEN,
                                 f"{ptype.name} with plen {plen} (24..{MAX_TERM_PLEN})")
            return plen - hlen, 0
        if bool(flags & F_HDGST) != self.hdgst:
            raise self._fail(Fes.INVALID_PDU_HDR, FEI_FLAGS,
                             f"{ptype.name} header digest flag {bool(flags & F_HDGST)} "
                             f"but header digests are {'on' if self.hdgst else 'off'}")
        hd = DIGEST_LEN if self.hdgst else 0
        if pdo == 0:
            if flags & F_DDGST:
                raise self._fail(Fes.INVALID_PDU_HDR, FEI_FLAGS,
                                 f"{ptype.name} without data has the data digest flag")
            if ptype in _MUST_CARRY_DATA:
                raise self._fail(Fes.INVALID_PDU_HDR, FEI_PDO, f"{ptype.name} without data")
            if plen != hlen + hd:
                raise self._fail(Fes.INVALID_PDU_HDR, FEI_PLEN,
                                 f"{ptype.name} with plen {plen}, PDO 0 (must be {hlen + hd})")
            return 0, hd
        if ptype not in (PduType.CMD, *_DATA):
            raise self._fail(Fes.INVALID_PDU_HDR, FEI_PDO, f"{ptype.name} with PDO {pdo}")
        if pdo < hlen + hd or pdo % 4:
            raise self._fail(Fes.INVALID_PDU_HDR, FEI_PDO,
                             f"{ptype.name} with PDO {pdo} (header ends at {hlen + hd})")
        if bool(flags & F_DDGST) != self.ddgst:
            raise self._fail(Fes.INVALID_PDU_HDR, FEI_FLAGS,
                             f"{ptype.name} data digest flag {bool(flags & F_DDGST)} but "
                             f"data digests are {'on' if self.ddgst else 'off'}")
        data_len = plen - pdo - (DIGEST_LEN if self.ddgst else 0)
        if data_len <= 0:
            raise self._fail(Fes.INVALID_PDU_HDR, FEI_PLEN,
                             f"{ptype.name} with plen {plen} and PDO {pdo}: no room for data")
        limit, what = {PduType.CMD: (self.max_cmd_data, "in-capsule data"),
                       PduType.H2C_DATA: (self.maxh2cdata, "MAXH2CDATA"),
                       PduType.C2H_DATA: (self.max_c2h_data, "C2HData limit")}[ptype]
        if data_len > limit:
            raise self._fail(Fes.DATA_LIMIT_EXCEEDED, FEI_PLEN,
                             f"{ptype.name} carries {data_len} bytes; {what} is {limit}")
        return data_len, hd

    def _header_done(self) -> Event | None:
        ptype, flags, hlen, pdo, plen, data_len = self._ch
        if flags & F_HDGST and ptype not in _IC and ptype not in _TERM:
            got = bytes(self._hdr[hlen:hlen + DIGEST_LEN])
            if got != digest(memoryview(self._hdr)[:hlen]):
                raise self._fail(Fes.HDR_DIGEST_ERR, 0,
                                 f"{ptype.name} header digest does not match")
        self.last_header = bytes(self._hdr[:min(hlen, TERM_ERROR_DATA)])
        psh = _decode_psh(ptype, self._hdr)
        if isinstance(psh, IcReq) and self.role == Role.CONTROLLER:
            bad = check_icreq(psh)
            if bad is not None:
                raise self._fail(*bad)
        pdu = self._pdu = Pdu(ptype, flags, hlen, pdo, plen, psh, data_len)
        if isinstance(psh, DataPdu) and psh.datal != data_len:
            raise self._fail(Fes.INVALID_PDU_HDR, FEI_DATAL,
                             f"{ptype.name} DATAL {psh.datal} but {data_len} bytes of data by "
                             "plen")
        if not pdu.data_len:
            return self._complete()
        pad = 0 if pdu.type in _TERM else pdu.pdo - pdu.hlen - (
            DIGEST_LEN if pdu.flags & F_HDGST else 0)
        self._sink, self._pos = None, 0
        if pad:
            self._st, self._need = _St.PAD, pad
        else:
            self._st, self._need = _St.DATA, pdu.data_len
        return PduHeader(pdu)

    def _data_sink(self) -> memoryview:
        if self._sink is None:
            assert self._pdu is not None
            self._sink = memoryview(bytearray(self._pdu.data_len))
        return self._sink

    def _take_data(self) -> bool:
        """Move staged bytes into the sink; True when the PDU's data is complete."""
        avail = self._end - self._start
        if avail and self._need:
            n = min(avail, self._need)
            self._data_sink()[self._pos:self._pos + n] = self._sv[self._start:self._start + n]
            self._start += n
            self._pos += n
            self._need -= n
        return not self._need

    def _data_done(self) -> Event | None:
        pdu = self._pdu
        assert pdu is not None
        pdu.data = self._data_sink()
        if pdu.flags & F_DDGST and pdu.type not in _TERM:
            self._st, self._need = _St.DDGST, DIGEST_LEN
            self._dd = bytearray()
            return None
        return self._complete()

    def _finish_ddgst(self) -> Event:
        pdu = self._pdu
        assert pdu is not None and pdu.data is not None
        pdu.ddgst_ok = bytes(self._dd) == digest(pdu.data)
        return self._complete()

    def _complete(self) -> Event:
        pdu = self._pdu
        assert pdu is not None
        if pdu.type in _IC:
            self.ic_done = True  # the digests follow with negotiated()
        self._pdu, self._sink, self._hdr = None, None, bytearray()
        self._st, self._need, self._pos = _St.CH, CH_SIZE, 0
        return PduReceived(pdu)
