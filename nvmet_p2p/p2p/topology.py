"""The PCI peer-to-peer topology model: may a provider's BAR memory serve a set of clients?

This module owns the same judgement the kernel makes in ``drivers/pci/p2pdma.c``
(``calc_map_type_and_dist``, ``pci_p2pdma_distance_many``, ``pci_p2pmem_find_many``),
re-done in userspace from a sysfs tree:

* the upstream chain of every PCI function, read from its resolved path under
  ``devices/pciDDDD:BB/...`` (a function on a root bus has no upstream bridge);
* the ACS control register of every function on the path, read from its ``config`` file;
* the host bridge of each root bus (the first function on it, if it is devfn 00.0 or a root
  port) and the kernel's whitelist of host bridges, plus the "AMD Zen or newer" CPU rule;
* resolution of what a target hands us (a BDF, an RDMA device, a netdev, a block device,
  a file) to the PCI function the kernel would call the client, soft-RDMA devices excluded;
* the published ``p2pmem`` providers and the choice of the nearest one.

The sysfs root and the CPU are parameters so captured or synthetic trees can be judged on
any machine.  Nothing here writes to sysfs.
"""

from __future__ import annotations

import os
import random
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nvmet_p2p.errors import P2PError
from nvmet_p2p.pci import normalize_bdf

# The kernel's enum pci_p2pdma_map_type, in order of preference; a set of clients is as
# good as its worst member.
MAP_BUS_ADDR = "bus_addr"
MAP_THRU_HOST_BRIDGE = "thru_host_bridge"
MAP_NOT_SUPPORTED = "not_supported"
_MAP_RANK = {MAP_BUS_ADDR: 0, MAP_THRU_HOST_BRIDGE: 1, MAP_NOT_SUPPORTED: 2}

NOT_PCI_PHRASE = "cannot be used for peer-to-peer DMA"  # shared with the kernel's warnings

_ROOT_BUS_RE = re.compile(r"^pci[0-9a-f]{4,}:[0-9a-f]{2}$")

# Config space layout (PCI Local Bus and PCIe base specifications).
_CFG_STATUS = 0x06
_CFG_STATUS_CAP_LIST = 1 << 4
_CFG_CAP_PTR = 0x34
_CAP_ID_EXP = 0x10
_EXP_TYPE_ROOT_PORT = 0x4
_EXT_CAP_START = 0x100
_EXT_CAP_ID_ACS = 0x000D
_ACS_CTRL = 6  # offset of the ACS Control register inside the capability
ACS_RR = 1 << 2  # P2P Request Redirect
ACS_CR = 1 << 3  # P2P Completion Redirect
ACS_UF = 1 << 4  # Upstream Forwarding (does not redirect peer traffic by itself)
ACS_EC = 1 << 5  # P2P Egress Control
_ACS_REDIRECT_BITS = ACS_RR | ACS_CR | ACS_EC  # what pci_bridge_has_acs_redir() tests
# An unprivileged read of `config` returns only the 64-byte header; every real function
# has at least 256 bytes, so less means "not allowed to see", not "absent".
_CFG_FULL_MIN = 256
_CLASS_BRIDGE_PCI = 0x0604

