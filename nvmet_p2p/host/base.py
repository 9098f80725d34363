"""A Python NVMe-oF host (initiator) for tests, fuzzing, the demo and benchmarks.

`Host` speaks NVMe over any `HostQueue`: Connect, property access, Identify, logs,
features, discovery, Read/Write/Flush/Write Zeroes/DSM, keep-alive, disconnect, and
raw capsules for what a real host would never send.  The transports' hosts
(`host.loop`, `host.rdma`, `host.tcp`) provide the queues.
"""

from __future__ import annotations

import struct
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass

from nvmet_p2p.wire import identify as idf
from nvmet_p2p.wire import log as lg
from nvmet_p2p.wire.command import (
    SQE_SIZE,
    AdminOpcode,
    ConnectData,
    Cqe,
    FabricsType,
    IoOpcode,
    Psdt,
    Sgl,
    SglType,
    Sqe,
    fabrics_sqe,
)
from nvmet_p2p.wire.limits import NVME_AQ_DEPTH, NVME_CNTLID_DYNAMIC
from nvmet_p2p.wire.regs import (
    CC_EN,
    CC_IOCQES,
    CC_IOSQES,
    CC_SHN_NORMAL,
    CSTS_RDY,
    REG_CC,
    REG_CSTS,
)
from nvmet_p2p.wire.status import status_name

DEFAULT_TIMEOUT = 10.0
CC_ENABLE = CC_EN | CC_IOSQES | CC_IOCQES


class NvmeError(Exception):
    """A command completed with a non-zero status."""

    def __init__(self, what: str, cqe: Cqe) -> None:
        super().__init__(f"{what}: status {cqe.status:#05x} ({status_name(cqe.status)})")
        self.cqe = cqe
        self.status = cqe.status


def default_hostnqn() -> str:
    return f"nqn.2014-08.org.nvmexpress:uuid:{uuid.uuid4()}"


@dataclass
class Pending:
    cid: int
    data: bytearray | None  # host buffer the target writes into (reads)
    sgl: Sgl | None


class HostQueue(ABC):
    """One host-side queue: submit capsules, collect completions by command id."""

    inline_connect = False  # send Connect's data in the capsule (the Linux TCP host does)

    def __init__(self, qid: int, size: int) -> None:
        self.qid = qid
        self.size = size
        self._next_cid = 0
        self.done: dict[int, Cqe] = {}
        self.outstanding: set[int] = set()

    # -- what a transport provides ----------------------------------------------
    @abstractmethod
    def send(self, capsule: bytes) -> None:
        """Transmit one capsule (64-byte SQE + optional in-capsule data)."""

    @abstractmethod
    def progress(self, timeout: float) -> None:
        """Move things along until a completion arrives or `timeout` passes."""

    @abstractmethod
    def expose(self, buf: bytearray, invalidate: bool = False) -> Sgl:
        """Make `buf` reachable by the target; a keyed SGL naming it."""

    @abstractmethod
    def unexpose(self, sgl: Sgl) -> None: ...

    def null_sgl(self) -> Sgl:
        """The descriptor of a command that moves no data."""
        return Sgl(SglType.KEYED_DATA_BLOCK, 0, 0, 0)

    @abstractmethod
    def close(self) -> None: ...

    # -- common ------------------------------------------------------------------
    def on_cqe(self, raw: bytes) -> None:
        cqe = Cqe.decode(raw)
        self.done[cqe.cid] = cqe

    def alloc_cid(self) -> int:
        for _ in range(0x10000):
            cid = self._next_cid
            self._next_cid = (cid + 1) & 0xFFFF
            if cid not in self.outstanding:
                return cid
        raise RuntimeError("no free command id")

    def submit(self, sqe: Sqe, *, data: bytes | None = None, read_len: int = 0,
               inline: bool = False, sgl: Sgl | None = None) -> Pending:
        """Send `sqe` with its data; the SGL is built unless `sgl` is given (raw tests)."""
        sqe.cid = self.alloc_cid()
        sqe.flags = (sqe.flags & 0x3F) | Psdt.SGL_MPTR_CONTIG << 6
        payload = b""
        buf = None
        if sgl is None:
            if data is not None and inline:
                sgl = Sgl(SglType.DATA_BLOCK_OFFSET, 0, len(data))
                payload = bytes(data)
            elif data is not None:
                buf = bytearray(data)
                sgl = self.expose(buf)
            elif read_len:
                buf = bytearray(read_len)
                sgl = self.expose(buf)
            else:
                sgl = self.null_sgl()
            owned = buf is not None
        else:
            owned = False
            if data is not None:
                payload = bytes(data)
        sqe.dptr = sgl.encode()
        self.outstanding.add(sqe.cid)
        self.send(sqe.encode() + payload)
        return Pending(sqe.cid, buf if read_len else None, sgl if owned else None)

    def wait(self, p: Pending, timeout: float = DEFAULT_TIMEOUT) -> tuple[Cqe, bytes | None]:
        deadline = time.monotonic() + timeout
        while p.cid not in self.done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"qid {self.qid}: no completion for cid {p.cid} "
                                   f"within {timeout}s")
            self.progress(left)
        cqe = self.done.pop(p.cid)
        self.outstanding.discard(p.cid)
        if p.sgl is not None:
            self.unexpose(p.sgl)
        return cqe, (bytes(p.data) if p.data is not None else None)

    def execute(self, sqe: Sqe, *, data: bytes | None = None, read_len: int = 0,
                inline: bool = False, timeout: float = DEFAULT_TIMEOUT,
                check: str | None = None) -> tuple[Cqe, bytes | None]:
        cqe, out = self.wait(self.submit(sqe, data=data, read_len=read_len, inline=inline),
                             timeout)
        if check is not None and cqe.status:
            raise NvmeError(check, cqe)
        return cqe, out

    def raw(self, capsule: bytes, timeout: float = DEFAULT_TIMEOUT) -> Cqe:
        """Send a capsule exactly as given (its CID is honoured); wait for its CQE."""
        cid = Sqe.decode(capsule[:SQE_SIZE]).cid
        self.outstanding.add(cid)
        self.send(capsule)
        cqe, _ = self.wait(Pending(cid, None, None), timeout)
        return cqe


