"""NVMe/TCP PDUs: golden tables both ways, fed whole, one byte and random fragments at a
time, and every header check of the receiver with its fatal error status and FEI.

Golden bytes are written by hand from the offsets of include/linux/nvme-tcp.h (never by
calling the encoder); digests are CRC32C of those bytes, little-endian, with the CRC
itself checked against the iSCSI test vector of RFC 3720 B.4.
"""

from __future__ import annotations

import random

import pytest
from crc32c import crc32c
from hypothesis import given
from hypothesis import strategies as st

from nvmet_p2p.wire import tcp as t
from nvmet_p2p.wire.tcp import (
    R2T,
    CapsuleCmd,
    CapsuleResp,
    DataPdu,
    Fes,
    Flag,
    IcReq,
    IcResp,
    PduError,
    PduHeader,
    PduReceived,
    PduReceiver,
    PduType,
    Role,
    TermReq,
)
from tests.support.golden import golden

SQE = bytes(range(64))
CQE = bytes(range(0xA0, 0xB0))


def crc(b: bytes) -> str:
    return crc32c(b).to_bytes(4, "little").hex()


def with_hdgst(hdr: bytes) -> bytes:
    return hdr + bytes.fromhex(crc(hdr))


def test_crc32c_is_the_iscsi_crc() -> None:
    # RFC 3720 B.4: 32 bytes of zeroes have the CRC bytes aa 36 91 8a on the wire.
    assert t.digest(bytes(32)) == bytes.fromhex("aa36918a")
    assert t.digest(b"12345", b"6789") == (0xE3069283).to_bytes(4, "little")


# -- golden PDUs: (type, psh, data, encode options, bytes) -------------------------------

ICREQ = golden(128, {0: "00", 2: "80", 4: "80000000", 8: "0000", 10: "03", 11: "03",
                     12: "00000000"})
ICRESP = golden(128, {0: "01", 2: "80", 4: "80000000", 8: "0000", 10: "00", 11: "01",
                      12: "00000200"})  # MAXH2CDATA 128 KiB
CMD_NODATA = golden(72, {0: "04", 1: "00", 2: "48", 3: "00", 4: "48000000", 8: SQE.hex()})
_CMD_DIG_HDR = golden(72, {0: "04", 1: "03", 2: "48", 3: "4c", 4: "58000000", 8: SQE.hex()})
# hlen 72 + header digest = PDO 76; 8 bytes of data and their digest: plen 88
CMD_DIGESTS = with_hdgst(_CMD_DIG_HDR) + bytes(range(8)) + bytes.fromhex(crc(bytes(range(8))))
RSP = golden(24, {0: "05", 2: "18", 4: "18000000", 8: CQE.hex()})
_RSP_HD = golden(24, {0: "05", 1: "01", 2: "18", 4: "1c000000", 8: CQE.hex()})
RSP_HDGST = with_hdgst(_RSP_HD)
R2T_PDU = golden(24, {0: "09", 2: "18", 4: "18000000", 8: "0500", 10: "0700",
                      12: "00100000", 16: "00000100"})  # r2to 4 KiB, r2tl 64 KiB
DATA4 = b"\xde\xad\xbe\xef"
# C2HData LAST|SUCCESS with a header digest for a host asking HPDA 3 (16-byte alignment):
# header 24 + digest 4 = 28, padded to PDO 32; plen 32 + 4
_C2H_HDR = golden(24, {0: "07", 1: "0d", 2: "18", 3: "20", 4: "24000000", 8: "3412",
                       12: "00020000", 16: "04000000"})
C2H_ALIGNED = with_hdgst(_C2H_HDR) + bytes(4) + DATA4
H2C = golden(24, {0: "06", 1: "04", 2: "18", 3: "18", 4: "1c000000", 8: "0100", 10: "0200",
                  12: "00000000", 16: "04000000"}) + DATA4
BAD_HDR = bytes(range(24))
C2H_TERM = golden(24, {0: "03", 2: "18", 4: "30000000", 8: "0100", 10: "04000000"}) + BAD_HDR

