"""Raw protocol pieces the raw-RDMA-host tests send: CM private data and write capsules."""

from __future__ import annotations

from nvmet_p2p.transports.rdma_cm import CmRequest
from nvmet_p2p.wire.command import IoOpcode, Psdt, Sgl, Sqe


def cm_pdata(recfmt: int = 0, qid: int = 0, hrqsize: int = 32, hsqsize: int = 31) -> bytes:
    """The NVMe-oF RDMA CM request private data, any field as given (valid by default)."""
    return CmRequest(recfmt, qid, hrqsize, hsqsize).encode()


def write_capsule(cid: int, sgl: Sgl, payload: bytes = b"", nlb: int = 1) -> bytes:
    """A Write SQE for nsid 1, LBA 0 with `sgl`, followed by `payload` (in-capsule data)."""
    sqe = Sqe(opcode=IoOpcode.WRITE, flags=Psdt.SGL_MPTR_CONTIG << 6, cid=cid, nsid=1,
              cdw12=nlb - 1, dptr=sgl.encode())
    return sqe.encode() + payload
