"""NVMe status codes: the 15-bit status field of a completion as values.

The status field is ``DNR << 14 | More << 13 | SCT << 8 | SC``.  The enum values
below are ``SCT << 8 | SC``; add ``DNR`` when a retry of the same command cannot
succeed.
"""

from enum import IntEnum

DNR = 0x4000  # Do Not Retry
MORE = 0x2000  # more status information in the error log


class Status(IntEnum):
    # generic command status (SCT 0)
    SUCCESS = 0x000
    INVALID_OPCODE = 0x001
    INVALID_FIELD = 0x002
    CMDID_CONFLICT = 0x003
    DATA_XFER_ERROR = 0x004
    POWER_LOSS = 0x005
    INTERNAL = 0x006
    ABORT_REQ = 0x007
    ABORT_QUEUE = 0x008
    FUSED_FAIL = 0x009
    FUSED_MISSING = 0x00A
    INVALID_NS = 0x00B
    CMD_SEQ_ERROR = 0x00C
    SGL_INVALID_LAST = 0x00D
    SGL_INVALID_COUNT = 0x00E
    SGL_INVALID_DATA = 0x00F  # Data SGL Length Invalid
    SGL_INVALID_METADATA = 0x010
    SGL_INVALID_TYPE = 0x011
    SGL_INVALID_OFFSET = 0x016
    SGL_INVALID_SUBTYPE = 0x017
    TRANSIENT_TRANSPORT = 0x022  # e.g. an NVMe/TCP data digest error: a retry may work
    NS_NOT_READY = 0x082
    LBA_RANGE = 0x080
    CAP_EXCEEDED = 0x081
    # command specific status (SCT 1)
    CQ_INVALID = 0x100
    QID_INVALID = 0x101
    QUEUE_SIZE = 0x102
    ABORT_LIMIT = 0x103
    ASYNC_LIMIT = 0x105
    INVALID_LOG_PAGE = 0x109
    INVALID_FORMAT = 0x10A
    FEATURE_NOT_SAVEABLE = 0x10D
    FEATURE_NOT_CHANGEABLE = 0x10E
    CONNECT_FORMAT = 0x180
    CONNECT_CTRL_BUSY = 0x181
    CONNECT_INVALID_PARAM = 0x182
    CONNECT_RESTART_DISC = 0x183
    CONNECT_INVALID_HOST = 0x184
    # media errors (SCT 2)
    WRITE_FAULT = 0x280
    READ_ERROR = 0x281


def status_name(status: int) -> str:
    """'INVALID_FIELD|DNR' style text for logs and test failure messages."""
    base = status & 0x7FF
    try:
        name = Status(base).name
    except ValueError:
        name = f"0x{base:03x}"
    if status & DNR:
        name += "|DNR"
    if status & MORE:
        name += "|MORE"
    return name
