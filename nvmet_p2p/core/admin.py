"""Admin commands: Identify, Get Log Page, Get/Set Features, Keep Alive, AER, Abort.

`parse` decides what a command is and how much data it returns; the `_execute_*`
handlers build the reply into `req.buf` and complete the request.  Discovery
controllers accept the subset the discovery service needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from nvmet_p2p.core import discovery, fabrics
from nvmet_p2p.core.ctrl import AEN_CFG_DISC_CHANGE, AEN_CFG_NS_ATTR
from nvmet_p2p.core.request import DataDir
from nvmet_p2p.wire import identify as idf
from nvmet_p2p.wire import log as lg
from nvmet_p2p.wire import sqe_layout as ipo
from nvmet_p2p.wire.command import AdminOpcode
from nvmet_p2p.wire.limits import (
    NVME_NSID_ALL,
    NVMET_ASYNC_EVENTS,
    NVMET_ERROR_LOG_SLOTS,
    NVMET_KAS,
    NVMET_MAX_NAMESPACES,
)
from nvmet_p2p.wire.status import DNR, Status

if TYPE_CHECKING:
    from nvmet_p2p.core.request import Handler, Request
    from nvmet_p2p.core.subsys import Subsys


FID_VWC = 0x06
FID_NUM_QUEUES = 0x07
FID_ASYNC_EVENT = 0x0B
FID_KATO = 0x0F
FID_HOST_ID = 0x81
HOST_ID_SIZE = 16  # the extended (128-bit) host identifier, the only size we support
EXHID = 1 << 0  # Get/Set Features 81h CDW11: the 128-bit host identifier
# mandatory features the kernel target answers with 0 (nothing useful to report)
_FIDS_ZERO = {0x01, 0x02, 0x04, 0x05, 0x08, 0x09, 0x0A}

_DISC_OPCODES = {AdminOpcode.GET_LOG_PAGE, AdminOpcode.IDENTIFY, AdminOpcode.SET_FEATURES,
                 AdminOpcode.GET_FEATURES, AdminOpcode.ASYNC_EVENT, AdminOpcode.KEEP_ALIVE}


def parse(req: Request) -> int:
    cmd = req.sqe
    ctrl = req.ctrl
    if cmd.opcode == AdminOpcode.FABRICS:
        return fabrics.parse_property(req)
    if not ctrl.ready:
        req.set_error_loc(ipo.IPO_OPCODE)
        return Status.CMD_SEQ_ERROR | DNR
    op = cmd.opcode
    if ctrl.subsys.is_discovery and op not in _DISC_OPCODES:
        req.set_error_loc(ipo.IPO_OPCODE)
        return Status.INVALID_OPCODE | DNR
    if op == AdminOpcode.IDENTIFY:
        req.transfer_len, req.data_dir = idf.IDENTIFY_DATA_SIZE, DataDir.FROM_CTRL
        req.handler = _identify
    elif op == AdminOpcode.GET_LOG_PAGE:
        length = lg.GetLogPageCmd.from_sqe(cmd).length
        if length > lg.MAX_LOG_LEN:
            req.set_error_loc(ipo.IPO_LOG_NUMDL)
            return Status.INVALID_FIELD | DNR
        req.transfer_len, req.data_dir = length, DataDir.FROM_CTRL
        req.handler = _get_log_page
    elif op == AdminOpcode.GET_FEATURES and cmd.cdw10 & 0xFF == FID_HOST_ID \
            and not ctrl.subsys.is_discovery:
        # the one feature with data: the 128-bit host ID, as nvmet_feat_data_len() says
        req.transfer_len, req.data_dir = HOST_ID_SIZE, DataDir.FROM_CTRL
        req.handler = _get_features
    elif op in _NO_DATA_HANDLERS:
        req.handler = _NO_DATA_HANDLERS[op]
    else:
        req.set_error_loc(ipo.IPO_OPCODE)
        return Status.INVALID_OPCODE | DNR
    return 0


def _reply(req: Request, data: bytes) -> None:
    buf = req.buf
    assert buf is not None  # parse set DataDir.FROM_CTRL: the transport attached the buffer
    n = min(len(data), req.transfer_len)
    buf[:n] = data[:n]
    if n < req.transfer_len:
        buf[n:req.transfer_len] = bytes(req.transfer_len - n)
    req.complete(0)


# -- Identify -----------------------------------------------------------------

def id_ctrl(req: Request) -> idf.IdCtrl:
    ctrl = req.ctrl
    subsys = ctrl.subsys
    target = req.sq.target
    ops = req.sq.ops
    inline = target.inline_data_size(req.sq.port)
    sgls = idf.CTRL_SGLS_SUPPORTED
    if ops.keyed_sgls:
        sgls |= idf.CTRL_SGLS_KEYED
    if inline:
        sgls |= idf.CTRL_SGLS_OFFSET
    ident = idf.IdCtrl(
        sn=subsys.serial, mn=subsys.model, fr=subsys.firmware[:8], rab=6,
        ieee=subsys.ieee_oui, cmic=idf.CTRL_CMIC_MULTI_PORT | idf.CTRL_CMIC_MULTI_CTRL,
        mdts=target.mdts, cntlid=ctrl.cntlid, ver=subsys.version,
        cntrltype=idf.CntrlType.DISC if subsys.is_discovery else idf.CntrlType.IO,
        acl=3, aerl=NVMET_ASYNC_EVENTS - 1, frmw=3, lpa=_lpa(log_pages(subsys)),
        elpe=NVMET_ERROR_LOG_SLOTS - 1, kas=NVMET_KAS, maxcmd=target.mqes(req.sq.port) + 1,
        sgls=sgls, subnqn=subsys.nqn, msdbd=ops.msdbd,
        ctratt=1 << 0 | 1 << 6,  # 128-bit host identifier, traffic-based keep-alive
    )
    if subsys.is_discovery:
        ident.oaes = idf.CTRL_OAES_DISC_CHANGE
        return ident
    ident.oaes = idf.CTRL_OAES_NS_ATTR
    ident.sqes, ident.cqes = 0x66, 0x44  # 64-byte SQEs, 16-byte CQEs, fixed
    ident.nn = ident.mnan = NVMET_MAX_NAMESPACES
    ident.oncs = idf.CTRL_ONCS_DSM | idf.CTRL_ONCS_WRITE_ZEROES
    ident.vwc = idf.CTRL_VWC_PRESENT
    ident.ioccsz = (64 + inline) // 16
    ident.iorcsz = 1
    ident.psd = [idf.PowerState(max_power=0x9C4, entry_lat=0x10, exit_lat=0x4)]
    return ident


def _id_ns(req: Request) -> bytes:
    nsid = req.sqe.nsid
    ns = req.ctrl.subsys.find_ns(nsid)
    if ns is None:
        return bytes(idf.IDENTIFY_DATA_SIZE)  # an inactive NSID identifies as zeroes
    ident = idf.IdNs(
        nsze=ns.nblocks, ncap=ns.nblocks, nuse=ns.nblocks, nlbaf=0, flbas=0,
        nmic=idf.NS_NMIC_SHARED, dlfeat=(1 << 3) | 0x1,  # deallocated blocks read zeroes
        nguid=ns.nguid, lbaf=[idf.Lbaf(ds=ns.blksize_shift)],
        anagrpid=(ns.cfg.ana_grpid or 0) if ns.cfg else 0,
    )
    return ident.encode()


def _identify(req: Request) -> None:
    cmd = idf.IdentifyCmd.from_sqe(req.sqe)
    ctrl = req.ctrl
    nsid = req.sqe.nsid
    if ctrl.subsys.is_discovery and cmd.cns != idf.Cns.CTRL:
        req.set_error_loc(ipo.IPO_IDENTIFY_CNS)
        req.complete(Status.INVALID_FIELD | DNR)
        return
    if cmd.cns == idf.Cns.CTRL:
        ctrl.subsys.mark_discovered()  # as the kernel: the host now knows serial, model, ...
        _reply(req, id_ctrl(req).encode())
    elif cmd.cns == idf.Cns.NS:
        if nsid in (0, NVME_NSID_ALL):
            req.set_error_loc(ipo.IPO_NSID)
            req.complete(Status.INVALID_NS | DNR)
            return
        _reply(req, _id_ns(req))
    elif cmd.cns == idf.Cns.NS_ACTIVE_LIST:
        if nsid >= 0xFFFFFFFE:
            req.set_error_loc(ipo.IPO_NSID)
            req.complete(Status.INVALID_NS | DNR)
            return
        _reply(req, idf.active_ns_list(ctrl.subsys.active_nsids(), nsid))
    elif cmd.cns == idf.Cns.NS_DESC_LIST:
        ns = ctrl.subsys.find_ns(nsid)
        if ns is None:
            req.set_error_loc(ipo.IPO_NSID)
            req.complete(Status.INVALID_NS | DNR)
            return
        _reply(req, idf.ns_desc_list(nguid=ns.nguid, uuid=ns.uuid, csi=idf.Csi.NVM))
    else:
        req.set_error_loc(ipo.IPO_IDENTIFY_CNS)
        req.complete(Status.INVALID_FIELD | DNR)


# -- Get Log Page ------------------------------------------------------------

def _supported_log(req: Request) -> bytes:
    lids = log_pages(req.ctrl.subsys)
    return lg.SupportedLogPages({lid: lg.LidSupport.LSUPP for lid in lids}).encode()


def _error_log(req: Request) -> bytes:
    entries = [lg.ErrorLogEntry(**e) for e in req.ctrl.errors]
    return lg.error_log(entries, NVMET_ERROR_LOG_SLOTS)


def _smart_log(req: Request) -> bytes:
    totals = {"read_bytes": 0, "write_bytes": 0, "read_cmds": 0, "write_cmds": 0}
    for ns in req.ctrl.subsys.ns.values():
        for k in totals:
            totals[k] += ns.stats[k]
    return lg.SmartLog(
        temperature=273 + 25, avail_spare=100, spare_thresh=10,
        data_units_read=lg.data_units(totals["read_bytes"]),
        data_units_written=lg.data_units(totals["write_bytes"]),
        host_reads=totals["read_cmds"], host_writes=totals["write_cmds"],
        num_err_log_entries=req.ctrl.err_counter,
    ).encode()


def _fw_slot_log(req: Request) -> bytes:
    return lg.FwSlotLog(afi=1, frs=[req.ctrl.subsys.firmware[:8]]).encode()


def _changed_ns_log(req: Request) -> bytes:
    return lg.changed_ns_list(req.ctrl.changed_ns)


def _cmd_effects_log(req: Request) -> bytes:
    csupp, lbcc = lg.CmdEffects.CSUPP, lg.CmdEffects.LBCC
    acs = [0] * 256
    for op in (AdminOpcode.GET_LOG_PAGE, AdminOpcode.IDENTIFY, AdminOpcode.ABORT,
               AdminOpcode.SET_FEATURES, AdminOpcode.GET_FEATURES, AdminOpcode.ASYNC_EVENT,
               AdminOpcode.KEEP_ALIVE):
        acs[op] = csupp
    iocs = [0] * 256
    iocs[0x00] = csupp  # flush
    for io_op in (0x01, 0x08, 0x09):  # write, write zeroes, DSM change block contents
        iocs[io_op] = csupp | lbcc
    iocs[0x02] = csupp  # read
    return lg.CmdEffectsLog(acs, iocs).encode()


def _disc_log(req: Request) -> bytes:
    return discovery.disc_log_page(req.sq.target, req.sq.port, req.ctrl.hostnqn,
                                   req.sq.local_traddr)


# The log pages each kind of controller serves, LID -> the whole page.  Get Log Page
# dispatches through these tables, and Supported Log Pages and Identify Controller LPA
# are derived from them, so what a host is told is what it can read.
_IO_LOG_PAGES: dict[int, Callable[[Request], bytes]] = {
    lg.LogId.SUPPORTED: _supported_log,
    lg.LogId.ERROR: _error_log,
    lg.LogId.SMART: _smart_log,
    lg.LogId.FW_SLOT: _fw_slot_log,
    lg.LogId.CHANGED_NS: _changed_ns_log,
    lg.LogId.CMD_EFFECTS: _cmd_effects_log,
}
# as the kernel's discovery controller: the discovery log page and nothing else
_DISC_LOG_PAGES: dict[int, Callable[[Request], bytes]] = {lg.LogId.DISC: _disc_log}


def log_pages(subsys: Subsys) -> Mapping[int, Callable[[Request], bytes]]:
    """The log pages a controller of `subsys` serves."""
    return _DISC_LOG_PAGES if subsys.is_discovery else _IO_LOG_PAGES


def _lpa(lids: Mapping[int, object]) -> int:
    """Identify Controller LPA for the log pages `lids`.

    Every page honours LPO and NUMDU (bit 2).  Bit 0 (SMART per namespace) stays clear:
    the SMART log is the subsystem's whatever the NSID.  Bit 5 would promise LIDs 12h and
    13h and command scopes in the effects log, which we do not serve.
    """
    lpa = idf.CTRL_LPA_EXTENDED_DATA
    if lg.LogId.CMD_EFFECTS in lids:
        lpa |= idf.CTRL_LPA_CMD_EFFECTS_LOG
    return lpa


def _get_log_page(req: Request) -> None:
    cmd = lg.GetLogPageCmd.from_sqe(req.sqe)
    ctrl = req.ctrl
    build = log_pages(ctrl.subsys).get(cmd.lid)
    if build is None:
        req.set_error_loc(ipo.IPO_LOG_LID)
        req.complete(Status.INVALID_FIELD | DNR)
        return
    data = lg.slice_log(build(req), cmd.lpo, cmd.length)
    if data is None:
        req.set_error_loc(ipo.IPO_LOG_LPO)
        req.complete(Status.INVALID_FIELD | DNR)
        return
    ctrl.log_read(cmd.lid, cmd.rae)
    _reply(req, data)


# -- Features ---------------------------------------------------------------

def _num_queues_result(req: Request) -> int:
    n = req.ctrl.subsys.qid_max - 1
    return n | n << 16


def _set_features(req: Request) -> None:
    ctrl = req.ctrl
    fid, save = req.sqe.cdw10 & 0xFF, req.sqe.cdw10 >> 31
    val = req.sqe.cdw11
    if save:
        req.set_error_loc(ipo.IPO_CDW10)
        req.complete(Status.FEATURE_NOT_SAVEABLE | DNR)
        return
    disc = ctrl.subsys.is_discovery
    if fid == FID_NUM_QUEUES and not disc:
        if val & 0xFFFF == 0xFFFF or val >> 16 == 0xFFFF:
            req.set_error_loc(ipo.IPO_CDW11)
            req.complete(Status.INVALID_FIELD | DNR)
            return
        req.complete(0, _num_queues_result(req))
    elif fid == FID_ASYNC_EVENT:
        allowed = AEN_CFG_DISC_CHANGE if disc else AEN_CFG_NS_ATTR
        if val & ~allowed:
            req.set_error_loc(ipo.IPO_CDW11)
            req.complete(Status.INVALID_FIELD | DNR)
            return
        ctrl.aen_enabled = val
        req.complete(0, val)
    elif fid == FID_KATO:
        ctrl.kato = (val + 999) // 1000
        ctrl.touch()
        req.complete(0)
    elif fid == FID_HOST_ID and not disc:
        req.complete(Status.CMD_SEQ_ERROR | DNR)  # the host ID is fixed at Connect
    else:
        req.set_error_loc(ipo.IPO_CDW10)
        req.complete(Status.INVALID_FIELD | DNR)


def _get_features(req: Request) -> None:
    ctrl = req.ctrl
    fid = req.sqe.cdw10 & 0xFF
    disc = ctrl.subsys.is_discovery
    if fid == FID_KATO:
        req.complete(0, ctrl.kato * 1000)
    elif fid == FID_ASYNC_EVENT:
        req.complete(0, ctrl.aen_enabled)
    elif disc:
        req.set_error_loc(ipo.IPO_CDW10)
        req.complete(Status.INVALID_FIELD | DNR)
    elif fid == FID_NUM_QUEUES:
        req.complete(0, _num_queues_result(req))
    elif fid == FID_HOST_ID:
        # as the kernel: the Connect data's host ID, only with the 128-bit size asked for
        if not req.sqe.cdw11 & EXHID:
            req.set_error_loc(ipo.IPO_CDW11)
            req.complete(Status.INVALID_FIELD | DNR)
            return
        _reply(req, bytes(ctrl.hostid).ljust(HOST_ID_SIZE, b"\0")[:HOST_ID_SIZE])
    elif fid == FID_VWC:
        vwc = any(ns.backend.vwc for ns in ctrl.subsys.ns.values())
        req.complete(0, int(vwc))
    elif fid in _FIDS_ZERO:
        req.complete(0, 0)
    else:
        req.set_error_loc(ipo.IPO_CDW10)
        req.complete(Status.INVALID_FIELD | DNR)


# -- the rest ---------------------------------------------------------------

def _async_event(req: Request) -> None:
    status = req.ctrl.queue_aer(req)
    if status:
        req.complete(status | DNR)


def _keep_alive(req: Request) -> None:
    req.ctrl.touch()
    req.complete(0)


def _abort(req: Request) -> None:
    req.complete(0, 1)  # bit 0 set: the command was not aborted (it runs to completion)


# admin commands that move no data: opcode -> handler
_NO_DATA_HANDLERS: dict[int, Handler] = {
    AdminOpcode.SET_FEATURES: _set_features,
    AdminOpcode.GET_FEATURES: _get_features,
    AdminOpcode.ASYNC_EVENT: _async_event,
    AdminOpcode.KEEP_ALIVE: _keep_alive,
    AdminOpcode.ABORT: _abort,
}
