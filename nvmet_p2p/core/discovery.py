"""The discovery service: the log page a host reads to find subsystems.

Entries are built per request from the configuration: the current discovery
subsystem, every subsystem linked to the port that this host may use, and the port's
referrals.  `genctr` moves on every change a host could see.  Fields follow the kernel's
`nvmet_format_discovery_entry()`: RDMA ports carry the RDMA TSAS, TCP ports a TSAS of
security type none and TREQ with "SQ flow control disable supported" (the kernel's port
default), and a port listening on a wildcard address names the address the host reached
(the kernel's `disc_traddr`).
"""

from __future__ import annotations

import ipaddress
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


def _entry(addr: Port | Referral, portid: int, subnqn: str, subtype: int,
           traddr: str | None = None) -> lg.DiscEntry:
    trtype = TRTYPES.get(addr.addr_trtype, lg.Trtype.LOOP)
    treq = TREQS.get(addr.addr_treq, lg.Treq.NOT_SPECIFIED)
    if trtype == lg.Trtype.RDMA:
        tsas = lg.rdma_tsas()
    elif trtype == lg.Trtype.TCP:
        tsas = lg.tcp_tsas()
        if subtype != lg.Subtype.REFERRAL:  # a referral carries only what was configured
            treq |= lg.Treq.DISABLE_SQFLOW
    else:
        tsas = bytes(lg.TSAS_SIZE)
    return lg.DiscEntry(
        trtype=trtype, adrfam=ADRFAMS.get(addr.addr_adrfam, lg.Adrfam.IPV4), subtype=subtype,
        treq=treq, portid=portid, trsvcid=addr.addr_trsvcid or "",
        traddr=traddr or addr.addr_traddr or "", subnqn=subnqn, tsas=tsas)


def _wildcard(traddr: str) -> bool:
    try:
        return ipaddress.ip_address(traddr).is_unspecified
    except ValueError:
        return False


def disc_entries(target: Target, port: Port, hostnqn: str,
                 local_traddr: str | None = None) -> list[lg.DiscEntry]:
    """The entries `hostnqn` may see through `port`; `local_traddr` is the address the
    host's queue reached, named instead of a wildcard listen address."""
    traddr = local_traddr if local_traddr and _wildcard(port.addr_traddr) else None
    entries = [_entry(port, port.portid, NVME_DISC_SUBSYS_NAME, lg.Subtype.CURRENT_DISC,
                      traddr)]
    for nqn in port.subsystems:
        subsys = target.get_subsys(nqn)
        if subsys is not None and subsys.allows_host(hostnqn):
            entries.append(_entry(port, port.portid, nqn, lg.Subtype.NVME, traddr))
    for ref in port.referrals.values():
        if ref.enable:
            entries.append(_entry(ref, ref.portid, NVME_DISC_SUBSYS_NAME, lg.Subtype.REFERRAL))
    return entries


def disc_log_page(target: Target, port: Port, hostnqn: str,
                  local_traddr: str | None = None) -> bytes:
    return lg.disc_log(target.disc_genctr, disc_entries(target, port, hostnqn, local_traddr))
