"""Bad input over NVMe/TCP, from raw hosts on 127.0.0.1, while a good host keeps working.

Fatal PDU errors get a C2HTermReq with the binding's fatal error status and field
offset, then the connection closes (and, with a controller, the controller goes fatal
as in the kernel); digest errors on data and bad SGLs get NVMe statuses and the
connection lives; hosts that stall mid-PDU, overrun their queue, vanish mid-transfer
or stop reading cost the target nothing it does not get back.  After each case the
good host, connected all along, still does verified I/O.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmet_p2p.host.tcp import IcOptions, TargetTerminated, TcpHost, TcpHostQueue
from nvmet_p2p.wire import tcp as t
from nvmet_p2p.wire.command import IoOpcode, Psdt, Sgl, SglType, Sqe
from nvmet_p2p.wire.tcp import CapsuleCmd, DataPdu, Fes, PduType
from tests.support.capsules import write_capsule
from tests.support.tcp_env import TcpEnv

DNR = 0x4000
INLINE = 4096
MiB = 1 << 20
CONNECT_TIMEOUT = 0.5
DATA_TIMEOUT = 1.0


@pytest.fixture
def env(tmp_path: Path) -> Iterator[TcpEnv]:
    e = TcpEnv(tmp_path, connect_timeout=CONNECT_TIMEOUT)
    e.call(lambda: e.port(inline_data_size=INLINE))
    e.add_subsystem()
    yield e
    leaks = e.close()
    assert not leaks, "leaks at teardown:\n" + "\n".join(leaks)


@pytest.fixture
def good(env: TcpEnv) -> TcpHost:
    """A well-behaved host connected for the whole test, with digests."""
    return env.tcp_connect(nr_io_queues=1, hdgst=True, ddgst=True)


def verify_io(host: TcpHost, slba: int = 300) -> None:
    data = random.randbytes(8192)
    host.write(1, slba, data)
    assert host.read(1, slba, 16) == data


def expect_term(conn_events, fes: Fes, fei: int | None = None) -> TargetTerminated:
    with pytest.raises(TargetTerminated) as err:
        conn_events()
    if fei is not None:
        assert (err.value.fes, err.value.fei) == (fes, fei), err.value
    else:
        assert err.value.fes == fes, err.value
    return err.value


def settled(env: TcpEnv, good: TcpHost) -> None:
    """Only the good host's queues are left, and it still moves data."""
    env.wait(lambda: env.queues() == 1 + len(good.io), "the bad connection to go away")
    verify_io(good)


# -- the IC exchange ------------------------------------------------------------------------

@pytest.mark.parametrize("ic,fes,fei", [
    (IcOptions(pfv=1), Fes.UNSUPPORTED_PARAM, t.FEI_PFV),
    (IcOptions(hpda=32), Fes.UNSUPPORTED_PARAM, t.FEI_HPDA),
])
def test_icreq_we_cannot_honour(env: TcpEnv, good: TcpHost, ic: IcOptions, fes: Fes,
                                fei: int) -> None:
    conn = good.connection(ic, initialize=False)
    want = 0
    conn.send(t.encode(PduType.ICREQ, t.IcReq(ic.pfv, ic.hpda, want, 0)))
    term = expect_term(lambda: conn.events(5.0, until=lambda e: False), fes, fei)
    assert term.data == t.encode(PduType.ICREQ, t.IcReq(ic.pfv, ic.hpda, want, 0))[:128]
    conn.close()
    settled(env, good)


def test_capsule_before_icreq(env: TcpEnv, good: TcpHost) -> None:
    conn = good.connection(initialize=False)
    conn.send(t.encode(PduType.CMD, CapsuleCmd(bytes(64))))
    expect_term(lambda: conn.events(5.0, until=lambda e: False), Fes.PDU_SEQ_ERR, t.FEI_TYPE)
    conn.close()
    settled(env, good)


def test_icreq_with_wrong_plen(env: TcpEnv, good: TcpHost) -> None:
    conn = good.connection(initialize=False)
    raw = bytearray(t.encode(PduType.ICREQ, t.IcReq()))
    raw[4:8] = (200).to_bytes(4, "little")
    conn.send(raw + bytes(72))
    expect_term(lambda: conn.events(5.0, until=lambda e: False), Fes.INVALID_PDU_HDR,
                t.FEI_PLEN)
    conn.close()
    settled(env, good)


