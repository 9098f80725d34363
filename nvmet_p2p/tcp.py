"""The NVMe/TCP transport: listeners, one TCP connection per NVMe queue, PDUs, data movement.

Reactor discipline, as for RDMA: everything runs on the target's asyncio loop and no
socket call ever blocks.  Listening and connected sockets are non-blocking and watched
with `loop.add_reader`; a connection is also watched for writability only while the
kernel's send buffer is full.  No thread per connection.  Responses produced during one
loop iteration leave in one `sendmsg` (the flush runs once per iteration), and a
readable connection gets a bounded number of receives before the others get a turn.

The byte stream is cut into PDUs by `wire.tcp.PduReceiver`; the bulk of a PDU's data is
received straight into the command's data buffer (`recv_into` its memoryview), so a
write's payload lands in its P2P chunk or system-memory chunk without a copy of ours.
Reads go out as one C2HData PDU whose data is the buffer itself (`sendmsg` of the
header, the buffer's memoryview and the digest).

Queue life: accept -> ICReq (PFV 1.0, HPDA honoured for our C2HData, digests as the host
asks, as the kernel does) -> ICResp (CPDA 0, MAXH2CDATA) -> capsules.  The NVMe queue
id and size come with Connect (TCP has no connection-time private data).  A connection
without a controller after `connect_timeout` is closed; one with a controller lives
under keep-alive, and one that holds buffers for R2Ts and sends nothing for
`data_timeout` (the host's own I/O timeout would have fired by then) is closed and its
controller made fatal, so that a stalled host cannot keep the buffer pool from others.  A fatal PDU error sends a C2HTermReq with the fatal error status,
closes the connection and, as the kernel's nvmet_tcp_fatal_error, makes the controller
fatal so that its host reconnects every queue.

A command is a state machine (`CmdState`), as in rdma.py: `_process` drives it until its
state stops changing; waiting for a data buffer and for the host's H2CData are states,
the core may call `queue_response` from inside `init()`/`execute()`.  Writes with more
data than fits in the capsule get one R2T for the whole transfer once a buffer is
allocated (the kernel's and SPDK's choice); the host splits it into H2CData PDUs of at
most MAXH2CDATA, each checked against the R2T window.  A read whose host disabled SQ
flow control at Connect completes with the C2HData SUCCESS flag and no CapsuleResp.
A data digest error completes the command with Transient Transport Error (NVMe/TCP
binding; SPDK does the same) and the connection goes on.

Data descriptors: in-capsule data (offset data block) or a transport SGL data block
(0x5A), what the Linux host sends.  The kernel takes any other descriptor type as
transport data too; we answer it with SGL Descriptor Type Invalid, as SPDK does.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
from collections import deque
from collections.abc import Callable
from enum import IntEnum, auto
from typing import TYPE_CHECKING, Any

from nvmet_p2p import logfmt
from nvmet_p2p.cmb import SystemMemoryProvider
from nvmet_p2p.core.request import DataDir
from nvmet_p2p.core.sgl import DataMap, SglKind, map_sgl
from nvmet_p2p.errors import TransportError
from nvmet_p2p.wire import tcp as pdu
from nvmet_p2p.wire.command import SQE_SIZE
from nvmet_p2p.wire.limits import NVME_AQ_DEPTH, NVME_RDMA_IP_PORT
from nvmet_p2p.wire.status import Status

if TYPE_CHECKING:
    from nvmet_p2p.cmb import Provider
    from nvmet_p2p.configfs import Port
    from nvmet_p2p.core.ctrl import Ctrl
    from nvmet_p2p.core.queue import SQ
    from nvmet_p2p.core.request import Request
    from nvmet_p2p.core.target import Target

log = logging.getLogger("nvmet_p2p.tcp")


def _peer(peer: Any) -> str:
    """A socket address as host:port ([host]:port for IPv6), for log lines."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return str(peer)