# pci_p2pdma_whitelist[]: (vendor, device or None for any, requires same host bridge)
INTEL, GOOGLE, NVIDIA, ZHAOXIN = 0x8086, 0x1AE0, 0x10DE, 0x1D17
HOST_BRIDGE_WHITELIST: tuple[tuple[int, int | None, bool], ...] = (
    (INTEL, 0x3C00, True),  # Xeon E5 / Core i7
    (INTEL, 0x3C01, True),
    (INTEL, 0x2F00, True),  # Xeon E7 v3 / E5 v3 / Core i7
    (INTEL, 0x2F01, True),
    (INTEL, 0x2030, False),  # Skylake-E
    (INTEL, 0x2031, False),
    (INTEL, 0x2032, False),
    (INTEL, 0x2033, False),
    (INTEL, 0x2020, False),
    (INTEL, 0x09A2, False),
    # On these platforms the accelerator is the first function of its own root bus.
    (INTEL, 0x0B25, False),  # DSA SPR
    (INTEL, 0x0CFE, False),  # IAX SPR
    (INTEL, 0x11FB, False),  # DSA GNR-D
    (INTEL, 0x1212, False),  # DSA DMR
    (INTEL, 0x1216, False),  # IAA DMR
    (INTEL, 0x4940, False),  # QAT 4xxx
    (INTEL, 0x4942, False),  # QAT 401xx
    (INTEL, 0x4944, False),  # QAT 402xx
    (INTEL, 0x4946, False),  # QAT 420xx
    (INTEL, 0x4948, False),  # QAT 6xxx
    (GOOGLE, None, False),  # Google SoCs
    (NVIDIA, 0x2F95, False),  # Grace
    (NVIDIA, 0x2F96, False),
    (NVIDIA, 0x2F97, False),
    (NVIDIA, 0x2F98, False),
    (ZHAOXIN, 0x1003, True),  # KX-6000 / KH-40000 / KX-6000G / KX-7000 / KH-50000
    (ZHAOXIN, 0x1005, True),
    (ZHAOXIN, 0x1006, True),
    (ZHAOXIN, 0x1007, True),
    (ZHAOXIN, 0x1008, False),
)
AMD_ZEN_FAMILY = 0x17  # cpu_supports_p2pdma(): AMD family 0x17 (Zen) and newer

_SOFT_RDMA = {"rxe": "soft-RoCE", "siw": "soft-iWARP"}


class UnknownDeviceError(P2PError):
    """A BDF or device name that the sysfs tree does not have."""


def _devfn(bdf: str) -> tuple[int, int]:
    dev, fn = bdf.rsplit(":", 1)[1].split(".")
    return int(dev, 16), int(fn)


# --- CPU ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSpec:
    """The boot CPU as the kernel's ``cpu_data(0)`` sees it (x86 vendor string and family)."""

    vendor: str  # "GenuineIntel", "AuthenticAMD", "" when not x86 or unknown
    family: int | None

    @classmethod
    def parse(cls, text: str) -> CpuSpec:
        """Parse ``VENDOR:FAMILY``; the family is decimal as in cpuinfo, or 0x-prefixed."""
        vendor, sep, family = text.partition(":")
        if not sep or not vendor:
            raise ValueError(f"cpu spec {text!r} is not VENDOR:FAMILY (e.g. AuthenticAMD:25)")
        try:
            return cls(vendor, int(family, 0))
        except ValueError:
            raise ValueError(f"cpu spec {text!r}: family {family!r} is not a number") from None

    @classmethod
    def from_cpuinfo(cls, path: str | os.PathLike[str] = "/proc/cpuinfo") -> CpuSpec:
        """Read the first CPU's vendor_id and cpu family; unknown (not x86) when absent."""
        vendor, family = "", None
        try:
            text = Path(path).read_text()
        except OSError:
            return cls("", None)
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "vendor_id" and not vendor:
                vendor = value.strip()
            elif key == "cpu family" and family is None:
                family = int(value.strip())
            elif not line.strip() and vendor:
                break  # end of the first processor block
        return cls(vendor, family)

    @property
    def supports_p2pdma(self) -> bool:
        """The kernel lets any traffic through the host bridge on AMD Zen or newer."""
        return self.vendor == "AuthenticAMD" and (self.family or 0) >= AMD_ZEN_FAMILY

    def __str__(self) -> str:
        if not self.vendor:
            return "unknown/non-x86 CPU"
        return f"{self.vendor} family {self.family:#x}" if self.family is not None else self.vendor