GOLDEN = [
    ("icreq", PduType.ICREQ, IcReq(0, 3, 3, 0), b"", {}, ICREQ, Role.CONTROLLER),
    ("icresp", PduType.ICRESP, IcResp(0, 0, 1, 128 << 10), b"", {}, ICRESP, Role.HOST),
    ("cmd", PduType.CMD, CapsuleCmd(SQE), b"", {}, CMD_NODATA, Role.CONTROLLER),
    ("cmd-digests", PduType.CMD, CapsuleCmd(SQE), bytes(range(8)),
     {"hdgst": True, "ddgst": True}, CMD_DIGESTS, Role.CONTROLLER),
    ("rsp", PduType.RSP, CapsuleResp(CQE), b"", {}, RSP, Role.HOST),
    ("rsp-hdgst", PduType.RSP, CapsuleResp(CQE), b"", {"hdgst": True}, RSP_HDGST, Role.HOST),
    ("r2t", PduType.R2T, R2T(5, 7, 4096, 64 << 10), b"", {}, R2T_PDU, Role.HOST),
    ("c2h-aligned", PduType.C2H_DATA, DataPdu(0x1234, 0, 512, 4), DATA4,
     {"hdgst": True, "pda": 3, "flags": Flag.DATA_LAST | Flag.DATA_SUCCESS}, C2H_ALIGNED,
     Role.HOST),
    ("h2c", PduType.H2C_DATA, DataPdu(1, 2, 0, 4), DATA4, {"flags": Flag.DATA_LAST}, H2C,
     Role.CONTROLLER),
    ("c2h-term", PduType.C2H_TERM, TermReq(1, 4), BAD_HDR, {"hdgst": True, "ddgst": True},
     C2H_TERM, Role.HOST),
]
IDS = [g[0] for g in GOLDEN]


def receiver(role: Role, opts: dict, ptype: PduType) -> PduReceiver:
    rx = PduReceiver(role, max_cmd_data=8192, maxh2cdata=128 << 10)
    if ptype not in (PduType.ICREQ, PduType.ICRESP):
        rx.negotiated(bool(opts.get("hdgst")), bool(opts.get("ddgst")))
    return rx


@pytest.mark.parametrize("name,ptype,psh,data,opts,raw,role", GOLDEN, ids=IDS)
def test_encode_golden(name: str, ptype: PduType, psh: t.Psh, data: bytes, opts: dict,
                       raw: bytes, role: Role) -> None:
    assert t.encode(ptype, psh, data, **opts) == raw
    assert t.header(ptype, psh, data_len=len(data), **opts) == raw[:len(raw) - len(data) - (
        4 if opts.get("ddgst") and data and ptype == PduType.CMD else 0)]


def _check_decoded(events: list[t.Event], ptype: PduType, psh: t.Psh, data: bytes,
                   raw: bytes) -> None:
    done = [e for e in events if isinstance(e, PduReceived)]
    heads = [e for e in events if isinstance(e, PduHeader)]
    assert len(done) == 1 and len(heads) == (1 if data else 0)
    p = done[0].pdu
    assert p.type == ptype and p.psh == psh
    assert p.plen == len(raw) and p.hlen == t.HLEN[ptype]
    assert p.data_len == len(data)
    assert bytes(p.data or b"") == data
    assert p.ddgst_ok is (True if p.flags & Flag.DDGST and ptype != PduType.C2H_TERM else None)


@pytest.mark.parametrize("name,ptype,psh,data,opts,raw,role", GOLDEN, ids=IDS)
def test_decode_golden_whole_and_byte_by_byte(name: str, ptype: PduType, psh: t.Psh,
                                              data: bytes, opts: dict, raw: bytes,
                                              role: Role) -> None:
    _check_decoded(receiver(role, opts, ptype).feed(raw), ptype, psh, data, raw)
    rx = receiver(role, opts, ptype)
    events: list[t.Event] = []
    for i in range(len(raw)):
        events += rx.feed(raw[i:i + 1])
    _check_decoded(events, ptype, psh, data, raw)
    assert not rx.mid_pdu


@given(cuts=st.lists(st.integers(1, 300), max_size=30), seed=st.integers(0, 2**32))
def test_stream_of_pdus_in_random_fragments(cuts: list[int], seed: int) -> None:
    """A run of capsules and data PDUs, any size, arrives cut anywhere: same PDUs out."""
    rng = random.Random(seed)
    rx = PduReceiver(Role.CONTROLLER, max_cmd_data=16384, maxh2cdata=128 << 10)
    rx.negotiated(True, True)
    sent = []
    stream = bytearray()
    for i in range(8):
        if rng.random() < 0.5:
            data = rng.randbytes(rng.choice([0, 1, 512, 4096, 16384]))
            stream += t.encode(PduType.CMD, CapsuleCmd(bytes([i]) * 64), data, hdgst=True,
                               ddgst=True)
            sent.append((PduType.CMD, data))
        else:
            data = rng.randbytes(rng.choice([1, 4096, 70000]))
            stream += t.encode(PduType.H2C_DATA, DataPdu(i, i, 0, len(data)), data,
                               flags=Flag.DATA_LAST, hdgst=True, ddgst=True)
            sent.append((PduType.H2C_DATA, data))
    got: list[tuple[PduType, bytes]] = []
    pos = 0
    for n in [*cuts, len(stream)]:
        for ev in rx.feed(stream[pos:pos + n]):
            if isinstance(ev, PduReceived):
                assert ev.pdu.ddgst_ok in (True, None)
                got.append((ev.pdu.type, bytes(ev.pdu.data or b"")))
        pos += n
    assert got == sent