DEFAULT_TRSVCID = NVME_RDMA_IP_PORT  # the IANA NVMe-oF port serves TCP too
# Data bytes one H2CData PDU may carry (ICResp MAXH2CDATA).  SPDK's default; the kernel
# offers 16 MiB.  Bigger writes come as several PDUs of one R2T.
MAXH2CDATA = 128 << 10
PRE_CONNECT_CMDS = NVME_AQ_DEPTH  # commands a queue may hold before Connect sizes it
CONNECT_TIMEOUT_S = 30.0  # a connection must have a controller by then
DATA_TIMEOUT_S = 30.0  # R2T'd data may pause this long (the Linux host's nvme_core.io_timeout)
RECV_BUDGET = 16  # receives per readable event before other connections get a turn
IOV_MAX = 512  # buffers per sendmsg (Linux UIO_MAXIOV is 1024)
LISTEN_BACKLOG = 128  # NVMET_TCP_BACKLOG
DEFAULT_POOL_SIZE = 32 << 20


class CmdState(IntEnum):  # int hashing: _STEPS is looked up at every step
    NEW = auto()  # capsule received; the core parses it, the SGL is mapped
    NEED_BUFFER = auto()  # waits for a data buffer
    TRANSFERRING_HOST_TO_TARGET = auto()  # R2T queued; waits for the H2CData PDUs
    READY_TO_EXECUTE = auto()  # data in place; hand to the core
    EXECUTING = auto()  # the core / backend works; waits for queue_response
    EXECUTED = auto()  # response known
    COMPLETING = auto()  # C2HData / CapsuleResp queued; waits until the socket took them
    COMPLETED = auto()  # buffers returned; the context is free


class QueueState(IntEnum):
    CONNECTING = auto()  # accepted; waits for the ICReq
    LIVE = auto()  # ICResp sent; capsules flow
    DEAD = auto()  # torn down