class Host(ABC):
    """An NVMe-oF host association with one subsystem (admin queue + I/O queues)."""

    def __init__(self, hostnqn: str | None = None, hostid: bytes | None = None) -> None:
        self.hostnqn = hostnqn or default_hostnqn()
        self.hostid = hostid or uuid.uuid4().bytes
        self.cntlid: int | None = None
        self.subnqn = ""
        self.admin: HostQueue | None = None
        self.io: dict[int, HostQueue] = {}
        self.cattr = 0  # Connect attributes (bit 2: disable SQ flow control)

    @abstractmethod
    def open_queue(self, qid: int, size: int) -> HostQueue:
        """A new transport connection for queue `qid` (not yet NVMe-connected)."""

    # -- fabrics ---------------------------------------------------------------
    def connect_queue(self, q: HostQueue, subnqn: str, cntlid: int, kato_ms: int = 0,
                      check: bool = True) -> Cqe:
        sqe = fabrics_sqe(FabricsType.CONNECT, qid=q.qid, sqsize=q.size - 1, kato=kato_ms,
                          cattr=self.cattr)
        data = ConnectData(self.hostid, cntlid, subnqn, self.hostnqn).encode()
        cqe, _ = q.execute(sqe, data=data, inline=q.inline_connect)
        if check and cqe.status:
            raise NvmeError(f"connect qid {q.qid} to {subnqn}", cqe)
        return cqe

    def connect(self, subnqn: str, *, nr_io_queues: int = 1, queue_size: int = 32,
                kato_ms: int = 0, enable: bool = True) -> Host:
        self.subnqn = subnqn
        self.admin = self.open_queue(0, NVME_AQ_DEPTH)
        cqe = self.connect_queue(self.admin, subnqn, NVME_CNTLID_DYNAMIC, kato_ms)
        self.cntlid = cqe.result & 0xFFFF
        if enable:
            self.enable()
            for qid in range(1, nr_io_queues + 1):
                q = self.open_queue(qid, queue_size)
                self.connect_queue(q, subnqn, self.cntlid)
                self.io[qid] = q
        return self

    @property
    def aq(self) -> HostQueue:
        """The admin queue of a connected association."""
        assert self.admin is not None, "the host is not connected"
        return self.admin

    def property_get(self, offset: int, size: int = 4) -> int:
        sqe = fabrics_sqe(FabricsType.PROPERTY_GET, attrib=1 if size == 8 else 0, offset=offset)
        cqe, _ = self.aq.execute(sqe, check=f"property get {offset:#x}")
        return cqe.result if size == 8 else cqe.result & 0xFFFFFFFF

    def property_set(self, offset: int, value: int) -> None:
        sqe = fabrics_sqe(FabricsType.PROPERTY_SET, attrib=0, offset=offset, value=value)
        self.aq.execute(sqe, check=f"property set {offset:#x}")

    def enable(self, timeout: float = 5.0) -> None:
        self.property_set(REG_CC, CC_ENABLE)
        deadline = time.monotonic() + timeout
        while not self.property_get(REG_CSTS) & CSTS_RDY:
            if time.monotonic() > deadline:
                raise TimeoutError("controller did not become ready")

    def shutdown(self) -> None:
        self.property_set(REG_CC, CC_ENABLE | CC_SHN_NORMAL)

    def disconnect(self) -> None:
        for q in list(self.io.values()):
            q.close()
        self.io.clear()
        if self.admin is not None:
            self.admin.close()
            self.admin = None

    # -- admin -----------------------------------------------------------------
    def admin_cmd(self, opcode: int, *, nsid: int = 0, read_len: int = 0, check: bool = True,
                  **cdws: int) -> tuple[Cqe, bytes | None]:
        sqe = Sqe(opcode=opcode, nsid=nsid, **cdws)  # type: ignore[arg-type]  # only cdwN
        return self.aq.execute(sqe, read_len=read_len,
                               check=f"admin opcode {opcode:#x}" if check else None)

    def identify(self, cns: int, nsid: int = 0) -> bytes:
        _, data = self.admin_cmd(AdminOpcode.IDENTIFY, nsid=nsid, cdw10=cns,
                                 read_len=idf.IDENTIFY_DATA_SIZE)
        assert data is not None  # a read: execute returns the buffer
        return data

    def identify_ctrl(self) -> idf.IdCtrl:
        return idf.IdCtrl.decode(self.identify(idf.Cns.CTRL))

    def identify_ns(self, nsid: int) -> idf.IdNs:
        return idf.IdNs.decode(self.identify(idf.Cns.NS, nsid))

    def active_ns(self) -> list[int]:
        return idf.decode_ns_list(self.identify(idf.Cns.NS_ACTIVE_LIST, 0))

    def get_log_page(self, lid: int, length: int, lpo: int = 0, rae: bool = False,
                     nsid: int = 0xFFFFFFFF) -> bytes:
        numd = length // 4 - 1
        _, data = self.admin_cmd(AdminOpcode.GET_LOG_PAGE, nsid=nsid, read_len=length,
                                 cdw10=lid | (rae << 15) | (numd & 0xFFFF) << 16,
                                 cdw11=numd >> 16, cdw12=lpo & 0xFFFFFFFF, cdw13=lpo >> 32)
        assert data is not None
        return data

    def set_features(self, fid: int, value: int) -> int:
        cqe, _ = self.admin_cmd(AdminOpcode.SET_FEATURES, cdw10=fid, cdw11=value)
        return cqe.result

    def get_features(self, fid: int) -> int:
        cqe, _ = self.admin_cmd(AdminOpcode.GET_FEATURES, cdw10=fid)
        return cqe.result

    def keep_alive(self) -> None:
        self.admin_cmd(AdminOpcode.KEEP_ALIVE)

    def submit_aer(self) -> Pending:
        return self.aq.submit(Sqe(opcode=AdminOpcode.ASYNC_EVENT))

    def discover(self) -> list[lg.DiscEntry]:
        """Read the whole discovery log the way nvme-cli does: header, then all of it."""
        hdr = self.get_log_page(lg.LogId.DISC, lg.DISC_HDR_SIZE)
        _, numrec, _ = lg.decode_disc_log_header(hdr)
        page = self.get_log_page(lg.LogId.DISC, lg.DISC_HDR_SIZE + numrec * lg.DISC_ENTRY_SIZE)
        return lg.decode_disc_log(page).entries

    # -- I/O -------------------------------------------------------------------
    def _q(self, qid: int | None) -> HostQueue:
        return self.io[qid if qid is not None else min(self.io)]

    def read(self, nsid: int, slba: int, nlb: int, block_size: int = 512,
             qid: int | None = None) -> bytes:
        sqe = Sqe(opcode=IoOpcode.READ, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                  cdw12=nlb - 1)
        _, data = self._q(qid).execute(sqe, read_len=nlb * block_size, check="read")
        assert data is not None
        return data

    def write(self, nsid: int, slba: int, data: bytes, block_size: int = 512,
              fua: bool = False, inline: bool = False, qid: int | None = None) -> None:
        nlb = len(data) // block_size
        sqe = Sqe(opcode=IoOpcode.WRITE, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                  cdw12=(nlb - 1) | (1 << 30 if fua else 0))
        self._q(qid).execute(sqe, data=data, inline=inline, check="write")

    def flush(self, nsid: int, qid: int | None = None) -> None:
        self._q(qid).execute(Sqe(opcode=IoOpcode.FLUSH, nsid=nsid), check="flush")

    def write_zeroes(self, nsid: int, slba: int, nlb: int, qid: int | None = None) -> None:
        sqe = Sqe(opcode=IoOpcode.WRITE_ZEROES, nsid=nsid, cdw10=slba & 0xFFFFFFFF,
                  cdw11=slba >> 32, cdw12=nlb - 1)
        self._q(qid).execute(sqe, check="write zeroes")

    def deallocate(self, nsid: int, ranges: list[tuple[int, int]],
                   qid: int | None = None) -> None:
        data = b"".join(struct.pack("<IIQ", 0, nlb, slba) for slba, nlb in ranges)
        sqe = Sqe(opcode=IoOpcode.DSM, nsid=nsid, cdw10=len(ranges) - 1, cdw11=1 << 2)
        self._q(qid).execute(sqe, data=data, check="deallocate")