def test_hpda_is_honoured_in_c2hdata(env: TcpEnv, good: TcpHost) -> None:
    """A host asking 64-byte data alignment gets C2HData PDUs with PDO 64 (the kernel
    refuses HPDA != 0; the binding lets the controller honour it)."""
    h = env.tcp_connect(nr_io_queues=1, hpda=15)
    data = random.randbytes(4096)
    h.write(1, 40, data)
    q = h.io[1]
    assert isinstance(q, TcpHostQueue)
    seen: list[int] = []
    real = q.conn.rx.next_event

    def watch():
        ev = real()
        if ev is not None and ev.pdu.type == PduType.C2H_DATA:
            seen.append(ev.pdu.pdo)
        return ev
    q.conn.rx.next_event = watch  # type: ignore[method-assign]
    assert h.read(1, 40, 8) == data
    assert seen and all(pdo == 64 for pdo in seen), seen
    h.disconnect()
    settled(env, good)


# -- fatal PDU errors on a connected queue ----------------------------------------------

def _io_queue(env: TcpEnv, **kw: object) -> tuple[TcpHost, TcpHostQueue]:
    h = env.tcp_connect(nr_io_queues=1, **kw)  # type: ignore[arg-type]
    q = h.io[1]
    assert isinstance(q, TcpHostQueue)
    return h, q


def _dead_ctrl(env: TcpEnv, h: TcpHost, good: TcpHost) -> None:
    """The bad host's controller went fatal (all its queues), the good host lives."""
    env.wait(lambda: h.cntlid not in env.target.get_subsys(h.subnqn).ctrls,
             "the bad host's controller to be deleted")
    with pytest.raises((ConnectionError, TimeoutError)):
        h.keep_alive()
    h.disconnect()
    settled(env, good)


@pytest.mark.parametrize("mangle,fes,fei", [
    ("type", Fes.INVALID_PDU_HDR, t.FEI_TYPE),
    ("hlen", Fes.INVALID_PDU_HDR, t.FEI_HLEN),
    ("pdo", Fes.INVALID_PDU_HDR, t.FEI_PDO),
    ("plen", Fes.INVALID_PDU_HDR, t.FEI_PLEN),
    ("hdgst", Fes.HDR_DIGEST_ERR, 0),
    ("no-hdgst-flag", Fes.INVALID_PDU_HDR, t.FEI_FLAGS),
])
def test_malformed_capsule_headers(env: TcpEnv, good: TcpHost, mangle: str, fes: Fes,
                                   fei: int) -> None:
    h, q = _io_queue(env, hdgst=True)
    sqe = Sqe(opcode=IoOpcode.FLUSH, flags=Psdt.SGL_MPTR_CONTIG << 6, cid=9, nsid=1,
              dptr=Sgl(SglType.TRANSPORT_DATA_BLOCK).encode()).encode()
    raw = bytearray(t.encode(PduType.CMD, CapsuleCmd(sqe), hdgst=True))
    if mangle == "type":
        raw[0] = 0x0B
    elif mangle == "hlen":
        raw[2] = 70
    elif mangle == "pdo":
        raw[3] = 74
    elif mangle == "plen":
        raw[4] += 4
    elif mangle == "hdgst":
        raw[30] ^= 0x40  # a bit of the SQE flips; the digest no longer matches
    else:
        raw[1] = 0
    q.conn.send(raw + bytes(8))
    term = expect_term(lambda: q.progress(5.0), fes, fei)
    assert term.data[:4] == raw[:4]  # the error data echoes the bad header
    _dead_ctrl(env, h, good)


def test_inline_data_beyond_ioccsz(env: TcpEnv, good: TcpHost) -> None:
    h, q = _io_queue(env)
    q.conn.send(t.encode(PduType.CMD, CapsuleCmd(write_capsule(3, Sgl(
        SglType.DATA_BLOCK_OFFSET, 0, INLINE + 512), nlb=9)), bytes(INLINE + 512)))
    expect_term(lambda: q.progress(5.0), Fes.DATA_LIMIT_EXCEEDED, t.FEI_PLEN)
    _dead_ctrl(env, h, good)


def test_more_commands_than_the_queue_holds(env: TcpEnv, good: TcpHost) -> None:
    """A host that ignores SQ flow control: the kernel calls this "out of commands"."""
    h = env.tcp_connect(nr_io_queues=1, queue_size=4)
    q = h.io[1]
    assert isinstance(q, TcpHostQueue)
    # writes that wait for R2T data hold their command contexts (2 x queue size of them)
    for cid in range(9):
        q.conn.send_pdu(PduType.CMD, CapsuleCmd(write_capsule(
            cid, Sgl(SglType.TRANSPORT_DATA_BLOCK, 0, 512))))
    expect_term(lambda: q.conn.events(5.0, until=lambda e: False), Fes.PDU_SEQ_ERR)
    _dead_ctrl(env, h, good)


