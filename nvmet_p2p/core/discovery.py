"""The discovery service: the log page a host reads to find subsystems.

Entries are built per request from the configuration: the current discovery
subsystem, every subsystem linked to the port that this host may use, and the port's
referrals.  `genctr` moves on every change a host could see.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nvmet_p2p.wire import log as lg
from nvmet_p2p.wire.limits import NVME_DISC_SUBSYS_NAME

if TYPE_CHECKING:
    from nvmet_p2p.configfs import Port, Referral
    from nvmet_p2p.core.target import Target

TRTYPES = {"rdma": lg.Trtype.RDMA, "tcp": lg.Trtype.TCP, "loop": lg.Trtype.LOOP,
           "fc": lg.Trtype.FC}
ADRFAMS = {"ipv4": lg.Adrfam.IPV4, "ipv6": lg.Adrfam.IPV6, "ib": lg.Adrfam.IB,
           "fc": lg.Adrfam.FC, "loop": lg.Adrfam.LOOP, "": lg.Adrfam.LOOP}
TREQS = {"not specified": lg.Treq.NOT_SPECIFIED, "required": lg.Treq.REQUIRED,
         "not required": lg.Treq.NOT_REQUIRED}


def _entry(addr: Port | Referral, portid: int, subnqn: str, subtype: int) -> lg.DiscEntry:
    trtype = TRTYPES.get(addr.addr_trtype, lg.Trtype.LOOP)
    tsas = lg.rdma_tsas() if trtype == lg.Trtype.RDMA else bytes(lg.TSAS_SIZE)
    return lg.DiscEntry(
        trtype=trtype, adrfam=ADRFAMS.get(addr.addr_adrfam, lg.Adrfam.IPV4), subtype=subtype,
        treq=TREQS.get(addr.addr_treq, lg.Treq.NOT_SPECIFIED), portid=portid,
        trsvcid=addr.addr_trsvcid or "", traddr=addr.addr_traddr or "", subnqn=subnqn,
        tsas=tsas)


def disc_entries(target: Target, port: Port, hostnqn: str) -> list[lg.DiscEntry]:
    entries = [_entry(port, port.portid, NVME_DISC_SUBSYS_NAME, lg.Subtype.CURRENT_DISC)]
    for nqn in port.subsystems:
        subsys = target.get_subsys(nqn)
        if subsys is not None and subsys.allows_host(hostnqn):
            entries.append(_entry(port, port.portid, nqn, lg.Subtype.NVME))
    for ref in port.referrals.values():
        if ref.enable:
            entries.append(_entry(ref, ref.portid, NVME_DISC_SUBSYS_NAME, lg.Subtype.REFERRAL))
    return entries


def disc_log_page(target: Target, port: Port, hostnqn: str) -> bytes:
    return lg.disc_log(target.disc_genctr, disc_entries(target, port, hostnqn))