def test_data_lands_in_the_callers_sink_and_mostly_straight_from_the_socket() -> None:
    """A large H2CData: after the header the receiver hands out the sink itself."""
    data = random.randbytes(100_000)
    raw = t.encode(PduType.H2C_DATA, DataPdu(1, 2, 0, len(data)), data)
    rx = PduReceiver(Role.CONTROLLER, maxh2cdata=128 << 10)
    rx.negotiated(False, False)
    sink = bytearray(len(data))
    direct = 0
    pos = 0
    done = None
    while done is None:
        buf = rx.buffer()
        if buf.obj is sink:
            direct += 1
        n = min(len(buf), 4000 if direct == 0 else 30000, len(raw) - pos)
        buf[:n] = raw[pos:pos + n]
        pos += n
        rx.received(n)
        while (ev := rx.next_event()) is not None:
            if isinstance(ev, PduHeader):
                rx.set_sink(memoryview(sink))
            else:
                done = ev
    assert bytes(sink) == data and done.pdu.data.obj is sink
    assert direct >= 3  # everything after the first 4000 bytes went straight into the sink


def test_data_digest_mismatch_is_reported_not_raised() -> None:
    raw = bytearray(t.encode(PduType.CMD, CapsuleCmd(SQE), b"abcd", ddgst=True))
    raw[-1] ^= 0xFF
    rx = PduReceiver(Role.CONTROLLER, max_cmd_data=4096)
    rx.negotiated(False, True)
    [_, done] = rx.feed(raw)
    assert isinstance(done, PduReceived) and done.pdu.ddgst_ok is False


# -- receiver checks: (what, role, negotiated, bytes) -> (FES, FEI) ----------------------

def _cmd(flags: int = 0, hlen: int = 72, pdo: int = 0, plen: int = 72, ptype: int = 4) -> bytes:
    return golden(72, {0: f"{ptype:02x}", 1: f"{flags:02x}", 2: f"{hlen:02x}",
                       3: f"{pdo:02x}", 4: plen.to_bytes(4, "little").hex(), 8: SQE.hex()})


def _h2c(datal: int, plen: int, ttag: int = 0) -> bytes:
    return golden(24, {0: "06", 1: "04", 2: "18", 3: "18", 4: plen.to_bytes(4, "little").hex(),
                       10: ttag.to_bytes(2, "little").hex(),
                       16: datal.to_bytes(4, "little").hex()})


BAD = [
    ("unknown type", _cmd(ptype=0x0F), Fes.INVALID_PDU_HDR, t.FEI_TYPE),
    ("a controller's PDU type from the host", _cmd(ptype=PduType.RSP),
     Fes.INVALID_PDU_HDR, t.FEI_TYPE),
    ("second ICReq", ICREQ, Fes.PDU_SEQ_ERR, t.FEI_TYPE),
    ("hlen", _cmd(hlen=64, plen=64), Fes.INVALID_PDU_HDR, t.FEI_HLEN),
    ("plen without data", _cmd(plen=80), Fes.INVALID_PDU_HDR, t.FEI_PLEN),
    ("header digest flag not negotiated", _cmd(flags=1, plen=76), Fes.INVALID_PDU_HDR,
     t.FEI_FLAGS),
    ("data digest flag without data", _cmd(flags=2), Fes.INVALID_PDU_HDR, t.FEI_FLAGS),
    ("PDO inside the header", _cmd(pdo=64, plen=72 + 64), Fes.INVALID_PDU_HDR, t.FEI_PDO),
    ("PDO not dword aligned", _cmd(pdo=74, plen=80), Fes.INVALID_PDU_HDR, t.FEI_PDO),
    ("PDO at the end: no data", _cmd(pdo=72, plen=72), Fes.INVALID_PDU_HDR, t.FEI_PLEN),
    ("in-capsule data beyond IOCCSZ", _cmd(pdo=72, plen=72 + 8193),
     Fes.DATA_LIMIT_EXCEEDED, t.FEI_PLEN),
    ("H2CData beyond MAXH2CDATA", _h2c((128 << 10) + 4, 24 + (128 << 10) + 4),
     Fes.DATA_LIMIT_EXCEEDED, t.FEI_PLEN),
    ("H2CData DATAL against plen", _h2c(8, 24 + 4) + DATA4, Fes.INVALID_PDU_HDR, t.FEI_DATAL),
    ("H2CData without data", golden(24, {0: "06", 2: "18", 4: "18000000"}),
     Fes.INVALID_PDU_HDR, t.FEI_PDO),
    ("TermReq too long", golden(24, {0: "02", 2: "18", 4: "99000000"}),
     Fes.INVALID_PDU_HDR, t.FEI_PLEN),
]