# -- H2CData against the R2T ----------------------------------------------------------------

def _write_waiting_for_r2t(q: TcpHostQueue, cid: int = 5, length: int = 8192) -> t.R2T:
    q.conn.send_pdu(PduType.CMD, CapsuleCmd(write_capsule(
        cid, Sgl(SglType.TRANSPORT_DATA_BLOCK, 0, length), nlb=length // 512)))
    [ev] = q.conn.events(5.0, until=lambda e: True)
    r2t = ev.pdu.psh
    assert isinstance(r2t, t.R2T)
    assert (r2t.cccid, r2t.r2to, r2t.r2tl) == (cid, 0, length)
    return r2t


@pytest.mark.parametrize("case,fes,fei", [
    ("beyond the window", Fes.DATA_OUT_OF_RANGE, t.FEI_DATAL),
    ("skips ahead", Fes.DATA_OUT_OF_RANGE, t.FEI_DATAO),
    ("unknown ttag", Fes.INVALID_PDU_HDR, t.FEI_TTAG),
    ("other command", Fes.INVALID_PDU_HDR, t.FEI_CCCID),
    ("beyond MAXH2CDATA", Fes.DATA_LIMIT_EXCEEDED, t.FEI_PLEN),
    ("DATAL against plen", Fes.INVALID_PDU_HDR, t.FEI_DATAL),
])
def test_h2cdata_outside_the_r2t(env: TcpEnv, good: TcpHost, case: str, fes: Fes,
                                 fei: int) -> None:
    h, q = _io_queue(env)
    length = 8192
    r2t = _write_waiting_for_r2t(q, length=length)
    cid, ttag, off, n = r2t.cccid, r2t.ttag, 0, 4096
    if case == "beyond the window":
        off, n = 4096, 8192
        q.conn.send_pdu(PduType.H2C_DATA, DataPdu(cid, ttag, 0, 4096), bytes(4096))
    elif case == "skips ahead":
        off = 4096
    elif case == "unknown ttag":
        ttag = 999
    elif case == "other command":
        cid = 77
    if case == "beyond MAXH2CDATA":
        n = q.conn.maxh2cdata + 4
    if case == "DATAL against plen":
        raw = bytearray(t.encode(PduType.H2C_DATA, DataPdu(cid, ttag, 0, 4096), bytes(4096)))
        raw[16:20] = (4000).to_bytes(4, "little")
        q.conn.send(raw)
    else:
        q.conn.send_pdu(PduType.H2C_DATA, DataPdu(cid, ttag, off, n), bytes(n))
    expect_term(lambda: q.progress(5.0), fes, fei)
    _dead_ctrl(env, h, good)


def test_h2cdata_without_an_r2t(env: TcpEnv, good: TcpHost) -> None:
    h, q = _io_queue(env)
    q.conn.send_pdu(PduType.H2C_DATA, DataPdu(0, 0, 0, 512), bytes(512))
    expect_term(lambda: q.progress(5.0), Fes.INVALID_PDU_HDR, t.FEI_TTAG)
    _dead_ctrl(env, h, good)


def test_h2cdata_split_over_several_pdus_in_any_size(env: TcpEnv, good: TcpHost) -> None:
    """The R2T window may be filled by H2CData PDUs of any sizes up to MAXH2CDATA."""
    h, q = _io_queue(env)
    data = random.randbytes(64 << 10)
    r2t = _write_waiting_for_r2t(q, cid=6, length=len(data))
    off = 0
    for n in (1, 511, 4096, 20000, len(data) - 24608):
        q.conn.send_pdu(PduType.H2C_DATA, DataPdu(6, r2t.ttag, off, n), data[off:off + n],
                        flags=t.Flag.DATA_LAST if off + n == len(data) else 0)
        off += n
    q.progress(5.0)
    assert q.done.pop(6).status == 0
    assert h.read(1, 0, len(data) // 512) == data
    h.disconnect()
    settled(env, good)


# -- digests that do not match the data: a status, not a termination -----------------------

def test_data_digest_error_in_capsule(env: TcpEnv, good: TcpHost) -> None:
    h, q = _io_queue(env, ddgst=True)
    before = h.read(1, 50, 1)
    raw = bytearray(t.encode(PduType.CMD, CapsuleCmd(write_capsule(
        4, Sgl(SglType.DATA_BLOCK_OFFSET, 0, 512))), bytes([0xAB]) * 512, ddgst=True))
    raw[-1] ^= 0xFF  # the data digest no longer matches
    q.outstanding.add(4)
    q.conn.send(raw)
    q.progress(5.0)
    cqe = q.done.pop(4)
    assert cqe.status == 0x022, cqe  # Transient Transport Error, no DNR: retry may work
    assert h.read(1, 0, 1) == before  # nothing was written
    verify_io(h)  # the connection lives on
    assert env.call(lambda: env.tcp.stats["data_digest_errors"]) == 1
    h.disconnect()
    settled(env, good)


def test_data_digest_error_in_h2cdata(env: TcpEnv, good: TcpHost) -> None:
    h, q = _io_queue(env, ddgst=True)
    before = h.read(1, 0, 16)
    r2t = _write_waiting_for_r2t(q, cid=7, length=8192)
    raw = bytearray(t.encode(PduType.H2C_DATA, DataPdu(7, r2t.ttag, 0, 4096),
                             bytes([1]) * 4096, ddgst=True))
    raw[-2] ^= 0x10
    q.conn.send(raw)
    q.conn.send_pdu(PduType.H2C_DATA, DataPdu(7, r2t.ttag, 4096, 4096), bytes([2]) * 4096,
                    flags=t.Flag.DATA_LAST)
    q.outstanding.add(7)
    q.progress(5.0)
    assert q.done.pop(7).status == 0x022
    assert h.read(1, 0, 16) == before
    verify_io(h)
    h.disconnect()
    settled(env, good)


# -- SGLs: NVMe statuses, the queue lives ----------------------------------------------------

@pytest.mark.parametrize("sgl,nlb,payload,status", [
    (Sgl(SglType.DATA_BLOCK_OFFSET, 4095, 512), 1, bytes(512), 0x16 | DNR),  # past the area
    (Sgl(SglType.DATA_BLOCK_OFFSET, (1 << 64) - 512, 512), 1, bytes(512), 0x16 | DNR),
    (Sgl(SglType.KEYED_DATA_BLOCK, 0x1000, 512, 0x1234), 1, b"", 0x11 | DNR),  # RDMA only
    (Sgl(0x50, 0, 512), 1, b"", 0x11 | DNR),
    (Sgl(SglType.TRANSPORT_DATA_BLOCK, 0, 2 * MiB), 2 * MiB // 512, b"", 0x0F | DNR),  # MDTS
    (Sgl(SglType.TRANSPORT_DATA_BLOCK, 0, 1024), 1, b"", 0x0F | DNR),  # != NLB x 512
])
def test_bad_sgls_complete_with_status(env: TcpEnv, good: TcpHost, sgl: Sgl, nlb: int,
                                       payload: bytes, status: int) -> None:
    h, q = _io_queue(env)
    assert q.raw(write_capsule(11, sgl, payload, nlb=nlb)).status == status
    verify_io(h)
    h.disconnect()
    settled(env, good)


def test_in_capsule_data_for_a_read(env: TcpEnv, good: TcpHost) -> None:
    h, q = _io_queue(env)
    sqe = Sqe(opcode=IoOpcode.READ, flags=Psdt.SGL_MPTR_CONTIG << 6, cid=12, nsid=1,
              dptr=Sgl(SglType.DATA_BLOCK_OFFSET, 0, 512).encode())
    assert q.raw(sqe.encode() + bytes(512)).status == 0x02 | DNR
    verify_io(h)
    h.disconnect()
    settled(env, good)


# -- hosts that stall, vanish, terminate or stop reading --------------------------------------

def test_stall_mid_pdu_before_connect_is_cut_off(env: TcpEnv, good: TcpHost) -> None:
    conn = good.connection()
    conn.send(t.encode(PduType.CMD, CapsuleCmd(bytes(64)))[:30])  # and nothing more
    verify_io(good)  # the reactor is not waiting for the rest of that PDU
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        conn.events(CONNECT_TIMEOUT * 10, until=lambda e: False)
    assert time.monotonic() - t0 < CONNECT_TIMEOUT * 8
    conn.close()
    settled(env, good)


def test_stall_mid_pdu_with_a_controller_ends_by_keep_alive(env: TcpEnv,
                                                             good: TcpHost) -> None:
    h = env.tcp_connect(nr_io_queues=1, kato_ms=5000)
    aq = h.admin
    assert isinstance(aq, TcpHostQueue)
    aq.conn.send(t.encode(PduType.CMD, CapsuleCmd(bytes(64)))[:40])
    verify_io(good)
    env.clock.advance(4)
    env.call(env.target.tick)
    assert h.cntlid in env.target.get_subsys(h.subnqn).ctrls  # still within KATO
    env.clock.advance(2)
    env.call(env.target.tick)
    _dead_ctrl(env, h, good)


def test_host_terminates_the_connection(env: TcpEnv, good: TcpHost) -> None:
    h, q = _io_queue(env)
    q.conn.send(t.term_req(PduType.H2C_TERM, Fes.PDU_SEQ_ERR, 0, b"\x07" * 24))
    with pytest.raises(ConnectionError):
        q.conn.events(5.0, until=lambda e: False)
    assert env.call(lambda: env.tcp.stats["term_received"]) == 1
    h.disconnect()
    settled(env, good)


def test_host_vanishes_mid_transfer(env: TcpEnv, good: TcpHost) -> None:
    """R2T answered with half the data, then the host is gone: the buffer comes back."""
    pool = env.tcp.pool
    free_before = env.call(lambda: pool.counters()["available"])
    h, q = _io_queue(env)
    r2t = _write_waiting_for_r2t(q, cid=8, length=64 << 10)
    q.conn.send_pdu(PduType.H2C_DATA, DataPdu(8, r2t.ttag, 0, 4096), bytes(4096))
    q.conn.send(t.header(PduType.H2C_DATA, DataPdu(8, r2t.ttag, 4096, 4096),
                         data_len=4096) + bytes(100))  # cut inside the data
    q.conn.close()
    env.wait(lambda: h.cntlid not in env.target.get_subsys(h.subnqn).ctrls or
             env.queues() == 1 + len(good.io) + 1, "the vanished I/O queue to go")
    h.disconnect()
    settled(env, good)
    assert env.call(lambda: pool.counters()["available"]) == free_before


def test_host_that_stops_reading(env: TcpEnv, good: TcpHost) -> None:
    """Reads pile up in a host that never drains its socket: the target's sends wait for
    writability instead of blocking, others are served, and all buffers come back."""
    h, q = _io_queue(env)
    h.write(1, 0, random.randbytes(MiB))
    for cid in range(16):
        sqe = Sqe(opcode=IoOpcode.READ, flags=Psdt.SGL_MPTR_CONTIG << 6, cid=100 + cid,
                  nsid=1, cdw12=2047, dptr=Sgl(SglType.TRANSPORT_DATA_BLOCK, 0, MiB).encode())
        q.conn.send_pdu(PduType.CMD, CapsuleCmd(sqe.encode()))
    env.wait(lambda: any(x.writer for x in env.tcp.queues.values()),
             "the target to wait for the host's socket")
    for _ in range(3):
        verify_io(good)
    q.conn.close()
    h.disconnect()
    settled(env, good)
    env.wait(lambda: env.tcp.pool.counters()["allocated"] == 0, "every buffer back")


def test_a_host_sitting_on_r2ts_cannot_starve_the_others(tmp_path: Path) -> None:
    """The pool holds 2 MiB; a host takes it all with two 1 MiB writes and never sends
    their data.  A good host's 1 MiB write waits for a buffer, and gets one when the
    stalled connection is cut after the data timeout (its controller goes fatal)."""
    e = TcpEnv(tmp_path, pool_size=2 * MiB, data_timeout=DATA_TIMEOUT)
    try:
        e.call(lambda: e.port())
        e.add_subsystem()
        good = e.tcp_connect()
        stalled = e.tcp_connect(nr_io_queues=1)
        q = stalled.io[1]
        assert isinstance(q, TcpHostQueue)
        for cid in (1, 2):
            _write_waiting_for_r2t(q, cid=cid, length=MiB)
        assert e.call(lambda: e.tcp.pool.counters()["available"]) == 0
        data = random.randbytes(MiB)
        t0 = time.monotonic()
        good.write(1, 4096, data)  # waits for a buffer the stalled host holds
        waited = time.monotonic() - t0
        assert DATA_TIMEOUT * 0.8 < waited < DATA_TIMEOUT * 10, waited
        assert good.read(1, 4096, MiB // 512) == data
        e.wait(lambda: stalled.cntlid not in e.target.get_subsys(stalled.subnqn).ctrls,
               "the stalled host's controller to be deleted")
        assert e.call(lambda: e.tcp.stats["buffer_waits"]) >= 1
        stalled.disconnect()
        verify_io(good)
    finally:
        leaks = e.close()
    assert not leaks, leaks
