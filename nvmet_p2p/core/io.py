"""I/O commands: Read, Write (FUA), Flush, Write Zeroes, Dataset Management.

Parse checks everything that needs no data (namespace, LBA range) so a bad command
costs no data transfer; execution hands the namespace backend its job (P2P-flagged when
the data buffer is a P2P provider's chunk), counts where the payload was and why, and
completes the request from the backend's completion callback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nvmet_p2p.core.request import DataDir
from nvmet_p2p.wire.command import NVME_DSM_RANGE, IoOpcode
from nvmet_p2p.wire.limits import NVME_DSMGMT_AD, NVME_RW_FUA
from nvmet_p2p.wire.sqe_layout import IPO_DSM_NR, IPO_NSID, IPO_OPCODE, IPO_RW_SLBA
from nvmet_p2p.wire.status import DNR, Status

if TYPE_CHECKING:
    from nvmet_p2p.core.request import Request
    from nvmet_p2p.core.subsys import Ns


def parse(req: Request) -> int:
    cmd = req.sqe
    ctrl = req.ctrl
    if not ctrl.ready:
        req.set_error_loc(IPO_OPCODE)
        return Status.CMD_SEQ_ERROR | DNR
    if cmd.opcode == IoOpcode.FABRICS:
        req.set_error_loc(IPO_OPCODE)
        return Status.INVALID_OPCODE | DNR  # a second Connect on a live queue, or anything else
    ns = ctrl.subsys.find_ns(cmd.nsid)
    if ns is None:
        req.set_error_loc(IPO_NSID)
        return Status.INVALID_NS | DNR
    op = cmd.opcode
    if op in (IoOpcode.READ, IoOpcode.WRITE, IoOpcode.WRITE_ZEROES):
        slba = cmd.cdw10 | cmd.cdw11 << 32
        nlb = (cmd.cdw12 & 0xFFFF) + 1
        if slba + nlb > ns.nblocks:  # Python ints: a range wrapping 2^64 is simply too far
            req.set_error_loc(IPO_RW_SLBA)
            return Status.LBA_RANGE | DNR
        if op == IoOpcode.READ:
            req.transfer_len, req.data_dir, req.handler = nlb << ns.blksize_shift, \
                DataDir.FROM_CTRL, _read
        elif op == IoOpcode.WRITE:
            req.transfer_len, req.data_dir, req.handler = nlb << ns.blksize_shift, \
                DataDir.TO_CTRL, _write
        else:
            req.handler = _write_zeroes
    elif op == IoOpcode.FLUSH:
        req.handler = _flush
    elif op == IoOpcode.DSM:
        req.transfer_len = ((cmd.cdw10 & 0xFF) + 1) * NVME_DSM_RANGE.size
        req.data_dir, req.handler = DataDir.TO_CTRL, _dsm
    else:
        req.set_error_loc(IPO_OPCODE)
        return Status.INVALID_OPCODE | DNR
    ns.get()
    req.ns = ns
    return 0


def _ns(req: Request) -> Ns:
    """The namespace parse found (and holds a reference to) for this command."""
    assert req.ns is not None, "I/O handler before parse"
    return req.ns


def _rw_args(req: Request) -> tuple[int, int]:
    cmd = req.sqe
    return cmd.cdw10 | cmd.cdw11 << 32, (cmd.cdw12 & 0xFFFF) + 1


def _account(ns: Ns, req: Request) -> None:
    """Count the payload by where it is: P2P memory, or system memory and why."""
    st, n = ns.stats, req.transfer_len
    if req.p2p_dev is not None:
        st["p2p_reqs"] += 1
        st["p2p_bytes"] += n
        return
    why = req.sysmem_reason
    st["sysmem_reqs"] += 1
    st["sysmem_bytes"] += n
    st["sysmem_by_reason"][why] = st["sysmem_by_reason"].get(why, 0) + 1
    st["sysmem_bytes_by_reason"][why] = st["sysmem_bytes_by_reason"].get(why, 0) + n


def _read(req: Request) -> None:
    slba, nlb = _rw_args(req)
    ns = _ns(req)
    ns.stats["read_cmds"] += 1
    ns.stats["read_bytes"] += req.transfer_len
    _account(ns, req)
    if req.p2p_dev is not None and req.chunk is not None:  # the device moves the data
        ns.backend.submit_read_p2p(slba, nlb, req.chunk, req.complete)
    else:
        assert req.buf is not None  # a Read moves data: the transport attached a buffer
        ns.backend.submit_read(slba, nlb, req.buf, req.complete)


def _write(req: Request) -> None:
    slba, nlb = _rw_args(req)
    ns = _ns(req)
    fua = bool(req.sqe.cdw12 & NVME_RW_FUA)
    ns.stats["write_cmds"] += 1
    ns.stats["write_bytes"] += req.transfer_len
    _account(ns, req)
    if req.p2p_dev is not None and req.chunk is not None:
        ns.backend.submit_write_p2p(slba, nlb, req.chunk, fua, req.complete)
    else:
        assert req.buf is not None
        ns.backend.submit_write(slba, nlb, req.buf, fua, req.complete)


def _write_zeroes(req: Request) -> None:
    slba, nlb = _rw_args(req)
    _ns(req).backend.submit_write_zeroes(slba, nlb, req.complete)


def _flush(req: Request) -> None:
    _ns(req).backend.submit_flush(req.complete)


def _dsm(req: Request) -> None:
    if not req.sqe.cdw11 & NVME_DSMGMT_AD:
        req.complete(0)  # only deallocate has an effect; other attributes are hints
        return
    assert req.buf is not None  # parse set DataDir.TO_CTRL: the transport fetched the ranges
    ns = _ns(req)
    ranges = []
    for _attr, nlb, slba in NVME_DSM_RANGE.iter_unpack(bytes(req.buf[:req.transfer_len])):
        if slba + nlb > ns.nblocks:
            req.set_error_loc(IPO_DSM_NR)
            req.complete(Status.LBA_RANGE | DNR)
            return
        if nlb:
            ranges.append((slba, nlb))
    if not ranges:
        req.complete(0)
        return
    ns.backend.submit_discard(ranges, req.complete)