@pytest.mark.parametrize("what,raw,fes,fei", BAD, ids=[b[0] for b in BAD])
def test_bad_headers_are_fatal_with_their_fes_and_fei(what: str, raw: bytes, fes: Fes,
                                                      fei: int) -> None:
    rx = PduReceiver(Role.CONTROLLER, max_cmd_data=8192, maxh2cdata=128 << 10)
    rx.negotiated(False, False)
    with pytest.raises(PduError) as err:
        rx.feed(raw)
    assert (err.value.fes, err.value.fei) == (fes, fei), err.value
    assert err.value.header == raw[:len(err.value.header)] and err.value.header


def test_capsule_before_icreq_is_a_sequence_error() -> None:
    rx = PduReceiver(Role.CONTROLLER, max_cmd_data=8192)
    with pytest.raises(PduError) as err:
        rx.feed(CMD_NODATA)
    assert err.value.fes == Fes.PDU_SEQ_ERR


def test_header_digest_mismatch() -> None:
    raw = bytearray(t.encode(PduType.CMD, CapsuleCmd(SQE), hdgst=True))
    raw[20] ^= 1  # a bit of the SQE flips on the way
    rx = PduReceiver(Role.CONTROLLER, max_cmd_data=8192)
    rx.negotiated(True, False)
    with pytest.raises(PduError) as err:
        rx.feed(raw)
    assert err.value.fes == Fes.HDR_DIGEST_ERR


def test_missing_header_digest_when_negotiated() -> None:
    rx = PduReceiver(Role.CONTROLLER, max_cmd_data=8192)
    rx.negotiated(True, False)
    with pytest.raises(PduError) as err:
        rx.feed(CMD_NODATA)
    assert (err.value.fes, err.value.fei) == (Fes.INVALID_PDU_HDR, t.FEI_FLAGS)


@pytest.mark.parametrize("field,value,fei", [("pfv", 1, t.FEI_PFV), ("hpda", 32, t.FEI_HPDA)])
def test_icreq_parameters_we_cannot_honour(field: str, value: int, fei: int) -> None:
    ic = IcReq()
    setattr(ic, field, value)
    rx = PduReceiver(Role.CONTROLLER)
    with pytest.raises(PduError) as err:
        rx.feed(t.encode(PduType.ICREQ, ic))
    assert (err.value.fes, err.value.fei) == (Fes.UNSUPPORTED_PARAM, fei)


def test_icreq_plen_must_be_128() -> None:
    raw = bytearray(ICREQ)
    raw[4] = 0x84
    with pytest.raises(PduError) as err:
        PduReceiver(Role.CONTROLLER).feed(bytes(raw) + bytes(4))
    assert (err.value.fes, err.value.fei) == (Fes.INVALID_PDU_HDR, t.FEI_PLEN)


@pytest.mark.parametrize("datao,datal,fes,fei", [
    (0, 4096, None, None),  # exactly the next bytes of the window
    (4096, 4096, Fes.DATA_OUT_OF_RANGE, t.FEI_DATAO),  # skips ahead
    (0, 8192 + 1, Fes.DATA_OUT_OF_RANGE, t.FEI_DATAL),  # runs past the R2T
])
def test_h2c_window(datao: int, datal: int, fes: Fes | None, fei: int | None) -> None:
    bad = t.check_h2c_window(DataPdu(3, 1, datao, datal), cccid=3, r2to=0, r2tl=8192,
                             expected=0)
    assert (bad[:2] if bad else (None, None)) == (fes, fei)
    wrong_cmd = t.check_h2c_window(DataPdu(4, 1, 0, 1), cccid=3, r2to=0, r2tl=8192, expected=0)
    assert wrong_cmd is not None and wrong_cmd[:2] == (Fes.INVALID_PDU_HDR, t.FEI_CCCID)


def test_term_req_echoes_at_most_128_header_bytes() -> None:
    raw = t.term_req(PduType.C2H_TERM, Fes.HDR_DIGEST_ERR, 0, bytes(200))
    assert len(raw) == t.MAX_TERM_PLEN
    assert int.from_bytes(raw[4:8], "little") == t.MAX_TERM_PLEN


def test_per_command_headers_equal_the_general_encoder() -> None:
    """The target builds every CapsuleResp and C2HData header with its own short path."""
    assert t.rsp_header(CQE, False) == RSP
    assert t.rsp_header(CQE, True) == RSP_HDGST
    for hd in (False, True):
        for dd in (False, True):
            for pda in (0, 1, 3, 31):
                for flags in (t.F_DATA_LAST, t.F_DATA_LAST | t.F_DATA_SUCCESS):
                    assert t.c2h_data_header(0xBEEF, 4096, flags, hd, dd, pda) == t.header(
                        PduType.C2H_DATA, DataPdu(0xBEEF, 0, 0, 4096), flags=flags,
                        data_len=4096, hdgst=hd, ddgst=dd, pda=pda)
