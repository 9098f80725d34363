"""The 64-byte SQE of each command family as a field table, and error locations from it.

The error log's Parameter Error Location is the byte offset of the bad field in the
command (the kernel writes `offsetof(struct nvme_identify, cns)` and so on).  Every
location the core reports is an `IPO_*` name below, looked up in these tables at import,
so a location is the field's real offset by construction; tests pin the tables against
`Sqe.encode()` and the fabrics command encoders.
"""

from __future__ import annotations

from nvmet_p2p.wire.layout import Kind, Layout, fields

SQE_SIZE = 64

# Dwords 0..9, shared by every admin and I/O command (struct nvme_common_command).
_COMMON_HEAD = (("opcode", 0, 1), ("flags", 1, 1), ("cid", 2, 2), ("nsid", 4, 4),
                ("cdw2", 8, 4), ("cdw3", 12, 4), ("mptr", 16, 8), ("dptr", 24, 16, Kind.BYTES))
# Fabrics commands put fctype where the others have the NSID (struct nvmf_common_command).
_FABRICS_HEAD = (("opcode", 0, 1), ("flags", 1, 1), ("cid", 2, 2), ("fctype", 4, 1),
                 ("dptr", 24, 16, Kind.BYTES))


def _sqe(head: tuple[tuple, ...], *specific: tuple) -> Layout:
    return Layout(SQE_SIZE, fields(*head, *specific))


SQE = _sqe(_COMMON_HEAD, ("cdw10", 40, 4), ("cdw11", 44, 4), ("cdw12", 48, 4),
           ("cdw13", 52, 4), ("cdw14", 56, 4), ("cdw15", 60, 4))
IDENTIFY = _sqe(_COMMON_HEAD, ("cns", 40, 1), ("cntid", 42, 2), ("cnssid", 44, 2),
                ("csi", 47, 1))
GET_LOG_PAGE = _sqe(_COMMON_HEAD, ("lid", 40, 1), ("lsp", 41, 1), ("numdl", 42, 2),
                    ("numdu", 44, 2), ("lsi", 46, 2), ("lpo", 48, 8), ("csi", 59, 1))
RW = _sqe(_COMMON_HEAD, ("slba", 40, 8), ("length", 48, 2), ("control", 50, 2),
          ("dsmgmt", 52, 4), ("reftag", 56, 4), ("apptag", 60, 2), ("appmask", 62, 2))
DSM = _sqe(_COMMON_HEAD, ("nr", 40, 4), ("attributes", 44, 4))
PROPERTY = _sqe(_FABRICS_HEAD, ("attrib", 40, 1), ("offset", 44, 4), ("value", 48, 8))
CONNECT = _sqe(_FABRICS_HEAD, ("recfmt", 40, 2), ("qid", 42, 2), ("sqsize", 44, 2),
               ("cattr", 46, 1), ("kato", 48, 4))
# The 1024-byte Connect data (struct nvmf_connect_data).
CONNECT_DATA = Layout(1024, fields(("hostid", 0, 16, Kind.BYTES), ("cntlid", 16, 2),
                                   ("subnqn", 256, 256, Kind.CSTR),
                                   ("hostnqn", 512, 256, Kind.CSTR)))


# -- parameter error locations -------------------------------------------------------------

IPO_OPCODE = SQE.offset("opcode")
IPO_FLAGS = SQE.offset("flags")  # FUSE and PSDT
IPO_NSID = SQE.offset("nsid")
IPO_CDW10 = SQE.offset("cdw10")  # Get/Set Features: FID and SV
IPO_CDW11 = SQE.offset("cdw11")  # Set Features: the value
IPO_IDENTIFY_CNS = IDENTIFY.offset("cns")
IPO_LOG_LID = GET_LOG_PAGE.offset("lid")
IPO_LOG_NUMDL = GET_LOG_PAGE.offset("numdl")
IPO_LOG_LPO = GET_LOG_PAGE.offset("lpo")
IPO_RW_SLBA = RW.offset("slba")
IPO_DSM_NR = DSM.offset("nr")  # a bad range is one of the NR + 1 ranges it counts
IPO_FCTYPE = PROPERTY.offset("fctype")
IPO_PROP_ATTRIB = PROPERTY.offset("attrib")
IPO_PROP_OFFSET = PROPERTY.offset("offset")
CONNECT_IPO_SQE_RECFMT = CONNECT.offset("recfmt")
CONNECT_IPO_SQE_QID = CONNECT.offset("qid")
CONNECT_IPO_SQE_SQSIZE = CONNECT.offset("sqsize")
CONNECT_IPO_DATA_CNTLID = CONNECT_DATA.offset("cntlid")
CONNECT_IPO_DATA_SUBNQN = CONNECT_DATA.offset("subnqn")
CONNECT_IPO_DATA_HOSTNQN = CONNECT_DATA.offset("hostnqn")
