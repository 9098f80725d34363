"""Subsystems and namespaces at run time: what the configuration enabled, opened.

A `Subsys` wraps its configuration object (the configfs tree owns the settings) and
adds what only exists while the target runs: controllers, cntlid allocation, and
`Ns` objects whose backends are open.  The discovery subsystem has no configuration.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from typing import TYPE_CHECKING, Any

from nvmet_p2p import logfmt
from nvmet_p2p.wire.limits import NVME_DISC_SUBSYS_NAME, NVMET_NR_QUEUES

if TYPE_CHECKING:
    from nvmet_p2p.configfs import Namespace
    from nvmet_p2p.core.backend import NsBackend
    from nvmet_p2p.core.ctrl import Ctrl

log = logging.getLogger("nvmet_p2p.core")

_UUID_NS = uuidlib.UUID("5c9b4a1e-3f1d-4f6a-9a53-6e766d65742d")  # namespace for derived IDs


def parse_version(text: str) -> int:
    """'1.3' -> 0x00010300, the VS register / Identify VER encoding."""
    parts = [int(p) for p in text.split(".")] + [0, 0]
    major, minor, tertiary = parts[:3]
    return major << 16 | minor << 8 | tertiary


def _id_bytes(text: str, derived_from: str) -> bytes:
    """A 16-byte identifier from its configured text, or a stable one derived from names.

    All zeroes (the configfs default device_nguid) means "not set": a zero NGUID is
    "not reported" to a host, so we derive one rather than hand out a zero ID.
    """
    value = bytes.fromhex(text.replace("-", "")) if text else bytes(16)
    if value != bytes(16):
        return value
    return uuidlib.uuid5(_UUID_NS, derived_from).bytes


class Ns:
    """An enabled namespace: its open backend, in-flight count and counters."""

    def __init__(self, subsys: Subsys, nsid: int, backend: NsBackend,
                 cfg: Namespace | None = None) -> None:
        self.subsys = subsys
        self.nsid = nsid
        self.backend = backend
        self.cfg = cfg
        self.block_size = backend.block_size
        self.blksize_shift = backend.block_size.bit_length() - 1
        self.nblocks = backend.nblocks
        key = f"{subsys.nqn}/{nsid}"
        self.uuid = _id_bytes(cfg.device_uuid if cfg else "", "uuid:" + key)
        self.nguid = _id_bytes(cfg.device_nguid if cfg else "", "nguid:" + key)
        self.inflight = 0
        self.closing = False
        # Read/Write payload by memory: P2P, or system memory with requests and bytes
        # per reason (io._account)
        self.stats: dict[str, Any] = {
            "read_cmds": 0, "write_cmds": 0, "read_bytes": 0, "write_bytes": 0,
            "p2p_reqs": 0, "p2p_bytes": 0, "sysmem_reqs": 0, "sysmem_bytes": 0,
            "sysmem_by_reason": {}, "sysmem_bytes_by_reason": {}}

    def get(self) -> None:
        self.inflight += 1

    def put(self) -> None:
        self.inflight -= 1
        if self.closing and self.inflight == 0:
            self._close()

    def disable(self) -> None:
        """Stop taking new I/O; close the backend once in-flight I/O has completed."""
        self.closing = True
        if self.inflight == 0:
            self._close()

    def _close(self) -> None:
        try:
            self.backend.close()
        except Exception:
            log.exception("%s", logfmt.line("event", "ns_close_failed", {
                "subnqn": self.subsys.nqn, "nsid": self.nsid}))

    def describe(self) -> dict:
        stats = {k: dict(v) if isinstance(v, dict) else v for k, v in self.stats.items()}
        return {"nsid": self.nsid, **self.backend.describe(), "inflight": self.inflight,
                "stats": stats}


class Subsys:
    def __init__(self, nqn: str, cfg: Any = None) -> None:
        self.nqn = nqn
        self.cfg = cfg
        self.is_discovery = nqn == NVME_DISC_SUBSYS_NAME
        self.ns: dict[int, Ns] = {}
        self.ctrls: dict[int, Ctrl] = {}
        self._next_cntlid = 0

    # -- attributes, from the configuration (defaults for the discovery subsystem) --
    def _attr(self, name: str, default: Any) -> Any:
        return getattr(self.cfg, name, default) if self.cfg is not None else default

    @property
    def serial(self) -> str:
        return self._attr("attr_serial", "")

    @property
    def model(self) -> str:
        return self._attr("attr_model", "nvmet-p2p")

    @property
    def firmware(self) -> str:
        return self._attr("attr_firmware", "0.1.0")

    @property
    def ieee_oui(self) -> int:
        return self._attr("attr_ieee_oui", 0)

    @property
    def version(self) -> int:
        return parse_version(self._attr("attr_version", "1.3"))

    @property
    def qid_max(self) -> int:
        return self._attr("attr_qid_max", NVMET_NR_QUEUES)

    def mark_discovered(self) -> None:
        """A host identified a controller: the configuration keeps the identity it read."""
        if self.cfg is not None:
            self.cfg.mark_discovered()

    def allows_host(self, hostnqn: str) -> bool:
        if self.cfg is None:
            return True
        return self.cfg.allows_host(hostnqn)

    def alloc_cntlid(self) -> int | None:
        """Next free cntlid in [cntlid_min, cntlid_max], round-robin as the kernel's IDA."""
        lo, hi = self._attr("attr_cntlid_min", 1), self._attr("attr_cntlid_max", 0xFFEF)
        span = hi - lo + 1
        for i in range(span):
            cntlid = lo + (self._next_cntlid + i) % span
            if cntlid not in self.ctrls:
                self._next_cntlid = (cntlid - lo + 1) % span
                return cntlid
        return None

    def active_nsids(self) -> list[int]:
        return sorted(nsid for nsid, ns in self.ns.items() if not ns.closing)

    def find_ns(self, nsid: int) -> Ns | None:
        ns = self.ns.get(nsid)
        if ns is None or ns.closing:
            return None
        return ns