class TcpCmd:
    """The transport's per-command context; its index is the R2T transfer tag."""

    __slots__ = (
        "busy",
        "capsule",
        "ddgst_error",
        "dmap",
        "index",
        "received",
        "req",
        "responded",
        "sent",
        "state",
        "waiting",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.reset()

    def reset(self) -> None:
        self.state = CmdState.COMPLETED
        self.capsule: bytearray | bytes = b""
        self.req: Request | None = None
        self.dmap: DataMap | None = None
        self.received = 0  # H2CData bytes in so far
        self.ddgst_error = False  # a data digest of this command's data did not match
        self.responded = False  # queue_response was called
        self.sent = False  # the socket took the last byte of the response
        self.busy = False
        self.waiting = False


class Listener:
    """One port's listening socket."""

    def __init__(self, transport: TcpTransport, port: Port) -> None:
        self.port = port
        family = socket.AF_INET6 if port.addr_adrfam == "ipv6" else socket.AF_INET
        svc = int(port.addr_trsvcid or DEFAULT_TRSVCID)
        try:
            infos = socket.getaddrinfo(port.addr_traddr, svc, family, socket.SOCK_STREAM, 0,
                                       socket.AI_NUMERICHOST | socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise TransportError(f"{port.addr_traddr!r} is not an {port.addr_adrfam} "
                                 f"address: {e}") from e
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.bind(infos[0][4])
            self.sock.listen(LISTEN_BACKLOG)
            self.sock.setblocking(False)
        except OSError as e:
            self.sock.close()
            raise TransportError(e.strerror or str(e)) from e
        self.transport = transport
        transport.loop.add_reader(self.sock.fileno(), transport._accept, self)

    @property
    def address(self) -> tuple[str, int]:
        host, svc = self.sock.getsockname()[:2]
        return host, svc

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.transport.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class TcpQueue:
    """One NVMe queue: a connected socket, its PDU receiver and send queue, its commands."""

    def __init__(self, transport: TcpTransport, port: Port, sock: socket.socket,
                 peer: Any) -> None:
        self.transport = transport
        self.port = port
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.state = QueueState.CONNECTING
        self.dead = False  # state is DEAD (read on every step of every command)
        self.hdgst = self.ddgst = False
        self.hpda = 0
        self.maxr2t = 0
        self.rx = pdu.PduReceiver(pdu.Role.CONTROLLER, max_cmd_data=pdu.NVME_TCP_ADMIN_CCSZ,
                                  maxh2cdata=transport.maxh2cdata)
        self.capsule: bytearray | bytes = b""  # the CapsuleCmd whose data is arriving
        self.out: deque[tuple[memoryview, Callable[[], None] | None]] = deque()
        self.flush_scheduled = False
        self.writer = False  # add_writer is armed: the send buffer was full
        self.cmds: list[TcpCmd] = []
        self.free_cmds: deque[TcpCmd] = deque()
        self.inflight: set[TcpCmd] = set()
        self.timer: Any = None  # the connect deadline
        self.data_timer: Any = None  # armed while R2Ts wait for their data
        self.rx_bytes = 0  # received so far: the data timer's measure of progress
        self.rx_mark = 0
        self.sq: SQ = transport.target.create_sq(port, transport)
        self.sq.priv = self
        self.sq.local_traddr = sock.getsockname()[0]

    @property
    def qid(self) -> int:
        return self.sq.qid

    def inline_size(self) -> int:
        """In-capsule data this queue takes: the port's on I/O queues, the host's 8 KiB
        assumption on the admin queue and before Connect says which queue this is."""
        if self.sq.ctrl is None or self.sq.qid == 0:
            return max(pdu.NVME_TCP_ADMIN_CCSZ, self.transport.target.inline_data_size(self.port))
        return self.transport.target.inline_data_size(self.port)

    def get_cmd(self) -> TcpCmd | None:
        """A free command context; None when the host overran its queue size."""
        limit = 2 * self.sq.size if self.sq.size else PRE_CONNECT_CMDS  # as the kernel's nr_cmds
        if not self.free_cmds and len(self.cmds) < min(limit, 0x10000):
            self.free_cmds.append(TcpCmd(len(self.cmds)))
            self.cmds.append(self.free_cmds[-1])
        return self.free_cmds.popleft() if self.free_cmds else None

    def send(self, data: bytes | memoryview, on_sent: Callable[[], None] | None = None) -> None:
        """Queue bytes for the socket; `on_sent` runs once the socket has taken them all."""
        self.out.append((memoryview(data), on_sent))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.transport.loop.call_soon(self.transport._flush, self)

    def counts(self) -> dict[str, int]:
        return {"cmds": len(self.cmds), "inflight": len(self.inflight)}


class TcpTransport:
    """TransportOps for trtype "tcp" (see nvmet_p2p.core.transport)."""

    trtype = "tcp"
    keyed_sgls = False  # the data moves in our own PDUs: SGL transport data blocks
    msdbd = 1

    def __init__(self, target: Target, pool: Any = None, *,
                 pool_size: int = DEFAULT_POOL_SIZE, maxh2cdata: int = MAXH2CDATA,
                 connect_timeout: float = CONNECT_TIMEOUT_S,
                 data_timeout: float = DATA_TIMEOUT_S) -> None:
        if maxh2cdata < pdu.MIN_MAXH2CDATA or maxh2cdata % 4:
            raise ValueError(f"MAXH2CDATA {maxh2cdata} must be a multiple of 4, at least "
                             f"{pdu.MIN_MAXH2CDATA}")
        self.target = target
        self.loop = target.loop
        self.pool = pool if pool is not None else SystemMemoryProvider(pool_size,
                                                                       hugepages=False)
        self._own_pool = pool is None
        self.maxh2cdata = maxh2cdata
        self.connect_timeout = connect_timeout
        self.data_timeout = data_timeout
        self.listeners: dict[int, Listener] = {}  # portid -> listener
        self.queues: dict[int, TcpQueue] = {}  # fd -> queue
        self.wait_buffer: deque[tuple[TcpQueue, TcpCmd]] = deque()
        # connections accepted / with header / data digests, PDUs and events of note
        self.stats = {"accepted": 0, "hdgst_queues": 0, "ddgst_queues": 0,
                      "term_sent": 0, "term_received": 0,
                      "hdr_digest_errors": 0, "data_digest_errors": 0, "r2t": 0,
                      "h2c_data": 0, "c2h_success": 0, "buffer_waits": 0}
        target.register_transport(self)

    # -- TransportOps -------------------------------------------------------------
    def add_port(self, port: Port) -> None:
        if port.portid in self.listeners:
            return
        self.listeners[port.portid] = Listener(self, port)
        logfmt.info(log, "tcp_listening", portid=port.portid, traddr=port.addr_traddr,
                    trsvcid=port.addr_trsvcid or DEFAULT_TRSVCID)

    def remove_port(self, port: Port) -> None:
        lst = self.listeners.pop(port.portid, None)
        if lst is not None:
            lst.close()

    def queue_response(self, req: Request) -> None:
        cmd = req.priv if isinstance(req.priv, TcpCmd) else None
        if cmd is None or cmd.req is not req:
            return  # its queue was torn down and the context reused: nothing to send
        cmd.responded = True
        q: TcpQueue = req.sq.priv
        if q.dead:
            self._finish(q, cmd)  # executing when the queue died: its buffer goes back now
            return
        self._process(q, cmd)

    def delete_ctrl(self, ctrl: Ctrl) -> None:
        for q in [q for q in self.queues.values() if q.sq.ctrl is ctrl]:
            self._teardown(q, "controller deleted")

    def p2p_client(self, port: Port) -> str | None:
        """No DMA client: the CPU copies between the socket buffers and the data buffer
        (recv_into / sendmsg), so only the namespace's device must reach the provider."""
        return None

    def p2p_can_register(self, provider: Provider) -> str | None:
        """Why the CPU copies of this transport cannot use `provider`'s memory, or None.

        A chunk is written by the kernel's copy out of the socket (recv_into) and, for
        bytes that arrived together with their PDU header, by a plain memcpy of ours; it
        is read by the kernel's copy into the socket and by the CRC32C of data digests.
        None of these follows a provider's access rules: a provider that needs whole,
        ordered block stores is refused; its fixed store width is not enforced (the
        QEMU CMB used in the tests takes any access size).
        """
        if provider.access.block is not None:
            return (f"{provider.name} needs whole {provider.access.block}-byte block stores, "
                    "which the kernel's socket copy into the buffer does not make")
        return None

    # -- accounting and shutdown ----------------------------------------------------
    def resources(self) -> dict[str, int]:
        return {"queues": len(self.queues), "listeners": len(self.listeners),
                "sockets": len(self.queues) + len(self.listeners),
                "inflight": sum(len(q.inflight) for q in self.queues.values()),
                **self.stats}

    def close(self) -> None:
        for q in list(self.queues.values()):
            self._teardown(q, "transport closing")
        for portid in list(self.listeners):
            self.listeners.pop(portid).close()
        if self._own_pool:
            self.pool.close()

    # -- connections -------------------------------------------------------------------
    def _accept(self, lst: Listener) -> None:
        while True:
            try:
                sock, peer = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. EMFILE: the listener stays, the host retries
                logfmt.warning(log, "tcp_accept_failed", portid=lst.port.portid, reason=e)
                return
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                q = TcpQueue(self, lst.port, sock, peer)
            except OSError as e:
                logfmt.warning(log, "tcp_setup_failed", peer=_peer(peer), reason=e)
                sock.close()
                continue
            self.queues[q.fd] = q
            self.stats["accepted"] += 1
            self.loop.add_reader(q.fd, self._readable, q)
            q.timer = self.loop.call_later(self.connect_timeout, self._connect_deadline, q)
            log.debug("tcp: port %d: connection from %s", lst.port.portid, peer)

    def _connect_deadline(self, q: TcpQueue) -> None:
        q.timer = None
        if not q.dead and q.sq.ctrl is None:
            self._teardown(q, f"no Connect within {self.connect_timeout:g} s")

    def _teardown(self, q: TcpQueue, why: str) -> None:
        if q.dead:
            return
        q.state, q.dead = QueueState.DEAD, True
        logfmt.info(log, "tcp_queue_torn_down", qid=q.qid, peer=_peer(q.peer), reason=why)
        self.queues.pop(q.fd, None)
        for timer in (q.timer, q.data_timer):
            if timer is not None:
                timer.cancel()
        q.timer = q.data_timer = None
        self.loop.remove_reader(q.fd)
        if q.writer:
            self.loop.remove_writer(q.fd)
        with contextlib.suppress(OSError):
            q.sock.shutdown(socket.SHUT_RDWR)
        q.sock.close()
        q.out.clear()  # the socket is gone: whatever it did not take will never go
        for cmd in list(q.inflight):
            if cmd.state is CmdState.EXECUTING and not cmd.responded:
                continue  # the backend still owns req.buf; queue_response frees it
            if cmd.req is not None:
                cmd.req.uninit()  # parsed but waiting for a buffer or the host's data
            self._finish(q, cmd)
        self.wait_buffer = deque((wq, c) for wq, c in self.wait_buffer if wq is not q)
        q.sq.destroy()

    def _data_deadline(self, q: TcpQueue) -> None:
        """R2Ts are outstanding: the host must have sent something since the last look."""
        q.data_timer = None
        if q.dead or not any(c.state is CmdState.TRANSFERRING_HOST_TO_TARGET
                             for c in q.inflight):
            return
        if q.rx_bytes == q.rx_mark:
            why = f"no data for its R2Ts within {self.data_timeout:g} s"
            logfmt.warning(log, "tcp_queue_error", qid=q.qid, peer=_peer(q.peer),
                           reason=f"{why}; closing the connection")
            ctrl = q.sq.ctrl
            self._teardown(q, why)
            if ctrl is not None:
                ctrl.fatal_error(f"NVMe/TCP qid {q.qid}: {why}")
            return
        q.rx_mark = q.rx_bytes
        q.data_timer = self.loop.call_later(self.data_timeout, self._data_deadline, q)

    def _fatal(self, q: TcpQueue, err: pdu.PduError) -> None:
        """A PDU broke the binding: C2HTermReq, close, and the controller goes fatal."""
        logfmt.warning(log, "tcp_queue_error", qid=q.qid, peer=_peer(q.peer),
                       reason=f"{err}; terminating the connection")
        if err.fes == pdu.Fes.HDR_DIGEST_ERR:
            self.stats["hdr_digest_errors"] += 1
        self.stats["term_sent"] += 1
        # Best effort, past the send queue: a TermReq is the last thing on this connection.
        q.out.clear()
        with contextlib.suppress(OSError):
            q.sock.send(pdu.term_req(pdu.PduType.C2H_TERM, err.fes, err.fei, err.header))
        ctrl = q.sq.ctrl
        self._teardown(q, f"fatal transport error: {err.why}")
        if ctrl is not None:
            ctrl.fatal_error(f"NVMe/TCP fatal error on qid {q.qid}: {err.why}")

    # -- receiving -------------------------------------------------------------------------
    def _readable(self, q: TcpQueue) -> None:
        self._receive(q)
        if q.flush_scheduled and not q.dead:
            # what this turn's capsules completed at once (inline I/O) goes out now, not
            # after another turn of the loop: one epoll_wait fewer per command at QD1
            self._flush(q)

    def _receive(self, q: TcpQueue) -> None:
        for _ in range(RECV_BUDGET):
            if q.dead:
                return
            buf = q.rx.buffer()
            try:
                n = q.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._teardown(q, f"receive failed: {e}")
                return
            if n == 0:
                self._teardown(q, "the host closed the connection"
                               + (" in the middle of a PDU" if q.rx.mid_pdu else ""))
                return
            q.rx.received(n)
            q.rx_bytes += n
            try:
                while not q.dead and (ev := q.rx.next_event()) is not None:
                    self._event(q, ev)
            except pdu.PduError as err:
                self._fatal(q, err)
                return
            except Exception:  # a bug of ours costs this connection, not the target
                log.exception("%s", logfmt.line("event", "tcp_pdu_failed", {
                    "qid": q.qid, "peer": _peer(q.peer)}))
                self._teardown(q, "internal error")
                return
            if n < len(buf):
                return  # the socket is drained: the next readable event says when not

    def _event(self, q: TcpQueue, ev: pdu.Event) -> None:
        p = ev.pdu
        if isinstance(ev, pdu.PduHeader):
            if p.type == pdu.PduType.CMD:
                assert isinstance(p.psh, pdu.CapsuleCmd)
                capsule = bytearray(SQE_SIZE + p.data_len)
                capsule[:SQE_SIZE] = p.psh.sqe
                q.rx.set_sink(memoryview(capsule)[SQE_SIZE:])
                q.capsule = capsule
            elif p.type == pdu.PduType.H2C_DATA:
                self._h2c_header(q, p)
            return
        if p.type == pdu.PduType.CMD:
            assert isinstance(p.psh, pdu.CapsuleCmd)
            whole = q.capsule if p.data_len else p.psh.sqe
            q.capsule = b""
            self._capsule(q, whole, p.ddgst_ok is not False)
        elif p.type == pdu.PduType.H2C_DATA:
            self._h2c_done(q, p)
        elif p.type == pdu.PduType.ICREQ:
            assert isinstance(p.psh, pdu.IcReq)
            self._icreq(q, p.psh)
        elif p.type == pdu.PduType.H2C_TERM:
            assert isinstance(p.psh, pdu.TermReq)
            self.stats["term_received"] += 1
            self._teardown(q, f"the host terminated the connection (H2CTermReq FES "
                              f"{p.psh.fes:#x}, FEI {p.psh.fei:#x})")

    def _icreq(self, q: TcpQueue, ic: pdu.IcReq) -> None:
        q.hdgst = bool(ic.digest & pdu.Digest.HDR)
        q.ddgst = bool(ic.digest & pdu.Digest.DATA)
        q.hpda, q.maxr2t = ic.hpda, ic.maxr2t
        granted = (pdu.Digest.HDR if q.hdgst else 0) | (pdu.Digest.DATA if q.ddgst else 0)
        q.send(pdu.encode(pdu.PduType.ICRESP, pdu.IcResp(
            pdu.PFV_1_0, cpda=0, digest=granted, maxh2cdata=self.maxh2cdata)))
        q.rx.negotiated(q.hdgst, q.ddgst)
        q.state = QueueState.LIVE
        self.stats["hdgst_queues"] += q.hdgst
        self.stats["ddgst_queues"] += q.ddgst
        log.debug("tcp: %s: ICReq hpda %d digests %s maxr2t %d", q.peer, ic.hpda,
                  ["none", "header", "data", "header+data"][granted], ic.maxr2t)

    def _capsule(self, q: TcpQueue, capsule: bytearray | bytes, ddgst_ok: bool) -> None:
        cmd = q.get_cmd()
        if cmd is None:
            raise pdu.PduError(pdu.Fes.PDU_SEQ_ERR, pdu.FEI_TYPE,
                               f"more commands than the queue holds ({len(q.cmds)})",
                               q.rx.last_header)
        if not ddgst_ok:
            self.stats["data_digest_errors"] += 1
        cmd.state = CmdState.NEW
        cmd.capsule = capsule
        cmd.ddgst_error = not ddgst_ok
        q.inflight.add(cmd)
        self._process(q, cmd)
        q.rx.max_cmd_data = q.inline_size()  # Connect may just have said which queue this is

    def _h2c_header(self, q: TcpQueue, p: pdu.Pdu) -> None:
        """Where an H2CData PDU's data goes: the window of its command's R2T, or fatal."""
        psh = p.psh
        assert isinstance(psh, pdu.DataPdu)
        cmd = q.cmds[psh.ttag] if psh.ttag < len(q.cmds) else None
        if cmd is None or cmd.state is not CmdState.TRANSFERRING_HOST_TO_TARGET:
            raise pdu.PduError(pdu.Fes.INVALID_PDU_HDR, pdu.FEI_TTAG,
                               f"H2CData for transfer tag {psh.ttag}, which awaits no data",
                               q.rx.last_header)
        assert cmd.req is not None and cmd.req.buf is not None and cmd.dmap is not None
        bad = pdu.check_h2c_window(psh, cccid=cmd.req.cqe.cid, r2to=0, r2tl=cmd.dmap.length,
                                   expected=cmd.received)
        if bad is not None:
            raise pdu.PduError(*bad, q.rx.last_header)
        q.rx.set_sink(cmd.req.buf[psh.datao:psh.datao + psh.datal])

    def _h2c_done(self, q: TcpQueue, p: pdu.Pdu) -> None:
        psh = p.psh
        assert isinstance(psh, pdu.DataPdu)
        cmd = q.cmds[psh.ttag]
        self.stats["h2c_data"] += 1
        cmd.received += psh.datal
        if p.ddgst_ok is False:
            self.stats["data_digest_errors"] += 1
            cmd.ddgst_error = True
        self._process(q, cmd)

    # -- sending ---------------------------------------------------------------------------
    def _flush(self, q: TcpQueue) -> None:
        """Hand the send queue to the socket; what it cannot take waits for writability."""
        q.flush_scheduled = False
        while q.out and not q.dead:
            bufs = [b for b, _ in itertools.islice(q.out, IOV_MAX)]
            try:
                n = q.sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._teardown(q, f"send failed: {e}")
                return
            full = n < sum(len(b) for b in bufs)
            while n:
                buf, on_sent = q.out[0]
                if n < len(buf):
                    q.out[0] = (buf[n:], on_sent)
                    break
                n -= len(buf)
                q.out.popleft()
                if on_sent is not None:
                    on_sent()
            if full:
                break  # the kernel's send buffer is full
        if q.dead or bool(q.out) == q.writer:
            return
        q.writer = bool(q.out)
        if q.writer:
            self.loop.add_writer(q.fd, self._flush, q)
        else:
            self.loop.remove_writer(q.fd)

    # -- the command state machine --------------------------------------------------------
    def _process(self, q: TcpQueue, cmd: TcpCmd) -> None:
        if cmd.busy:
            return  # re-entered from init()/execute(): the outer loop goes on
        cmd.busy = True
        try:
            while not q.dead:
                nxt = _STEPS[cmd.state](self, q, cmd)
                if nxt is cmd.state:
                    break
                cmd.state = nxt
        finally:
            cmd.busy = False

    def _st_new(self, q: TcpQueue, cmd: TcpCmd) -> CmdState:
        capsule = memoryview(cmd.capsule)
        req = q.sq.new_request(capsule)
        cmd.req = req
        req.priv = cmd
        if not req.init():
            return CmdState.EXECUTED  # the core completed it already
        if cmd.ddgst_error:
            req.complete(Status.TRANSIENT_TRANSPORT)  # the in-capsule data arrived damaged
            return CmdState.EXECUTED
        assert req.cmd is not None
        m = map_sgl(req.cmd.sgl, transfer_len=req.transfer_len,
                    host_write=req.data_dir == DataDir.TO_CTRL,
                    inline_data_size=q.inline_size(),
                    capsule_data_len=len(capsule) - SQE_SIZE, keyed_sgls=False,
                    transport_sgls=True, max_transfer=self.target.max_transfer)
        if isinstance(m, int):
            req.complete(m)
            return CmdState.EXECUTED
        cmd.dmap = m
        if m.kind == SglKind.INLINE:
            req.use_in_capsule_data(capsule[SQE_SIZE + m.offset:SQE_SIZE + m.offset + m.length])
            return CmdState.READY_TO_EXECUTE
        if m.kind == SglKind.TRANSPORT:
            return CmdState.NEED_BUFFER
        return CmdState.READY_TO_EXECUTE

    def _st_need_buffer(self, q: TcpQueue, cmd: TcpCmd) -> CmdState:
        if self.wait_buffer and self.wait_buffer[0][1] is not cmd:
            if not cmd.waiting:
                cmd.waiting = True
                self.wait_buffer.append((q, cmd))
            return CmdState.NEED_BUFFER
        req = cmd.req
        assert req is not None and cmd.dmap is not None
        # the core's buffer: the P2P provider first, else our pool (nvmet_req_alloc_sgls)
        if not req.alloc_data_buffer(cmd.dmap.length, self.pool):
            if not cmd.waiting:
                cmd.waiting = True
                self.stats["buffer_waits"] += 1
                self.wait_buffer.append((q, cmd))
            return CmdState.NEED_BUFFER
        if cmd.waiting:
            cmd.waiting = False
            self.wait_buffer.popleft()
        if req.data_dir != DataDir.TO_CTRL:
            return CmdState.READY_TO_EXECUTE
        # One R2T for the whole transfer, as the kernel and SPDK send it.
        self.stats["r2t"] += 1
        if q.data_timer is None:
            q.rx_mark = q.rx_bytes
            q.data_timer = self.loop.call_later(self.data_timeout, self._data_deadline, q)
        q.send(pdu.header(pdu.PduType.R2T, pdu.R2T(req.cqe.cid, cmd.index, 0,
                                                   cmd.dmap.length), hdgst=q.hdgst))
        return CmdState.TRANSFERRING_HOST_TO_TARGET

    def _st_receiving(self, q: TcpQueue, cmd: TcpCmd) -> CmdState:
        assert cmd.req is not None and cmd.dmap is not None
        if cmd.received < cmd.dmap.length:
            return CmdState.TRANSFERRING_HOST_TO_TARGET
        if cmd.ddgst_error:
            cmd.req.complete(Status.TRANSIENT_TRANSPORT)
            return CmdState.EXECUTED
        return CmdState.READY_TO_EXECUTE

    def _st_ready(self, q: TcpQueue, cmd: TcpCmd) -> CmdState:
        assert cmd.req is not None
        cmd.req.execute()  # may call queue_response before returning
        return CmdState.EXECUTING

    def _st_executing(self, q: TcpQueue, cmd: TcpCmd) -> CmdState:
        return CmdState.EXECUTED if cmd.responded else CmdState.EXECUTING

    def _st_executed(self, q: TcpQueue, cmd: TcpCmd) -> CmdState:
        req, m = cmd.req, cmd.dmap
        assert req is not None
        cqe = req.cqe
        with_data = (m is not None and m.kind == SglKind.TRANSPORT and cqe.status == 0
                     and req.data_dir == DataDir.FROM_CTRL and req.buf is not None)
        if not with_data:
            q.send(pdu.rsp_header(cqe.encode(), q.hdgst), _Sent(cmd, self, q))
            return CmdState.COMPLETING
        assert m is not None and req.buf is not None
        # The CQE would say only "success": with SQ flow control disabled (no SQ head to
        # report) it may be left out, as the kernel's nvmet_setup_c2h_data_pdu does.
        success = q.sq.disable_sqflow and cqe.result == 0
        flags = pdu.F_DATA_LAST | (pdu.F_DATA_SUCCESS if success else 0)
        data = req.buf[:m.length]
        q.send(pdu.c2h_data_header(cqe.cid, m.length, flags, q.hdgst, q.ddgst, q.hpda))
        if q.ddgst:
            q.send(data)
            data = memoryview(pdu.digest(data))
        if success:
            self.stats["c2h_success"] += 1
        else:
            q.send(data)
            data = memoryview(pdu.rsp_header(cqe.encode(), q.hdgst))
        q.send(data, _Sent(cmd, self, q))  # the buffer goes back once the last piece is out
        return CmdState.COMPLETING

    def _st_completing(self, q: TcpQueue, cmd: TcpCmd) -> CmdState:
        return CmdState.COMPLETED if cmd.sent else CmdState.COMPLETING

    def _st_completed(self, q: TcpQueue, cmd: TcpCmd) -> CmdState:
        self._finish(q, cmd)
        return CmdState.COMPLETED

    def _finish(self, q: TcpQueue, cmd: TcpCmd) -> None:
        """Return the command's buffer and context; idempotent."""
        if cmd not in q.inflight:
            return
        q.inflight.discard(cmd)
        if cmd.waiting:
            self.wait_buffer = deque((wq, c) for wq, c in self.wait_buffer if c is not cmd)
        req = cmd.req
        freed = req is not None and req.chunk is not None
        if req is not None:
            req.priv = None
            req.free_data_buffer()
        cmd.reset()
        q.free_cmds.append(cmd)
        if freed and self.wait_buffer:
            self._kick_buffers()

    def _kick_buffers(self) -> None:
        while self.wait_buffer:
            wq, head = self.wait_buffer[0]
            self._process(wq, head)
            if head.state is CmdState.NEED_BUFFER:
                break


class _Sent:
    """The socket took a command's last response byte: its buffer can go back."""

    __slots__ = ("cmd", "q", "req", "transport")

    def __init__(self, cmd: TcpCmd, transport: TcpTransport, q: TcpQueue) -> None:
        self.cmd, self.transport, self.q, self.req = cmd, transport, q, cmd.req

    def __call__(self) -> None:
        if self.cmd.req is self.req:  # not reset by a teardown meanwhile
            self.cmd.sent = True
            self.transport._process(self.q, self.cmd)


_STEPS = {
    CmdState.NEW: TcpTransport._st_new,
    CmdState.NEED_BUFFER: TcpTransport._st_need_buffer,
    CmdState.TRANSFERRING_HOST_TO_TARGET: TcpTransport._st_receiving,
    CmdState.READY_TO_EXECUTE: TcpTransport._st_ready,
    CmdState.EXECUTING: TcpTransport._st_executing,
    CmdState.EXECUTED: TcpTransport._st_executed,
    CmdState.COMPLETING: TcpTransport._st_completing,
    CmdState.COMPLETED: TcpTransport._st_completed,
}
