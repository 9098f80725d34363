"""The NVMe/TCP mode of the Python host library: an initiator over plain sockets.

`TcpHost` does what the Linux host does (ICReq with the digests it wants, Connect with
its data in the capsule, writes answered R2T by R2T in H2CData PDUs of at most the
controller's MAXH2CDATA, reads received from C2HData, the SUCCESS flag honoured) through
`nvmet_p2p.host.base.Host`, and its queues also send what no Linux host would: any
ICReq, raw PDU bytes, capsules with any SGL.  Host buffers never leave the host: a
buffer "exposed" for a command is the one its R2Ts read from or its C2HData lands in,
named by a transport SGL data block (type 0x5A), as the Linux host names them.

Sockets are blocking with deadlines (select), one per queue; this is a test tool that
runs beside the target (another thread or process), never on the target's loop.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from nvmet_p2p.host.base import DEFAULT_TIMEOUT, Host, HostQueue
from nvmet_p2p.wire import tcp as pdu
from nvmet_p2p.wire.command import SQE_SIZE, Cqe, Sgl, SglType, Sqe

DEFAULT_PORT = 4420


class TargetTerminated(ConnectionError):
    """The controller sent a C2HTermReq (and closed the connection)."""

    def __init__(self, fes: int, fei: int, data: bytes) -> None:
        name = pdu.Fes(fes).name if fes in pdu.Fes._value2member_map_ else f"{fes:#x}"
        super().__init__(f"C2HTermReq FES {name}, FEI {fei}")
        self.fes = fes
        self.fei = fei
        self.data = data


class IcRefused(ConnectionError):
    """The IC exchange did not produce a usable connection (what came back instead)."""


@dataclass
class IcOptions:
    """What the host puts in its ICReq."""

    hdgst: bool = False
    ddgst: bool = False
    hpda: int = 0
    maxr2t: int = 0  # 0's based; the Linux host asks for a single R2T
    pfv: int = pdu.PFV_1_0


def _connect_socket(traddr: str, trsvcid: int, adrfam: str, timeout: float) -> socket.socket:
    family = socket.AF_INET6 if adrfam == "ipv6" else socket.AF_INET
    info = socket.getaddrinfo(traddr, trsvcid, family, socket.SOCK_STREAM, 0,
                              socket.AI_NUMERICHOST)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(info[4])
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
    except OSError:
        sock.close()
        raise
    return sock


class TcpConnection:
    """One connection to a controller: the socket, the IC exchange, PDUs in and out."""

    def __init__(self, traddr: str, trsvcid: int = DEFAULT_PORT, adrfam: str = "ipv4",
                 ic: IcOptions | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 initialize: bool = True) -> None:
        self.ic = ic or IcOptions()
        self.sock = _connect_socket(traddr, trsvcid, adrfam, timeout)
        self.rx = pdu.PduReceiver(pdu.Role.HOST)
        self.timeout = timeout
        self.icresp: pdu.IcResp | None = None
        self.closed = False
        self.term: TargetTerminated | None = None
        if initialize:
            try:
                self.initialize()
            except BaseException:
                self.close()
                raise

    @property
    def hdgst(self) -> bool:
        return self.rx.hdgst

    @property
    def ddgst(self) -> bool:
        return self.rx.ddgst

    @property
    def cpda(self) -> int:
        return self.icresp.cpda if self.icresp else 0

    @property
    def maxh2cdata(self) -> int:
        return self.icresp.maxh2cdata if self.icresp else 0

    def initialize(self) -> pdu.IcResp:
        """ICReq out, ICResp in and checked the way the Linux host checks it."""
        ic = self.ic
        want = (pdu.Digest.HDR if ic.hdgst else 0) | (pdu.Digest.DATA if ic.ddgst else 0)
        self.send(pdu.encode(pdu.PduType.ICREQ, pdu.IcReq(ic.pfv, ic.hpda, want, ic.maxr2t)))
        events = self.events(self.timeout, until=lambda e: True)
        if not events:
            raise TimeoutError(f"no ICResp within {self.timeout:g} s")
        p = events[0].pdu
        resp = p.psh
        if not isinstance(resp, pdu.IcResp):
            raise IcRefused(f"expected ICResp, got {p.type.name}")
        if resp.pfv != pdu.PFV_1_0:
            raise IcRefused(f"ICResp PFV {resp.pfv}")
        if resp.digest != want:
            raise IcRefused(f"ICResp digests {resp.digest:#x}, asked for {want:#x}")
        if resp.cpda > pdu.MAX_PDA:
            raise IcRefused(f"ICResp CPDA {resp.cpda}")
        if resp.maxh2cdata < pdu.MIN_MAXH2CDATA or resp.maxh2cdata % 4:
            raise IcRefused(f"ICResp MAXH2CDATA {resp.maxh2cdata}")
        self.icresp = resp
        self.rx.negotiated(ic.hdgst, ic.ddgst)
        return resp

    def send(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise ConnectionError("the connection is closed")
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise ConnectionError(f"send failed: {e}") from e

    def send_pdu(self, ptype: pdu.PduType, psh: pdu.Psh,
                 data: bytes | bytearray | memoryview = b"", flags: int = 0) -> None:
        self.send(pdu.encode(ptype, psh, data, flags=flags, hdgst=self.hdgst,
                             ddgst=self.ddgst, pda=self.cpda))

    def events(self, timeout: float, until: Callable[[pdu.Event], bool] | None = None,
               sink: Callable[[pdu.Pdu], memoryview | None] | None = None) -> list[pdu.Event]:
        """PDU events until `until(event)` is true or `timeout` passes.

        `sink(pdu) -> memoryview | None` places a data PDU's data.  A C2HTermReq or the
        target closing the connection raise ConnectionError (TargetTerminated).
        """
        out: list[pdu.Event] = []
        deadline = time.monotonic() + max(timeout, 0)
        while True:
            while (ev := self.rx.next_event()) is not None:
                if isinstance(ev, pdu.PduHeader):
                    view = sink(ev.pdu) if sink is not None else None
                    if view is not None:
                        self.rx.set_sink(view)
                    continue
                if ev.pdu.type == pdu.PduType.C2H_TERM:
                    self._terminated(ev.pdu)
                out.append(ev)
                if until is not None and until(ev):
                    return out
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            if self.closed:
                raise ConnectionError("the connection is closed")
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                continue
            try:
                n = self.sock.recv_into(self.rx.buffer())
            except OSError as e:
                self.closed = True
                raise ConnectionError(f"receive failed: {e}") from e
            if n == 0:
                self.closed = True
                raise ConnectionError("the target closed the connection")
            self.rx.received(n)

    def _terminated(self, p: pdu.Pdu) -> None:
        assert isinstance(p.psh, pdu.TermReq)
        self.term = TargetTerminated(p.psh.fes, p.psh.fei, bytes(p.data or b""))
        self.closed = True
        raise self.term

    def close(self) -> None:
        self.closed = True
        if self.sock.fileno() >= 0:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


class TcpHostQueue(HostQueue):
    """A host queue over one NVMe/TCP connection."""

    def __init__(self, host: TcpHost, qid: int, size: int) -> None:
        super().__init__(qid, size)
        self.conn = TcpConnection(host.traddr, host.trsvcid, host.adrfam, host.ic,
                                  timeout=host.timeout)
        self.inline_connect = host.inline_connect
        self.buffers: dict[int, bytearray] = {}  # cid -> the buffer its data moves through
        self._staged: bytearray | None = None
        self.ddgst_errors: list[int] = []  # cids whose C2HData failed its data digest
        self.h2c_pdus = 0
        self.c2h_success = 0

    # -- HostQueue ---------------------------------------------------------------------
    def send(self, capsule: bytes) -> None:
        cid = Sqe.decode(capsule[:SQE_SIZE]).cid
        if self._staged is not None:
            self.buffers[cid] = self._staged
            self._staged = None
        self.conn.send_pdu(pdu.PduType.CMD, pdu.CapsuleCmd(bytes(capsule[:SQE_SIZE])),
                           capsule[SQE_SIZE:])

    def progress(self, timeout: float) -> None:
        got = len(self.done)

        def completed(ev: pdu.Event) -> bool:
            self._handle(ev)
            return len(self.done) > got
        self.conn.events(timeout, until=completed, sink=self._sink)

    def expose(self, buf: bytearray, invalidate: bool = False) -> Sgl:
        self._staged = buf  # named by the command send() transmits next
        return Sgl(SglType.TRANSPORT_DATA_BLOCK, 0, len(buf))

    def unexpose(self, sgl: Sgl) -> None:
        pass  # the buffer was dropped when its command completed

    def null_sgl(self) -> Sgl:
        return Sgl(SglType.TRANSPORT_DATA_BLOCK, 0, 0)

    def close(self) -> None:
        self.conn.close()

    @property
    def connected(self) -> bool:
        return not self.conn.closed

    # -- PDUs ----------------------------------------------------------------------------
    def _sink(self, p: pdu.Pdu) -> memoryview | None:
        psh = p.psh
        if p.type != pdu.PduType.C2H_DATA or not isinstance(psh, pdu.DataPdu):
            return None
        buf = self.buffers.get(psh.cccid)
        if buf is None or psh.datao + psh.datal > len(buf):
            return None  # a bad C2HData: collected aside and reported by _handle
        return memoryview(buf)[psh.datao:psh.datao + psh.datal]

    def _handle(self, ev: pdu.Event) -> None:
        p = ev.pdu
        psh = p.psh
        if isinstance(psh, pdu.CapsuleResp):
            cqe = Cqe.decode(psh.cqe)
            self.buffers.pop(cqe.cid, None)
            self.on_cqe(psh.cqe)
        elif isinstance(psh, pdu.DataPdu):
            buf = self.buffers.get(psh.cccid)
            if buf is None or psh.datao + psh.datal > len(buf):
                raise ConnectionError(f"C2HData for command {psh.cccid} at {psh.datao}+"
                                      f"{psh.datal} matches no read buffer")
            if p.ddgst_ok is False:
                self.ddgst_errors.append(psh.cccid)
            if p.flags & pdu.Flag.DATA_SUCCESS:
                if not p.flags & pdu.Flag.DATA_LAST:
                    raise ConnectionError(f"C2HData SUCCESS without LAST for {psh.cccid}")
                self.c2h_success += 1
                self.buffers.pop(psh.cccid, None)
                self.on_cqe(Cqe(sq_id=self.qid, cid=psh.cccid).encode())
        elif isinstance(psh, pdu.R2T):
            self._r2t(psh)

    def _r2t(self, r2t: pdu.R2T) -> None:
        """Send the data an R2T asks for, in H2CData PDUs of at most MAXH2CDATA."""
        buf = self.buffers.get(r2t.cccid)
        if buf is None or r2t.r2tl == 0 or r2t.r2to + r2t.r2tl > len(buf):
            raise ConnectionError(f"R2T for command {r2t.cccid} at {r2t.r2to}+{r2t.r2tl} "
                                  "matches no write buffer")
        view = memoryview(buf)
        end = r2t.r2to + r2t.r2tl
        off = r2t.r2to
        while off < end:
            n = min(self.conn.maxh2cdata, end - off)
            flags = pdu.Flag.DATA_LAST if off + n == end else 0
            self.conn.send_pdu(pdu.PduType.H2C_DATA, pdu.DataPdu(r2t.cccid, r2t.ttag, off, n),
                               view[off:off + n], flags=flags)
            self.h2c_pdus += 1
            off += n


class TcpHost(Host):
    """An NVMe/TCP host association with one subsystem, for tests and tools."""

    def __init__(self, traddr: str, trsvcid: int = DEFAULT_PORT, *, adrfam: str = "ipv4",
                 hostnqn: str | None = None, hostid: bytes | None = None,
                 hdgst: bool = False, ddgst: bool = False, hpda: int = 0,
                 disable_sqflow: bool = False, inline_connect: bool = True,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(hostnqn, hostid)
        self.traddr = traddr
        self.trsvcid = trsvcid
        self.adrfam = adrfam
        self.ic = IcOptions(hdgst=hdgst, ddgst=ddgst, hpda=hpda)
        self.inline_connect = inline_connect
        self.timeout = timeout
        if disable_sqflow:
            self.cattr |= 0x4

    def open_queue(self, qid: int, size: int) -> TcpHostQueue:
        return TcpHostQueue(self, qid, size)

    def connection(self, ic: IcOptions | None = None, initialize: bool = True) -> TcpConnection:
        """A bare connection to the same controller address (raw tests)."""
        return TcpConnection(self.traddr, self.trsvcid, self.adrfam, ic or self.ic,
                             timeout=self.timeout, initialize=initialize)
