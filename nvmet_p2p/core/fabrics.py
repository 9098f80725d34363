"""Fabrics commands: Connect (admin and I/O queues) and Property Get/Set."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from nvmet_p2p import logfmt
from nvmet_p2p.core.request import DataDir
from nvmet_p2p.wire import command as c
from nvmet_p2p.wire import sqe_layout as ipo
from nvmet_p2p.wire.command import ConnectCmd, ConnectData, FabricsType, PropertyCmd
from nvmet_p2p.wire.limits import NVME_AQ_DEPTH, NVME_CNTLID_DYNAMIC, NVMF_NQN_SIZE
from nvmet_p2p.wire.regs import REG_CAP, REG_CC, REG_CSTS, REG_VS
from nvmet_p2p.wire.status import DNR, Status

if TYPE_CHECKING:
    from nvmet_p2p.core.request import Request

log = logging.getLogger("nvmet_p2p.core")


def parse_connect(req: Request) -> int:
    req.transfer_len = c.CONNECT_DATA_SIZE
    req.data_dir = DataDir.TO_CTRL
    req.handler = _connect_admin if ConnectCmd.from_sqe(req.sqe).qid == 0 else _connect_io
    return 0


def _invalid(req: Request, in_data: bool, offset: int) -> None:
    req.set_error_loc(offset)
    req.complete(Status.CONNECT_INVALID_PARAM | DNR, c.connect_invalid_result(in_data, offset))


def _check_connect(req: Request, cmd: ConnectCmd) -> ConnectData | None:
    """Checks common to both kinds of Connect; completes the request on failure."""
    if cmd.recfmt != 0:
        req.set_error_loc(ipo.CONNECT_IPO_SQE_RECFMT)
        req.complete(Status.CONNECT_FORMAT | DNR)
        return None
    if req.sq.qid != cmd.qid and req.sq.size:
        # the transport learnt the qid when the queue was set up (RDMA CM private data)
        _invalid(req, False, ipo.CONNECT_IPO_SQE_QID)
        return None
    limit = NVME_AQ_DEPTH if cmd.qid == 0 else req.sq.target.mqes(req.sq.port) + 1
    if req.sq.size:
        limit = min(limit, req.sq.size)
    if cmd.sqsize == 0 or cmd.sqsize + 1 > limit:
        _invalid(req, False, ipo.CONNECT_IPO_SQE_SQSIZE)
        return None
    assert req.buf is not None  # parse set DataDir.TO_CTRL: the transport fetched the data
    data = ConnectData.decode(req.buf)
    for nqn, where in ((data.subnqn, ipo.CONNECT_IPO_DATA_SUBNQN),
                       (data.hostnqn, ipo.CONNECT_IPO_DATA_HOSTNQN)):
        if not nqn or len(nqn.encode()) > NVMF_NQN_SIZE:
            _invalid(req, True, where)
            return None
    return data


def _connect_admin(req: Request) -> None:
    cmd = ConnectCmd.from_sqe(req.sqe)
    data = _check_connect(req, cmd)
    if data is None:
        return
    if data.cntlid != NVME_CNTLID_DYNAMIC:
        _invalid(req, True, ipo.CONNECT_IPO_DATA_CNTLID)
        return
    target = req.sq.target
    subsys = target.find_subsys(req.sq.port, data.subnqn)
    if subsys is None:
        logfmt.info(log, "connect_refused", hostnqn=data.hostnqn, subnqn=data.subnqn,
                    portid=getattr(req.sq.port, "portid", None),
                    reason="subsystem not found on the port")
        _invalid(req, True, ipo.CONNECT_IPO_DATA_SUBNQN)
        return
    if not subsys.allows_host(data.hostnqn):
        logfmt.info(log, "connect_refused", hostnqn=data.hostnqn, subnqn=data.subnqn,
                    reason="host not allowed")
        req.set_error_loc(ipo.CONNECT_IPO_DATA_HOSTNQN)
        req.complete(Status.CONNECT_INVALID_HOST | DNR,
                     c.connect_invalid_result(True, ipo.CONNECT_IPO_DATA_HOSTNQN))
        return
    ctrl = target.create_ctrl(subsys, req.sq, data.hostnqn, data.hostid, cmd.kato)
    if ctrl is None:
        req.complete(Status.CONNECT_CTRL_BUSY | DNR)
        return
    req.sq.disable_sqflow = cmd.disable_sqflow
    req.sq.size = req.sq.size or cmd.sqsize + 1
    req.complete(0, ctrl.cntlid)


def _connect_io(req: Request) -> None:
    cmd = ConnectCmd.from_sqe(req.sqe)
    data = _check_connect(req, cmd)
    if data is None:
        return
    target = req.sq.target
    subsys = target.find_subsys(req.sq.port, data.subnqn)
    if subsys is None:  # IPO points at the bad field, as nvmet_ctrl_find_get() does
        _invalid(req, True, ipo.CONNECT_IPO_DATA_SUBNQN)
        return
    ctrl = subsys.ctrls.get(data.cntlid)
    if ctrl is None or ctrl.dead or ctrl.hostnqn != data.hostnqn:
        _invalid(req, True, ipo.CONNECT_IPO_DATA_CNTLID)
        return
    if subsys.is_discovery or cmd.qid > subsys.qid_max:
        _invalid(req, False, ipo.CONNECT_IPO_SQE_QID)
        return
    if cmd.qid in ctrl.sqs:  # the kernel's nvmet_install_queue: "qid has already been created"
        req.set_error_loc(ipo.CONNECT_IPO_SQE_QID)
        req.complete(Status.CMD_SEQ_ERROR | DNR)
        return
    if not ctrl.ready:
        req.complete(Status.CMD_SEQ_ERROR | DNR)  # I/O queues only on an enabled controller
        return
    req.sq.ctrl = ctrl
    req.sq.disable_sqflow = cmd.disable_sqflow
    req.sq.size = req.sq.size or cmd.sqsize + 1
    ctrl.sqs[cmd.qid] = req.sq
    if req.sq.qid != cmd.qid:
        req.sq.qid = cmd.qid
        req.cqe.sq_id = cmd.qid
    req.complete(0, ctrl.cntlid)


# -- properties ---------------------------------------------------------------

def parse_property(req: Request) -> int:
    """Property Get/Set, admin queue only (the caller checked)."""
    fctype = req.sqe.fctype
    if fctype == FabricsType.PROPERTY_SET:
        req.handler = _property_set
    elif fctype == FabricsType.PROPERTY_GET:
        req.handler = _property_get
    else:
        req.set_error_loc(ipo.IPO_FCTYPE)
        return Status.INVALID_OPCODE | DNR
    return 0


def _invalid_property(req: Request, ipo_field: int) -> None:
    req.set_error_loc(ipo_field)
    req.complete(Status.INVALID_FIELD | DNR)


def _property_get(req: Request) -> None:
    prop = PropertyCmd.from_sqe(req.sqe)
    ctrl = req.ctrl
    if prop.size is None:  # ATTRIB sizes 2..7 are reserved
        _invalid_property(req, ipo.IPO_PROP_ATTRIB)
        return
    if prop.size == 8:
        if prop.offset != REG_CAP:
            _invalid_property(req, ipo.IPO_PROP_OFFSET)
            return
        req.complete(0, req.sq.target.cap(ctrl.port))
        return
    values = {REG_VS: ctrl.subsys.version, REG_CC: ctrl.cc, REG_CSTS: ctrl.csts}
    if prop.offset not in values:
        _invalid_property(req, ipo.IPO_PROP_OFFSET)
        return
    req.complete(0, values[prop.offset])


def _property_set(req: Request) -> None:
    prop = PropertyCmd.from_sqe(req.sqe)
    if prop.size != 4:  # reserved sizes, and 8 bytes: CC is the only writable property
        _invalid_property(req, ipo.IPO_PROP_ATTRIB)
        return
    if prop.offset != REG_CC:
        _invalid_property(req, ipo.IPO_PROP_OFFSET)
        return
    req.ctrl.update_cc(prop.value & 0xFFFFFFFF)
    req.complete(0)
