"""The SQE field tables that name error locations agree with the encoders and decoders.

Each table is checked both ways against the struct-based code that really reads and
writes SQEs, so an `IPO_*` name can only be the offset of the field the core means.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nvmet_p2p.wire import sqe_layout as ipo
from nvmet_p2p.wire.command import (
    ConnectCmd,
    ConnectData,
    FabricsType,
    PropertyCmd,
    Sgl,
    Sqe,
    fabrics_sqe,
)
from nvmet_p2p.wire.identify import IdentifyCmd
from nvmet_p2p.wire.log import GetLogPageCmd

u8, u16 = st.integers(0, 0xFF), st.integers(0, 0xFFFF)
u32, u64 = st.integers(0, 0xFFFFFFFF), st.integers(0, (1 << 64) - 1)
sqes = st.builds(Sqe, opcode=u8, flags=u8, cid=u16, nsid=u32, cdw2=u32, cdw3=u32, mptr=u64,
                 dptr=st.binary(min_size=16, max_size=16), cdw10=u32, cdw11=u32, cdw12=u32,
                 cdw13=u32, cdw14=u32, cdw15=u32)


@given(sqes)
def test_common_layout_is_the_sqe_encoding_both_ways(sqe):
    raw = sqe.encode()
    fields = ipo.SQE.unpack(raw)
    assert ipo.SQE.pack(fields) == raw
    assert fields == {k: getattr(sqe, k) for k in ipo.SQE.names}


@given(sqes)
def test_command_layouts_read_what_the_decoders_read(sqe):
    raw = sqe.encode()
    ident = ipo.IDENTIFY.unpack(raw)
    cmd = IdentifyCmd.from_sqe(sqe)
    assert (ident["cns"], ident["cntid"], ident["cnssid"], ident["csi"]) == \
        (cmd.cns, cmd.cntid, cmd.cnssid, cmd.csi)
    glp = ipo.GET_LOG_PAGE.unpack(raw)
    log = GetLogPageCmd.from_sqe(sqe)
    assert (glp["lid"], glp["lsi"], glp["lpo"], glp["csi"]) == (log.lid, log.lsi, log.lpo, log.csi)
    assert glp["numdl"] | glp["numdu"] << 16 == log.numd
    rw = ipo.RW.unpack(raw)
    assert rw["slba"] == sqe.cdw10 | sqe.cdw11 << 32 and rw["length"] == sqe.cdw12 & 0xFFFF
    assert ipo.DSM.unpack(raw)["nr"] == sqe.cdw10


@given(recfmt=u16, qid=u16, sqsize=u16, cattr=u8, kato=u32)
def test_connect_layout_matches_the_connect_encoder(recfmt, qid, sqsize, cattr, kato):
    sqe = fabrics_sqe(FabricsType.CONNECT, recfmt=recfmt, qid=qid, sqsize=sqsize, cattr=cattr,
                      kato=kato, sgl=Sgl())
    got = ipo.CONNECT.unpack(sqe.raw)
    assert got["fctype"] == FabricsType.CONNECT
    assert ConnectCmd(got["recfmt"], got["qid"], got["sqsize"], got["cattr"], got["kato"]) == \
        ConnectCmd.from_sqe(sqe)


@given(attrib=u8, offset=u32, value=u64)
def test_property_layout_matches_the_property_encoder(attrib, offset, value):
    sqe = fabrics_sqe(FabricsType.PROPERTY_SET, attrib=attrib, offset=offset, value=value)
    got = ipo.PROPERTY.unpack(sqe.raw)
    assert PropertyCmd(got["attrib"], got["offset"], got["value"]) == PropertyCmd.from_sqe(sqe)


def test_connect_data_layout_matches_the_encoder():
    data = ConnectData(bytes(range(16)), 0x1234, "nqn.sub", "nqn.host").encode()
    got = ipo.CONNECT_DATA.unpack(data)
    assert (got["hostid"], got["cntlid"], got["subnqn"], got["hostnqn"]) == \
        (bytes(range(16)), 0x1234, "nqn.sub", "nqn.host")


def test_error_locations_are_the_kernel_offsets():
    # offsetof() in include/linux/nvme.h, as the kernel target reports them
    assert (ipo.IPO_OPCODE, ipo.IPO_FLAGS, ipo.IPO_NSID) == (0, 1, 4)
    assert (ipo.IPO_CDW10, ipo.IPO_CDW11, ipo.IPO_IDENTIFY_CNS) == (40, 44, 40)
    assert (ipo.IPO_LOG_LID, ipo.IPO_LOG_NUMDL, ipo.IPO_LOG_LPO) == (40, 42, 48)
    assert (ipo.IPO_FCTYPE, ipo.IPO_PROP_ATTRIB, ipo.IPO_PROP_OFFSET) == (4, 40, 44)
    assert (ipo.CONNECT_IPO_SQE_RECFMT, ipo.CONNECT_IPO_SQE_QID,
            ipo.CONNECT_IPO_SQE_SQSIZE) == (40, 42, 44)
    assert (ipo.CONNECT_IPO_DATA_CNTLID, ipo.CONNECT_IPO_DATA_SUBNQN,
            ipo.CONNECT_IPO_DATA_HOSTNQN) == (16, 256, 512)