# --- the PCI tree ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PciDev:
    """One PCI function as read from sysfs."""

    bdf: str
    path: Path  # resolved directory under <sysfs>/devices
    root_bus: Path  # the pciDDDD:BB directory: one per host bridge
    upstream: str | None  # pci_upstream_bridge(): None on a root bus
    vendor: int
    device: int
    class_code: int  # 24-bit class/subclass/prog-if
    pcie_type: int | None  # PCIe device/port type; None when absent or unreadable
    acs_ctrl: int | None  # ACS Control; None when the function has no ACS capability
    config_readable: bool  # False when only the 64-byte header could be read

    @property
    def acs_redirects(self) -> bool:
        return self.acs_ctrl is not None and bool(self.acs_ctrl & _ACS_REDIRECT_BITS)

    @property
    def ids(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"


def _find_cap(cfg: bytes, cap_id: int) -> int | None:
    if len(cfg) < 0x40 or not struct.unpack_from("<H", cfg, _CFG_STATUS)[0] & _CFG_STATUS_CAP_LIST:
        return None
    pos = cfg[_CFG_CAP_PTR] & ~3
    for _ in range(48):  # 192 bytes of capability space hold at most 48 entries
        if pos < 0x40 or pos + 2 > len(cfg):
            return None
        if cfg[pos] == cap_id:
            return pos
        pos = cfg[pos + 1] & ~3
    return None


def _find_ext_cap(cfg: bytes, cap_id: int) -> int | None:
    pos = _EXT_CAP_START
    for _ in range((4096 - _EXT_CAP_START) // 8):  # guards against a looping list
        if pos + 4 > len(cfg):
            return None
        header = struct.unpack_from("<I", cfg, pos)[0]
        if header in (0, 0xFFFFFFFF):
            return None
        if header & 0xFFFF == cap_id:
            return pos
        pos = (header >> 20) & 0xFFC
        if pos < _EXT_CAP_START:
            return None
    return None


def parse_config(cfg: bytes) -> tuple[int | None, int | None, bool]:
    """Return (PCIe port type, ACS control, fully readable) from config space bytes."""
    readable = len(cfg) >= _CFG_FULL_MIN
    pcie_type = acs_ctrl = None
    exp = _find_cap(cfg, _CAP_ID_EXP)
    if exp is not None and exp + 4 <= len(cfg):
        pcie_type = (cfg[exp + 2] >> 4) & 0xF
    acs = _find_ext_cap(cfg, _EXT_CAP_ID_ACS)
    if acs is not None and acs + _ACS_CTRL + 2 <= len(cfg):
        acs_ctrl = struct.unpack_from("<H", cfg, acs + _ACS_CTRL)[0]
    return pcie_type, acs_ctrl, readable


def _read_hex(path: Path) -> int:
    return int(path.read_text().strip(), 16)


# --- clients and decisions ------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    """What a target hands the P2P code, resolved to the PCI function the kernel would use."""

    spec: str  # as given: BDF, RDMA device, netdev, block device, file path
    kind: str  # "pci", "rdma", "net", "block", "file"
    bdf: str | None  # None: not a PCI client, see reason
    reason: str | None = None  # why it is not a PCI client
    via: str | None = None  # e.g. the netdev under a soft-RoCE device

    @property
    def name(self) -> str:
        return self.spec if self.bdf in (None, self.spec) else f"{self.spec} ({self.bdf})"


@dataclass(frozen=True)
class ClientResult:
    """calc_map_type_and_dist() for one (provider, client) pair."""

    client: Client
    map_type: str
    distance: int | None
    path: tuple[str, ...] = ()  # provider ... common bridge or host bridge(s) ... client
    acs_redirect: tuple[str, ...] = ()  # BDFs whose ACS redirects peer traffic upstream
    reasons: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "spec": self.client.spec,
            "kind": self.client.kind,
            "bdf": self.client.bdf,
            "map_type": self.map_type,
            "distance": self.distance,
            "path": list(self.path),
            "acs_redirect": list(self.acs_redirect),
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class Decision:
    """pci_p2pdma_distance_many() for one provider and a set of clients, with the reasons."""

    provider: str
    map_type: str  # the worst over the clients
    distance: int | None  # sum over the clients; None when not supported
    clients: tuple[ClientResult, ...]
    reasons: tuple[str, ...]  # why the map type is worse than bus_addr
    warnings: tuple[str, ...] = ()  # what we could not check (e.g. unreadable config space)

    @property
    def supported(self) -> bool:
        return self.map_type != MAP_NOT_SUPPORTED

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (keys: provider, map_type, distance, clients, reasons, warnings)."""
        return {
            "provider": self.provider,
            "map_type": self.map_type,
            "distance": self.distance,
            "clients": [c.to_json() for c in self.clients],
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class P2pmemInfo:
    """A provider the kernel published: /sys/bus/pci/devices/<bdf>/p2pmem (kernel >= 4.20)."""

    bdf: str
    size: int
    available: int
    published: bool
    allocatable: bool = False  # p2pmem/allocate exists (kernel >= 6.2): mmap-able by users


def published_p2pmem(sysfs_root: str | os.PathLike[str] = "/sys") -> list[P2pmemInfo]:
    """Every PCI function with a p2pmem directory, published or not, in bus order."""
    found = []
    devices = Path(sysfs_root) / "bus/pci/devices"
    for entry in sorted(devices.glob("*/p2pmem")):
        try:
            size = int((entry / "size").read_text())
            available = int((entry / "available").read_text())
            published = (entry / "published").read_text().strip() == "1"
        except (OSError, ValueError):
            continue  # a half-torn-down provider is not a candidate
        found.append(
            P2pmemInfo(
                entry.parent.name, size, available, published, (entry / "allocate").exists()
            )
        )
    return found


# --- the model ------------------------------------------------------------------------------


class Topology:
    """The PCI tree under one sysfs root, judged for one CPU."""

    def __init__(
        self,
        sysfs_root: str | os.PathLike[str] = "/sys",
        cpu: CpuSpec | str | None = None,
        cpuinfo_path: str | os.PathLike[str] = "/proc/cpuinfo",
    ) -> None:
        self.sysfs_root = Path(sysfs_root)
        if isinstance(cpu, str):
            cpu = CpuSpec.parse(cpu)
        self.cpu = cpu if cpu is not None else CpuSpec.from_cpuinfo(cpuinfo_path)
        self._devs: dict[str, PciDev] = {}
        # The kernel caches each client's map type in the provider's xarray; we keep the
        # whole result per (provider, client) for the lifetime of this object.
        self._cache: dict[tuple[str, Client], ClientResult] = {}

    # - reading sysfs -

    def pci_dev(self, bdf: str) -> PciDev:
        """The function at ``bdf`` (any accepted spelling); UnknownDeviceError if absent."""
        full = normalize_bdf(bdf)
        if full is None:
            raise UnknownDeviceError(f"{bdf!r} is not a PCI address (DDDD:BB:DD.F)")
        if full in self._devs:
            return self._devs[full]
        link = self.sysfs_root / "bus/pci/devices" / full
        if not link.exists():
            raise UnknownDeviceError(f"no PCI device {full} under {self.sysfs_root}")
        path = Path(os.path.realpath(link))
        parts = path.parts
        roots = [i for i, p in enumerate(parts) if _ROOT_BUS_RE.match(p)]
        if not roots:
            raise UnknownDeviceError(f"PCI device {full} is not below a pciDDDD:BB root bus")
        root = roots[-1]  # VMD and similar put a second root bus below a function
        chain = parts[root + 1 :]
        upstream = chain[-2] if len(chain) >= 2 and normalize_bdf(chain[-2]) else None
        try:
            cfg = (path / "config").read_bytes()[:4096]
        except OSError:
            cfg = b""
        pcie_type, acs_ctrl, readable = parse_config(cfg)
        dev = PciDev(
            bdf=full,
            path=path,
            root_bus=Path(*parts[: root + 1]),
            upstream=upstream,
            vendor=_read_hex(path / "vendor"),
            device=_read_hex(path / "device"),
            class_code=_read_hex(path / "class"),
            pcie_type=pcie_type,
            acs_ctrl=acs_ctrl,
            config_readable=readable,
        )
        self._devs[full] = dev
        return dev

    def upstream_chain(self, bdf: str) -> list[PciDev]:
        """The function itself, then each pci_upstream_bridge() up to the root bus."""
        chain = [self.pci_dev(bdf)]
        while chain[-1].upstream is not None:
            chain.append(self.pci_dev(chain[-1].upstream))
        return chain

    def host_bridge(self, root_bus: Path) -> PciDev | None:
        """pci_host_bridge_dev(): the first function on the root bus if it is 00.0 or a root
        port.  When config space is unreadable a PCI-to-PCI bridge stands in for a root port."""
        bdfs = sorted((p.name for p in root_bus.iterdir() if normalize_bdf(p.name)), key=_devfn)
        if not bdfs:
            return None
        first = self.pci_dev(bdfs[0])
        if _devfn(first.bdf) == (0, 0) or first.pcie_type == _EXP_TYPE_ROOT_PORT:
            return first
        if first.pcie_type is None and first.class_code >> 8 == _CLASS_BRIDGE_PCI:
            return first
        return None

    # - clients -

    def resolve_client(self, spec: str) -> Client:
        """Map a BDF, RDMA device, netdev, block device or file to the kernel's PCI client."""
        bdf = normalize_bdf(spec)
        if bdf is not None:
            self.pci_dev(bdf)  # raises for an unknown address
            return Client(spec, "pci", bdf)
        if os.sep in spec and not spec.startswith("/dev/"):
            return Client(
                spec, "file", None,
                f"{spec} is a file, not a PCI device; a file-backed namespace {NOT_PCI_PHRASE}",
            )
        name = spec
        if spec.startswith("/dev/"):
            real = os.path.realpath(spec) if os.path.exists(spec) else spec
            name = os.path.basename(real)
        ib = self.sysfs_root / "class/infiniband" / name
        if ib.exists():
            return self._rdma_client(spec, name, ib)
        net = self.sysfs_root / "class/net" / name
        if net.exists():
            return self._walked_client(spec, "net", net / "device", "virtual netdev")
        blk = self.sysfs_root / "class/block" / name
        if blk.exists():
            return self._walked_client(spec, "block", blk, "virtual block device")
        raise UnknownDeviceError(
            f"no PCI device, RDMA device, netdev or block device named {spec!r} "
            f"under {self.sysfs_root}"
        )

    def _rdma_client(self, spec: str, name: str, ib: Path) -> Client:
        # rxe exposes a `parent` attribute naming its netdev; older kernels also parented
        # the rxe device on the NIC, so a PCI `device` link alone does not make it real.
        netdev = None
        for candidate in (ib / "parent", ib / "ports/1/gid_attrs/ndevs/0"):
            try:
                netdev = candidate.read_text().strip() or None
            except OSError:
                continue
            if netdev:
                break
        soft = next((label for pfx, label in _SOFT_RDMA.items() if name.startswith(pfx)), None)
        if soft is None and (ib / "parent").exists():
            soft = _SOFT_RDMA["rxe"]
        if soft is None and not (ib / "device").exists():
            soft = "software RDMA"
        if soft is not None:
            return Client(
                spec, "rdma", None,
                f"{name} is not a PCI device ({soft}); it {NOT_PCI_PHRASE}",
                via=netdev,
            )
        return self._walked_client(spec, "rdma", ib / "device", "virtual RDMA device")

    def _walked_client(self, spec: str, kind: str, start: Path, what: str) -> Client:
        """find_parent_pci_dev(): the nearest PCI function at or above ``start``."""
        if os.path.exists(start):
            for part in reversed(Path(os.path.realpath(start)).parts):
                bdf = normalize_bdf(part)
                if bdf and (self.sysfs_root / "bus/pci/devices" / bdf).exists():
                    return Client(spec, kind, bdf)
        return Client(spec, kind, None, f"{spec} is not a PCI device ({what}); it {NOT_PCI_PHRASE}")

    # - the decision -

    def distance(self, provider_bdf: str, clients: Sequence[str | Client]) -> Decision:
        """pci_p2pdma_distance_many(), evaluating every client so every reason is reported."""
        provider = self.pci_dev(provider_bdf).bdf
        resolved = [c if isinstance(c, Client) else self.resolve_client(c) for c in clients]
        results: list[ClientResult] = []
        reasons: list[str] = []
        if not resolved:
            reasons.append("no clients: the kernel refuses a provider with an empty client list")
        for client in resolved:
            if client.bdf is None:
                result = ClientResult(
                    client, MAP_NOT_SUPPORTED, None, reasons=(client.reason or "",)
                )
            else:
                result = self._pair(provider, client)
            results.append(result)
            reasons.extend(r for r in result.reasons if r not in reasons)
        worst = max(
            (r.map_type for r in results), key=_MAP_RANK.__getitem__, default=MAP_NOT_SUPPORTED
        )
        total = None
        if worst != MAP_NOT_SUPPORTED:
            total = sum(r.distance or 0 for r in results)
        return Decision(
            provider, worst, total, tuple(results), tuple(reasons), self._warnings(results)
        )

    def _warnings(self, results: Iterable[ClientResult]) -> tuple[str, ...]:
        seen: list[str] = []
        for r in results:
            for bdf in r.path:
                dev = self._devs.get(bdf)
                if dev is not None and not dev.config_readable:
                    seen.append(
                        f"{bdf}: config space beyond the 64-byte header is not readable "
                        "(run as root); its ACS redirect bits were assumed clear"
                    )
        return tuple(dict.fromkeys(seen))

    def _pair(self, provider: str, client: Client) -> ClientResult:
        key = (provider, client)
        if key not in self._cache:
            self._cache[key] = self._calc_map_type_and_dist(provider, client)
        return self._cache[key]

    def _calc_map_type_and_dist(self, provider: str, client: Client) -> ClientResult:
        assert client.bdf is not None
        chain_a = self.upstream_chain(provider)
        chain_b = self.upstream_chain(client.bdf)
        b_index = {d.bdf: j for j, d in enumerate(chain_b)}
        common = next(
            ((i, b_index[d.bdf]) for i, d in enumerate(chain_a) if d.bdf in b_index), None
        )
        if common is None:
            # No shared upstream bridge: the kernel's distance is the length of both chains.
            hb_a, hb_b = chain_a[-1].root_bus, chain_b[-1].root_bus
            bridges = (hb_a.name,) if hb_a == hb_b else (hb_a.name, hb_b.name)
            path = tuple(d.bdf for d in chain_a) + bridges + tuple(d.bdf for d in reversed(chain_b))
            distance = len(chain_a) + len(chain_b)
            return self._through_host_bridge(client, chain_a[-1], chain_b[-1], distance, path, ())
        i, j = common
        path = tuple(d.bdf for d in chain_a[: i + 1]) + tuple(d.bdf for d in reversed(chain_b[:j]))
        # The kernel tests ACS on every function it walks on the provider side up to and
        # including the common one, then on the client side below it (endpoints too).
        redirect = tuple(d.bdf for d in chain_a[: i + 1] + chain_b[:j] if d.acs_redirects)
        if not redirect:
            return ClientResult(client, MAP_BUS_ADDR, i + j, path)
        return self._through_host_bridge(client, chain_a[-1], chain_b[-1], i + j, path, redirect)

    def _through_host_bridge(
        self, client: Client, top_a: PciDev, top_b: PciDev, distance: int,
        path: tuple[str, ...], redirect: tuple[str, ...],
    ) -> ClientResult:
        reasons = []
        provider = path[0]
        if redirect:
            reasons.append(
                f"ACS redirect is set on {', '.join(redirect)} between the client {client.name} "
                f"and provider {provider}, so their traffic goes through the host bridge; "
                f"to disable ACS redirect for this path, add the kernel parameter: "
                f"pci=disable_acs_redir={';'.join(redirect)}"
            )
        else:
            reasons.append(
                f"{client.name} and provider {provider} share no upstream bridge; "
                f"their traffic goes through the host bridge"
            )
        refusal = None if self.cpu.supports_p2pdma else self._host_bridge_refusal(top_a, top_b)
        if refusal is None:
            if self.cpu.supports_p2pdma:
                why = f"the CPU ({self.cpu}) is AMD Zen or newer"
            else:
                hbs = dict.fromkeys(self._host_bridge_name(d.root_bus) for d in (top_a, top_b))
                why = "the P2PDMA whitelist has " + " and ".join(hbs)
            reasons.append(f"crossing the host bridge is allowed: {why}")
            return ClientResult(
                client, MAP_THRU_HOST_BRIDGE, distance, path, redirect, tuple(reasons)
            )
        reasons.append(
            f"{refusal}, and the CPU ({self.cpu}) is not AMD Zen or newer: {client.name} "
            f"{NOT_PCI_PHRASE} as the client and provider ({provider}) do not share an "
            f"upstream bridge or whitelisted host bridge"
        )
        return ClientResult(client, MAP_NOT_SUPPORTED, None, path, redirect, tuple(reasons))

    def _host_bridge_refusal(self, top_a: PciDev, top_b: PciDev) -> str | None:
        """host_bridge_whitelist(): None when allowed, else why not."""
        same = top_a.root_bus == top_b.root_bus
        for root_bus in dict.fromkeys((top_a.root_bus, top_b.root_bus)):
            refusal = self._whitelist_refusal(root_bus, same)
            if refusal is not None:
                return refusal
        return None

    def _host_bridge_name(self, root_bus: Path) -> str:
        hb = self.host_bridge(root_bus)
        return f"host bridge {hb.ids} ({hb.bdf})" if hb else f"root bus {root_bus.name}"

    def _whitelist_refusal(self, root_bus: Path, same_host_bridge: bool) -> str | None:
        hb = self.host_bridge(root_bus)
        if hb is None:
            return (
                f"root bus {root_bus.name} has no host bridge at 00.0 and no root port first, "
                "so it cannot be matched against the P2PDMA whitelist"
            )
        for vendor, device, same_only in HOST_BRIDGE_WHITELIST:
            if hb.vendor != vendor or (device is not None and hb.device != device):
                continue
            if same_only and not same_host_bridge:
                return (
                    f"host bridge {hb.ids} ({hb.bdf}) is whitelisted only for devices "
                    "under the same host bridge"
                )
            return None
        return f"host bridge {hb.ids} ({hb.bdf}) is not in the P2PDMA whitelist"

    # - providers -

    def nearest_provider(
        self,
        providers: Iterable[str | P2pmemInfo],
        clients: Sequence[str | Client],
        rng: random.Random | None = None,
    ) -> tuple[str, Decision] | tuple[None, list[str]]:
        """pci_p2pmem_find_many(): the provider at the smallest total distance; among equals
        one at random so load spreads.  Returns (bdf, decision) or (None, reasons)."""
        resolved = [c if isinstance(c, Client) else self.resolve_client(c) for c in clients]
        bdfs = sorted(
            {p.bdf if isinstance(p, P2pmemInfo) else self.pci_dev(p).bdf for p in providers}
        )
        if not bdfs:
            return None, ["no peer-to-peer memory provider is published"]
        best: list[Decision] = []
        refused: list[str] = []
        for bdf in bdfs:
            decision = self.distance(bdf, resolved)
            if decision.distance is None:
                refused.extend(f"provider {bdf}: {r}" for r in decision.reasons)
            elif not best or decision.distance < (best[0].distance or 0):
                best = [decision]
            elif decision.distance == best[0].distance:
                best.append(decision)
        if not best:
            return None, list(dict.fromkeys(refused))
        chosen = best[(rng or random.Random()).randrange(len(best))]
        return chosen.provider, chosen
