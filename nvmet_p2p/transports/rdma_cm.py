"""RDMA connection management: librdmacm through ctypes, and the NVMe-oF private data.

Why ctypes and not pyverbs' CMID: Debian's pyverbs 44 exposes neither the event
channel's fd (so it cannot be watched by an event loop) nor the `rdma_cm_id` an event
belongs to (so events of several connections on one channel cannot be told apart),
and a child CMID made from an event shares and, on close, clears its listener's
Context/PD.  librdmacm itself is small: an event channel is `struct { int fd; }`, and
with the fd non-blocking `rdma_get_cm_event` returns EAGAIN instead of sleeping in the
kernel, so nothing here can ever block the reactor.  QPs are not created through the
CM: they are ordinary pyverbs QPs ("external QPs" in librdmacm terms) that
`rdma_verbs.connect_qp` moves to RTS with the attributes `CmId.init_qp_attr` returns.

The private data part at the top is pure (bytes in, values out) and needs no device.
Struct layouts were checked with offsetof() against rdma-core 44's headers
(tests/transports/test_rdma.py keeps those figures).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Self

from nvmet_p2p.errors import TransportError
from nvmet_p2p.wire.limits import NVME_AQ_DEPTH

# -- NVMe-oF RDMA private data (NVMe-oF RDMA transport binding) ------------------------------

CM_REQ_LEN = 32  # struct nvme_rdma_cm_req
CM_REP_LEN = 32  # struct nvme_rdma_cm_rep
CM_REJ_LEN = 4  # struct nvme_rdma_cm_rej


class CmRejectStatus(IntEnum):
    INVALID_LEN = 0x01  # private data length
    INVALID_RECFMT = 0x02
    INVALID_QID = 0x03
    INVALID_HSQSIZE = 0x04
    INVALID_HRQSIZE = 0x05
    NO_RESOURCES = 0x06
    INVALID_IRD = 0x07
    INVALID_ORD = 0x08


@dataclass(frozen=True)
class CmRequest:
    """What a host asks for in its CM REQUEST."""

    recfmt: int
    qid: int
    hrqsize: int  # host receive queue size: our send depth for responses
    hsqsize: int  # 0's based host send queue size: our receive depth is hsqsize + 1
    cntlid: int = 0  # spec; the Linux host leaves it 0

    def encode(self) -> bytes:
        return struct.pack("<HHHHH22x", self.recfmt, self.qid, self.hrqsize, self.hsqsize,
                           self.cntlid)


def parse_cm_request(data: bytes) -> CmRequest | CmRejectStatus:
    if len(data) < CM_REQ_LEN:
        return CmRejectStatus.INVALID_LEN
    recfmt, qid, hrqsize, hsqsize, cntlid = struct.unpack_from("<HHHHH", data)
    return CmRequest(recfmt, qid, hrqsize, hsqsize, cntlid)


def check_cm_request(req: CmRequest, *, max_qid: int, max_io_queue_size: int) -> int:
    """0 if the queue can be set up as asked, else the reject status.

    `max_io_queue_size` is min(CAP.MQES + 1, the port's param_max_queue_size); Connect
    checks the sizes again (sqsize) with NVMe status codes.
    """
    if req.recfmt != 0:
        return CmRejectStatus.INVALID_RECFMT
    if req.qid > max_qid:
        return CmRejectStatus.INVALID_QID
    limit = NVME_AQ_DEPTH if req.qid == 0 else max_io_queue_size
    if req.hsqsize == 0 or req.hsqsize + 1 > limit:
        return CmRejectStatus.INVALID_HSQSIZE
    # The host must be able to take a response for every command it can have queued.
    if req.hrqsize == 0 or req.hrqsize > limit:
        return CmRejectStatus.INVALID_HRQSIZE
    return 0


def encode_cm_accept(crqsize: int) -> bytes:
    return struct.pack("<HH28x", 0, crqsize)


def decode_cm_accept(data: bytes) -> int:
    """crqsize from the target's CM REP private data."""
    if len(data) < 4:
        raise ValueError(f"CM accept private data needs 4 bytes, got {len(data)}")
    _recfmt, crqsize = struct.unpack_from("<HH", data)
    return crqsize


def encode_cm_reject(status: int) -> bytes:
    return struct.pack("<HH", 0, status)


def decode_cm_reject(data: bytes) -> int | None:
    """The NVMe-oF reject status, or None when the reject carried none (not from a target)."""
    if len(data) < CM_REJ_LEN:
        return None
    recfmt, status = struct.unpack_from("<HH", data)
    return status if recfmt == 0 else None


# -- librdmacm ABI (rdma-core 44, x86_64) ------------------------------------------------------

RDMA_PS_TCP = 0x0106
IBV_QPS_INIT, IBV_QPS_RTR, IBV_QPS_RTS, IBV_QPS_ERR = 1, 2, 3, 6


class CmEventType(IntEnum):
    ADDR_RESOLVED = 0
    ADDR_ERROR = 1
    ROUTE_RESOLVED = 2
    ROUTE_ERROR = 3
    CONNECT_REQUEST = 4
    CONNECT_RESPONSE = 5
    CONNECT_ERROR = 6
    UNREACHABLE = 7
    REJECTED = 8
    ESTABLISHED = 9
    DISCONNECTED = 10
    DEVICE_REMOVAL = 11
    MULTICAST_JOIN = 12
    MULTICAST_ERROR = 13
    ADDR_CHANGE = 14
    TIMEWAIT_EXIT = 15


class ConnParamStruct(ctypes.Structure):
    _fields_ = [("private_data", ctypes.c_void_p), ("private_data_len", ctypes.c_uint8),
                ("responder_resources", ctypes.c_uint8), ("initiator_depth", ctypes.c_uint8),
                ("flow_control", ctypes.c_uint8), ("retry_count", ctypes.c_uint8),
                ("rnr_retry_count", ctypes.c_uint8), ("srq", ctypes.c_uint8),
                ("qp_num", ctypes.c_uint32)]


class CmEventStruct(ctypes.Structure):
    # param is a union of rdma_conn_param and rdma_ud_param; only conn is read here.
    _fields_ = [("id", ctypes.c_void_p), ("listen_id", ctypes.c_void_p),
                ("event", ctypes.c_int), ("status", ctypes.c_int),
                ("conn", ConnParamStruct), ("_rest", ctypes.c_uint8 * 32)]


class GlobalRouteStruct(ctypes.Structure):
    _fields_ = [("dgid", ctypes.c_uint8 * 16), ("flow_label", ctypes.c_uint32),
                ("sgid_index", ctypes.c_uint8), ("hop_limit", ctypes.c_uint8),
                ("traffic_class", ctypes.c_uint8), ("_pad", ctypes.c_uint8)]


class AhAttrStruct(ctypes.Structure):
    _fields_ = [("grh", GlobalRouteStruct), ("dlid", ctypes.c_uint16), ("sl", ctypes.c_uint8),
                ("src_path_bits", ctypes.c_uint8), ("static_rate", ctypes.c_uint8),
                ("is_global", ctypes.c_uint8), ("port_num", ctypes.c_uint8),
                ("_pad", ctypes.c_uint8)]


class QpAttrStruct(ctypes.Structure):
    _fields_ = [("qp_state", ctypes.c_int), ("cur_qp_state", ctypes.c_int),
                ("path_mtu", ctypes.c_int), ("path_mig_state", ctypes.c_int),
                ("qkey", ctypes.c_uint32), ("rq_psn", ctypes.c_uint32),
                ("sq_psn", ctypes.c_uint32), ("dest_qp_num", ctypes.c_uint32),
                ("qp_access_flags", ctypes.c_uint), ("cap", ctypes.c_uint32 * 5),
                ("ah_attr", AhAttrStruct), ("alt_ah_attr", AhAttrStruct),
                ("pkey_index", ctypes.c_uint16), ("alt_pkey_index", ctypes.c_uint16),
                ("en_sqd_async_notify", ctypes.c_uint8), ("sq_draining", ctypes.c_uint8),
                ("max_rd_atomic", ctypes.c_uint8), ("max_dest_rd_atomic", ctypes.c_uint8),
                ("min_rnr_timer", ctypes.c_uint8), ("port_num", ctypes.c_uint8),
                ("timeout", ctypes.c_uint8), ("retry_cnt", ctypes.c_uint8),
                ("rnr_retry", ctypes.c_uint8), ("alt_port_num", ctypes.c_uint8),
                ("alt_timeout", ctypes.c_uint8), ("rate_limit", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32)]  # the C struct is 8-aligned (union ibv_gid)


_lib: ctypes.CDLL | None = None
_verbs: ctypes.CDLL | None = None


def _cm() -> ctypes.CDLL:
    """librdmacm, loaded on first use so pure code imports on machines without rdma-core."""
    global _lib, _verbs
    if _lib is None:
        try:
            lib = ctypes.CDLL("librdmacm.so.1", use_errno=True)
            verbs = ctypes.CDLL("libibverbs.so.1", use_errno=True)
        except OSError as e:
            raise TransportError(f"librdmacm/libibverbs not available: {e}") from e
        vp, i = ctypes.c_void_p, ctypes.c_int
        for name, res, args in [
            ("rdma_create_event_channel", vp, []),
            ("rdma_destroy_event_channel", None, [vp]),
            ("rdma_create_id", i, [vp, ctypes.POINTER(vp), vp, i]),
            ("rdma_destroy_id", i, [vp]),
            ("rdma_bind_addr", i, [vp, vp]),
            ("rdma_listen", i, [vp, i]),
            ("rdma_resolve_addr", i, [vp, vp, vp, i]),
            ("rdma_resolve_route", i, [vp, i]),
            ("rdma_connect", i, [vp, ctypes.POINTER(ConnParamStruct)]),
            ("rdma_accept", i, [vp, ctypes.POINTER(ConnParamStruct)]),
            ("rdma_reject", i, [vp, vp, ctypes.c_uint8]),
            ("rdma_establish", i, [vp]),
            ("rdma_disconnect", i, [vp]),
            ("rdma_get_cm_event", i, [vp, ctypes.POINTER(ctypes.POINTER(CmEventStruct))]),
            ("rdma_ack_cm_event", i, [ctypes.POINTER(CmEventStruct)]),
            ("rdma_init_qp_attr", i, [vp, ctypes.POINTER(QpAttrStruct), ctypes.POINTER(i)]),
        ]:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        verbs.ibv_get_device_name.restype = ctypes.c_char_p
        verbs.ibv_get_device_name.argtypes = [vp]
        _lib, _verbs = lib, verbs
    return _lib


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise TransportError(f"{what}: {os.strerror(err)}")


def sockaddr(family: str, addr: str, port: int) -> ctypes.Array:
    """A struct sockaddr_in / sockaddr_in6 for `addr` (configfs adrfam spelling)."""
    if family == "ipv6":
        raw = struct.pack("<H", socket.AF_INET6) + struct.pack(">HI", port, 0) + \
            socket.inet_pton(socket.AF_INET6, addr) + struct.pack("<I", 0)
    elif family == "ipv4":
        raw = struct.pack("<H", socket.AF_INET) + struct.pack(">H", port) + \
            socket.inet_pton(socket.AF_INET, addr) + bytes(8)
    else:
        raise TransportError(f"address family {family!r} is not one RDMA CM can listen on")
    return ctypes.create_string_buffer(raw, len(raw))


@dataclass(frozen=True)
class CmEvent:
    """A copy of one CM event (the librdmacm event is acked before anyone acts on it)."""

    type: CmEventType
    status: int
    id: int  # rdma_cm_id* the event is for (a new one for CONNECT_REQUEST)
    listen_id: int
    private_data: bytes
    responder_resources: int
    initiator_depth: int
    qp_num: int  # the peer's QP number (CONNECT_REQUEST / CONNECT_RESPONSE)


class EventChannel:
    """One rdma_event_channel with a non-blocking fd, for loop.add_reader / select."""

    def __init__(self) -> None:
        lib = _cm()
        self._ptr = lib.rdma_create_event_channel()
        if not self._ptr:
            raise TransportError(f"rdma_create_event_channel: {os.strerror(ctypes.get_errno())}")
        # struct rdma_event_channel { int fd; }
        self.fd = ctypes.c_int.from_address(self._ptr).value
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)

    @property
    def ptr(self) -> int:
        return self._ptr or 0

    def fileno(self) -> int:
        return self.fd

    def get_event(self) -> CmEvent | None:
        """The next event, or None when there is none right now (never blocks)."""
        if not self._ptr:
            return None
        lib = _cm()
        evp = ctypes.POINTER(CmEventStruct)()
        if lib.rdma_get_cm_event(self._ptr, ctypes.byref(evp)) != 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
            raise TransportError(f"rdma_get_cm_event: {os.strerror(err)}")
        ev = evp.contents
        c = ev.conn
        pdata = ctypes.string_at(c.private_data, c.private_data_len) if c.private_data else b""
        out = CmEvent(CmEventType(ev.event), ev.status, ev.id or 0, ev.listen_id or 0, pdata,
                      c.responder_resources, c.initiator_depth, c.qp_num)
        lib.rdma_ack_cm_event(evp)
        return out

    def close(self) -> None:
        if self._ptr:
            _cm().rdma_destroy_event_channel(self._ptr)
            self._ptr = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CmId:
    """One rdma_cm_id (RDMA_PS_TCP): a listener, or one connection's identity."""

    def __init__(self, channel: EventChannel | None = None, *, ptr: int = 0) -> None:
        lib = _cm()
        if ptr:  # adopted from a CONNECT_REQUEST event
            self._ptr: int | None = ptr
            return
        if channel is None:
            raise TransportError("a new CM ID needs an event channel")
        out = ctypes.c_void_p()
        _check(lib.rdma_create_id(channel.ptr, ctypes.byref(out), None, RDMA_PS_TCP),
               "rdma_create_id")
        self._ptr = out.value

    @property
    def ptr(self) -> int:
        return self._ptr or 0

    @property
    def closed(self) -> bool:
        return not self._ptr

    def _id(self) -> int:
        if not self._ptr:
            raise TransportError("CM ID is closed")
        return self._ptr

    @property
    def device_name(self) -> str:
        """The RDMA device the ID is bound to (after bind/resolve or on a request)."""
        verbs_ctx = ctypes.c_void_p.from_address(self._id()).value  # id->verbs
        if not verbs_ctx:
            raise TransportError("CM ID is not bound to an RDMA device")
        device = ctypes.c_void_p.from_address(verbs_ctx).value  # verbs->device
        assert _verbs is not None
        return _verbs.ibv_get_device_name(device).decode()

    def bind(self, family: str, addr: str, port: int) -> None:
        _check(_cm().rdma_bind_addr(self._id(), sockaddr(family, addr, port)),
               f"rdma_bind_addr {addr}:{port}")

    def listen(self, backlog: int = 128) -> None:
        _check(_cm().rdma_listen(self._id(), backlog), "rdma_listen")

    def resolve_addr(self, family: str, addr: str, port: int, timeout_ms: int = 2000) -> None:
        _check(_cm().rdma_resolve_addr(self._id(), None, sockaddr(family, addr, port),
                                       timeout_ms), f"rdma_resolve_addr {addr}:{port}")

    def resolve_route(self, timeout_ms: int = 2000) -> None:
        _check(_cm().rdma_resolve_route(self._id(), timeout_ms), "rdma_resolve_route")

    @staticmethod
    def _param(private_data: bytes, qp_num: int, responder_resources: int,
               initiator_depth: int) -> tuple[ConnParamStruct, ctypes.Array]:
        buf = ctypes.create_string_buffer(private_data, max(len(private_data), 1))
        p = ConnParamStruct(ctypes.cast(buf, ctypes.c_void_p), len(private_data),
                            responder_resources, initiator_depth, 1, 7, 7, 0, qp_num)
        return p, buf

    def connect(self, private_data: bytes, qp_num: int, responder_resources: int,
                initiator_depth: int) -> None:
        p, keep = self._param(private_data, qp_num, responder_resources, initiator_depth)
        _check(_cm().rdma_connect(self._id(), ctypes.byref(p)), "rdma_connect")
        del keep

    def accept(self, private_data: bytes, qp_num: int, responder_resources: int,
               initiator_depth: int) -> None:
        p, keep = self._param(private_data, qp_num, responder_resources, initiator_depth)
        _check(_cm().rdma_accept(self._id(), ctypes.byref(p)), "rdma_accept")
        del keep

    def reject(self, private_data: bytes) -> None:
        buf = ctypes.create_string_buffer(private_data, len(private_data))
        _check(_cm().rdma_reject(self._id(), buf, len(private_data)), "rdma_reject")

    def establish(self) -> None:
        _check(_cm().rdma_establish(self._id()), "rdma_establish")

    def disconnect(self) -> None:
        """Start a disconnect; harmless when the peer already left (EINVAL is ignored)."""
        if (self._ptr and _cm().rdma_disconnect(self._ptr) != 0
                and ctypes.get_errno() not in (errno.EINVAL, errno.ENOTCONN)):
            raise TransportError(f"rdma_disconnect: {os.strerror(ctypes.get_errno())}")

    def init_qp_attr(self, state: int) -> tuple[QpAttrStruct, int]:
        attr = QpAttrStruct()
        attr.qp_state = state
        mask = ctypes.c_int()
        _check(_cm().rdma_init_qp_attr(self._id(), ctypes.byref(attr), ctypes.byref(mask)),
               f"rdma_init_qp_attr(state={state})")
        return attr, mask.value

    def close(self) -> None:
        # Every event of this ID was acked when read (EventChannel.get_event), so
        # rdma_destroy_id cannot wait for outstanding events here.
        if self._ptr:
            ptr, self._ptr = self._ptr, None
            _cm().rdma_destroy_id(ptr)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
