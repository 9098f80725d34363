"""The nvmet configfs tree as objects: hosts, subsystems, namespaces, ports, referrals.

One class per configfs directory, attribute names as the kernel spells them, and the
kernel's refusal rules (writes refused while a namespace is enabled or a port has
subsystems linked, a subsystem's identity once a host has identified it,
allow_any_host versus explicit hosts, duplicate links, the discovery NQN).  Changes
that alter live state go through TreeHooks, which the core implements: a hook that
raises ConfigError vetoes the change and the tree stays as it was.  Where the kernel
would leave a dangling link (deleting a host that a subsystem still allows, or a
subsystem a port still exports) the tree refuses instead and says what to remove
first; deleting a subsystem or a port removes its own children (namespaces,
allowed-host links, port links, referrals) as nvmetcli's delete does.

`Root.transaction()` makes a group of changes all or nothing: every change records
how to undo itself while a transaction is open, and any exception (a refusal, a
backend that cannot open, or a bug) undoes them in reverse order before it propagates.
Undo puts back the same objects, so a rolled-back delete leaves nothing changed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import nvmet_p2p
from nvmet_p2p import logfmt
from nvmet_p2p.config import jsonfile
from nvmet_p2p.config.attrs import AttrSpec, Node
from nvmet_p2p.config.shape import CHILD_DIRS
from nvmet_p2p.config.values import (
    ascii_text,
    check_nqn,
    choice,
    int_choice,
    int_range,
    nqn_format_warning,
    parse_bool,
    parse_ieee_oui,
    parse_nguid,
    parse_p2pmem,
    parse_path,
    parse_size,
    parse_uuid,
    parse_version,
    show_bool,
    show_ieee_oui,
    show_int,
    show_size,
    token,
    utf8_size,
)
from nvmet_p2p.errors import ConfigError
from nvmet_p2p.wire.limits import (
    NVME_CNTLID_MAX,
    NVME_CNTLID_MIN,
    NVME_DISC_SUBSYS_NAME,
    NVME_NSID_MAX,
    NVME_RDMA_IP_PORT,
    NVMET_DEFAULT_MAX_QUEUE_SIZE,
    NVMET_FR_MAX_SIZE,
    NVMET_MAX_ANAGRPS,
    NVMET_MAX_NAMESPACES,
    NVMET_MAX_QUEUE_SIZE,
    NVMET_MIN_QUEUE_SIZE,
    NVMET_MN_MAX_SIZE,
    NVMET_NR_QUEUES,
    NVMET_RDMA_DEFAULT_INLINE_DATA_SIZE,
    NVMET_RDMA_MAX_INLINE_DATA_SIZE,
    NVMET_SN_MAX_SIZE,
    NVMET_TCP_DEF_INLINE_DATA_SIZE,
    NVMF_TRADDR_SIZE,
    NVMF_TRSVCID_SIZE,
)

log = logging.getLogger("nvmet_p2p.config")

TRANSPORT_DEFAULT = -1  # param value meaning "let the transport choose", as in the kernel

FIRMWARE = getattr(nvmet_p2p, "__version__", "0.1.0")[:NVMET_FR_MAX_SIZE]
BOOL_CHOICES = ("0", "1")
TRTYPES = ("rdma", "tcp", "loop")
ADRFAMS = ("ipv4", "ipv6", "ib", "fc", "loop")
TREQS = ("not specified", "required", "not required")
BACKENDS = ("auto", "file", "bdev", "memory", "vfio-nvme")
# tsas is derived from trtype: nvmet-p2p supports RDMA connected QPs and plain TCP only.
_TSAS_FOR = {"rdma": "connected", "tcp": "none", "loop": "", "": ""}


def _bool(group: str, name: str, default: bool = False, *, refuse_true: str = "",
          extension: bool = False) -> AttrSpec:
    parse = parse_bool
    if refuse_true:
        def parse(value: Any) -> bool:
            if parse_bool(value):
                raise ConfigError(refuse_true)
            return False
    return AttrSpec(group, name, parse, show_bool, default, BOOL_CHOICES, extension)


class TreeHooks:
    """What the core implements to follow the tree; every default does nothing.

    Hooks named for an action that can fail (ns_enable, port_add_subsys) may raise
    ConfigError to veto it; the tree commits the change only after they return.
    """

    def ns_enable(self, subsys: Subsystem, ns: Namespace) -> None: ...
    def ns_disable(self, subsys: Subsystem, ns: Namespace) -> None: ...
    def port_add_subsys(self, port: Port, subsys: Subsystem) -> None: ...
    def port_remove_subsys(self, port: Port, subsys: Subsystem) -> None: ...
    def subsys_hosts_changed(self, subsys: Subsystem) -> None: ...
    def port_changed(self, port: Port) -> None: ...
    def subsys_queues_changed(self, subsys: Subsystem) -> None: ...
    def discovery_changed(self) -> None: ...


class Host(Node):
    KIND = "host"
    ATTRS = ()  # DH-HMAC-CHAP keys (dhchap_*) are not supported

    def __init__(self, root: Root, nqn: str) -> None:
        super().__init__(root)
        self._nqn = nqn

    @property
    def nqn(self) -> str:
        return self._nqn

    def describe(self) -> str:
        return f"host {self._nqn}"


class Namespace(Node):
    KIND = "namespace"
    ATTRS = (
        AttrSpec("device", "path", parse_path, str, ""),
        AttrSpec("device", "uuid", parse_uuid, str, lambda: str(uuidlib.uuid4())),
        AttrSpec("device", "nguid", parse_nguid, str, str(uuidlib.UUID(int=0))),
        AttrSpec("device", "backend", choice(BACKENDS), str, "auto", BACKENDS, True),
        AttrSpec("device", "size", parse_size, show_size, None, None, True),
        AttrSpec("device", "block_size", int_choice((512, 4096)), show_int, 512,
                 ("512", "4096"), True),
        _bool("device", "create", extension=True),
        AttrSpec("ana", "grpid", int_range(1, NVMET_MAX_ANAGRPS), show_int, 1),
        _bool("", "enable"),
        _bool("", "buffered_io"),
        AttrSpec("", "p2pmem", parse_p2pmem, str, "1", ("0", "1")),
    )

    def __init__(self, root: Root, subsys: Subsystem, nsid: int) -> None:
        super().__init__(root)
        self._subsys = subsys
        self._nsid = nsid

    @property
    def nsid(self) -> int:
        return self._nsid

    @property
    def subsys(self) -> Subsystem:
        return self._subsys

    def describe(self) -> str:
        return f"namespace {self._nsid} of {self._subsys.nqn}"

    def _check_writable(self, spec: AttrSpec) -> None:
        # The kernel answers EBUSY (EINVAL for buffered_io) while the namespace is enabled.
        if spec.name != "enable" and self._values["enable"]:
            raise ConfigError(f"{self.describe()} is enabled, so {spec.pyname} cannot change; "
                              "disable the namespace first (enable 0)")

    def _apply(self, spec: AttrSpec, old: Any, new: Any) -> None:
        if spec.name != "enable":
            self._values[spec.pyname] = new
            return
        hooks = self._root.hooks
        if new:
            self._check_enable()
            enabled = self._subsys._nr_enabled
            if enabled >= NVMET_MAX_NAMESPACES:  # nvmet_ns_enable() answers -EMFILE
                raise ConfigError(f"cannot enable {self.describe()}: "
                                  f"{self._subsys.describe()} already has {enabled} enabled "
                                  f"namespaces, the most a subsystem can have "
                                  f"(NVMET_MAX_NAMESPACES); disable one first")
            hooks.ns_enable(self._subsys, self)  # may veto by raising
            self._values["enable"] = True
            self._subsys._nr_enabled += 1
        else:
            self._values["enable"] = False
            self._subsys._nr_enabled -= 1
            hooks.ns_disable(self._subsys, self)

    def _check_enable(self) -> None:
        v = self._values
        if v["device_backend"] != "memory" and not v["device_path"]:
            raise ConfigError(f"cannot enable {self.describe()}: device_path is empty; set "
                              "device_path to a file or block device first")
        needs_size = v["device_backend"] == "memory" or v["device_create"]
        if needs_size and v["device_size"] is None:
            why = "device_create" if v["device_create"] else "a memory backend"
            raise ConfigError(f"cannot enable {self.describe()}: {why} needs device_size; "
                              "set device_size (e.g. 64M) first")
        size, bs = v["device_size"], v["device_block_size"]
        if size is not None and size % bs:
            raise ConfigError(f"cannot enable {self.describe()}: device_size {size} is not a "
                              f"multiple of device_block_size {bs}; round it")


# What Identify Controller (and the VS property) report of a subsystem.  As the kernel's
# subsys_discovered: once a host has identified a controller these stay as it read them.
IDENTITY_ATTRS = ("attr_firmware", "attr_ieee_oui", "attr_model", "attr_serial",
                  "attr_version")


class Subsystem(Node):
    KIND = "subsystem"
    ATTRS = (
        _bool("attr", "allow_any_host"),
        AttrSpec("attr", "cntlid_max", int_range(NVME_CNTLID_MIN, NVME_CNTLID_MAX), show_int,
                 NVME_CNTLID_MAX),
        AttrSpec("attr", "cntlid_min", int_range(NVME_CNTLID_MIN, NVME_CNTLID_MAX), show_int,
                 NVME_CNTLID_MIN),
        AttrSpec("attr", "firmware", ascii_text(NVMET_FR_MAX_SIZE, what="firmware revision"),
                 str, FIRMWARE),
        AttrSpec("attr", "ieee_oui", parse_ieee_oui, show_ieee_oui, 0),
        AttrSpec("attr", "model", ascii_text(NVMET_MN_MAX_SIZE, what="model number"), str,
                 "nvmet-p2p"),
        _bool("attr", "pi_enable", refuse_true="protection information is not supported "
              "by nvmet-p2p; set pi_enable to 0"),
        AttrSpec("attr", "qid_max", int_range(1, NVMET_NR_QUEUES), show_int, NVMET_NR_QUEUES),
        # The kernel's default serial is a random 64-bit number in hex; saving keeps it.
        AttrSpec("attr", "serial", ascii_text(NVMET_SN_MAX_SIZE, what="serial number"), str,
                 lambda: secrets.token_hex(8)),
        AttrSpec("attr", "version", parse_version, str, "1.3"),
    )

    def __init__(self, root: Root, nqn: str) -> None:
        super().__init__(root)
        self._nqn = nqn
        self._namespaces: dict[int, Namespace] = {}
        self._allowed_hosts: list[str] = []
        self._discovered = False
        self._nr_enabled = 0  # enabled namespaces, as the kernel's nr_namespaces

    @property
    def nqn(self) -> str:
        return self._nqn

    @property
    def namespaces(self) -> Mapping[int, Namespace]:
        return MappingProxyType(self._namespaces)

    @property
    def allowed_hosts(self) -> list[str]:
        return list(self._allowed_hosts)

    @property
    def discovered(self) -> bool:
        """A host has identified a controller of this subsystem: its identity is fixed."""
        return self._discovered

    def mark_discovered(self) -> None:
        """The core calls this on Identify Controller; only deleting the subsystem undoes it
        (a host that cached the serial must not meet another one under the same NQN)."""
        self._discovered = True

    def describe(self) -> str:
        return f"subsystem {self._nqn}"

    def _check_writable(self, spec: AttrSpec) -> None:
        # The kernel answers EINVAL once subsys_discovered is set.
        if self._discovered and spec.pyname in IDENTITY_ATTRS:
            known = spec.show(self._values[spec.pyname])
            raise ConfigError(f"{self.describe()} has been identified by a host, so "
                              f"{spec.pyname} cannot change (hosts know it as {known!r}); "
                              "delete and re-create the subsystem to change it")

    def _apply(self, spec: AttrSpec, old: Any, new: Any) -> None:
        v = self._values
        if spec.name == "cntlid_min" and new > v["attr_cntlid_max"]:
            raise ConfigError(f"{self.describe()}: cntlid_min {new} is above cntlid_max "
                              f"{v['attr_cntlid_max']}; raise cntlid_max first")
        if spec.name == "cntlid_max" and new < v["attr_cntlid_min"]:
            raise ConfigError(f"{self.describe()}: cntlid_max {new} is below cntlid_min "
                              f"{v['attr_cntlid_min']}; lower cntlid_min first")
        if spec.name == "allow_any_host" and new and self._allowed_hosts:
            raise ConfigError(f"{self.describe()}: cannot set allow_any_host while explicit "
                              f"hosts are allowed ({', '.join(self._allowed_hosts)}); remove "
                              "them from allowed_hosts first")
        v[spec.pyname] = new
        if spec.name == "allow_any_host":
            self._root.hooks.subsys_hosts_changed(self)
            self._root.hooks.discovery_changed()
        elif spec.name == "qid_max":
            self._root.hooks.subsys_queues_changed(self)

    def create_namespace(self, nsid: int) -> Namespace:
        self._check_live()
        if isinstance(nsid, bool) or not isinstance(nsid, int):
            raise ConfigError(f"NSID must be an integer 1..{NVME_NSID_MAX}, not {nsid!r}")
        if not 1 <= nsid <= NVME_NSID_MAX:
            raise ConfigError(f"NSID {nsid} is invalid: use 1..{NVME_NSID_MAX} (0 and "
                              "0xffffffff are reserved)")
        if nsid in self._namespaces:
            raise ConfigError(f"{self.describe()} already has namespace {nsid}; pick another "
                              "NSID or delete the existing one")
        ns = Namespace(self._root, self, nsid)
        self._namespaces[nsid] = ns
        self._root.record(lambda: _forget(self._namespaces, nsid, ns))
        return ns

    def delete_namespace(self, nsid: int) -> None:
        self._check_live()
        ns = self._namespaces.get(nsid)
        if ns is None:
            raise ConfigError(f"{self.describe()} has no namespace {nsid}; existing: "
                              f"{_listing(self._namespaces)}")
        if ns.enable:
            ns.enable = False  # configfs rmdir disables the namespace first
        self._root.record(_restore_later(self._namespaces, nsid, ns))
        _forget(self._namespaces, nsid, ns)

    def add_allowed_host(self, nqn: str) -> None:
        self._check_live()
        if nqn not in self._root._hosts:
            raise ConfigError(f"no host {nqn} exists; create it under /hosts first, then add "
                              f"it to {self.describe()}")
        if self._values["attr_allow_any_host"]:
            raise ConfigError(f"{self.describe()} allows any host; set allow_any_host to 0 "
                              "before listing hosts")
        if nqn in self._allowed_hosts:
            raise ConfigError(f"host {nqn} is already allowed by {self.describe()}")
        self._allowed_hosts.append(nqn)
        self._root.record(lambda: self.remove_allowed_host(nqn))
        self._root.hooks.subsys_hosts_changed(self)
        self._root.hooks.discovery_changed()

    def remove_allowed_host(self, nqn: str) -> None:
        self._check_live()
        if nqn not in self._allowed_hosts:
            raise ConfigError(f"host {nqn} is not in the allowed_hosts of {self.describe()}; "
                              f"allowed: {', '.join(self._allowed_hosts) or '(none)'}")
        index = self._allowed_hosts.index(nqn)
        self._allowed_hosts.remove(nqn)
        self._root.record(lambda: self._insert_allowed_host(index, nqn))
        self._root.hooks.subsys_hosts_changed(self)
        self._root.hooks.discovery_changed()

    def _insert_allowed_host(self, index: int, nqn: str) -> None:
        self._allowed_hosts.insert(index, nqn)
        self._root.hooks.subsys_hosts_changed(self)
        self._root.hooks.discovery_changed()

    def allows_host(self, hostnqn: str) -> bool:
        return bool(self._values["attr_allow_any_host"]) or hostnqn in self._allowed_hosts


class _Address(Node):
    """The addr_* group shared by ports and referrals (nvmet_port in the kernel)."""

    def _get(self, spec: AttrSpec) -> Any:
        trtype = self._values["addr_trtype"]
        if spec.pyname == "addr_tsas":
            return _TSAS_FOR.get(trtype, "")
        return self._values[spec.pyname]

    def _apply(self, spec: AttrSpec, old: Any, new: Any) -> None:
        if spec.pyname == "addr_tsas":
            trtype = self._values["addr_trtype"]
            want = _TSAS_FOR.get(trtype, "")
            if new != want:
                raise ConfigError(f"{self.describe()}: tsas {new!r} is not supported with "
                                  f"trtype {trtype!r}; nvmet-p2p offers only {want!r}")
            return
        self._values[spec.pyname] = new


def _addr_specs(trtypes: tuple[str, ...]) -> tuple[AttrSpec, ...]:
    refused = {t: "is not a transport nvmet-p2p serves; use rdma, tcp or loop"
               for t in ("fc", "pci") if t not in trtypes}
    return (
        AttrSpec("addr", "adrfam", choice(("",) + ADRFAMS), str, "", ADRFAMS),
        AttrSpec("addr", "traddr", token(NVMF_TRADDR_SIZE - 1, what="traddr"), str, ""),
        AttrSpec("addr", "treq", choice(TREQS), str, "not specified", TREQS),
        AttrSpec("addr", "trsvcid", token(NVMF_TRSVCID_SIZE - 1, what="trsvcid"), str, ""),
        AttrSpec("addr", "trtype", choice(("",) + trtypes, refused), str, "", trtypes),
    )


class Referral(_Address):
    KIND = "referral"
    ATTRS = (
        *_addr_specs(TRTYPES + ("fc",)),  # a referral may point at any fabric
        AttrSpec("addr", "portid", int_range(0, 0xFFFF), show_int, 0),
        _bool("", "enable"),
    )

    def __init__(self, root: Root, port: Port, name: str) -> None:
        super().__init__(root)
        self._port = port
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    @property
    def port(self) -> Port:
        return self._port

    @property
    def portid(self) -> int:
        return self._values["addr_portid"]

    @portid.setter
    def portid(self, value: Any) -> None:
        self.addr_portid = value

    def describe(self) -> str:
        return f"referral {self._name} of port {self._port.portid}"

    def _check_writable(self, spec: AttrSpec) -> None:
        if spec.name != "enable" and self._values["enable"]:
            raise ConfigError(f"{self.describe()} is enabled, so {spec.pyname} cannot change; "
                              "disable the referral first (enable 0)")

    def _apply(self, spec: AttrSpec, old: Any, new: Any) -> None:
        super()._apply(spec, old, new)
        if spec.name == "enable":
            self._root.hooks.discovery_changed()


class Port(_Address):
    KIND = "port"
    ATTRS = (
        *_addr_specs(TRTYPES),
        AttrSpec("addr", "tsas", choice(("", "connected", "none"),
                                        {"tls1.3": "is not supported by nvmet-p2p (no TLS); "
                                                   "use none",
                                         "datagram": "is not supported; use connected"}),
                 str, "", ("connected", "none")),
        AttrSpec("param", "inline_data_size",
                 int_range(0, NVMET_RDMA_MAX_INLINE_DATA_SIZE, also=(TRANSPORT_DEFAULT,),
                           why=" (-1: transport default)"), show_int, NVMET_RDMA_DEFAULT_INLINE_DATA_SIZE),
        AttrSpec("param", "max_queue_size",
                 int_range(NVMET_MIN_QUEUE_SIZE, NVMET_MAX_QUEUE_SIZE,
                           also=(TRANSPORT_DEFAULT,), why=" (-1: transport default)"),
                 show_int, NVMET_DEFAULT_MAX_QUEUE_SIZE),
        _bool("param", "pi_enable", refuse_true="protection information is not supported by "
              "nvmet-p2p; set pi_enable to 0"),
        # The 2018 P2P series' per-port gate; see DESIGN.md "P2P knobs".
        _bool("attr", "allow_p2pmem", extension=True),
    )

    def __init__(self, root: Root, portid: int) -> None:
        super().__init__(root)
        self._portid = portid
        self._subsystems: list[str] = []
        self._referrals: dict[str, Referral] = {}

    @property
    def portid(self) -> int:
        return self._portid

    @property
    def subsystems(self) -> list[str]:
        return list(self._subsystems)

    @property
    def referrals(self) -> Mapping[str, Referral]:
        return MappingProxyType(self._referrals)

    def describe(self) -> str:
        return f"port {self._portid}"

    def _get(self, spec: AttrSpec) -> Any:
        value = super()._get(spec)
        # The kernel leaves trsvcid empty; the NVMe-oF port is the only sensible default.
        if spec.pyname == "addr_trsvcid" and not value and \
                self._values["addr_trtype"] in ("rdma", "tcp"):
            return str(NVME_RDMA_IP_PORT)
        return value

    def resolved_inline_data_size(self) -> int:
        """param_inline_data_size with -1 ("transport default") resolved."""
        size = self._values["param_inline_data_size"]
        if size != TRANSPORT_DEFAULT:
            return size
        if self._values["addr_trtype"] == "tcp":
            return NVMET_TCP_DEF_INLINE_DATA_SIZE
        return NVMET_RDMA_DEFAULT_INLINE_DATA_SIZE

    def resolved_max_queue_size(self) -> int:
        """param_max_queue_size with -1 ("transport default") resolved."""
        size = self._values["param_max_queue_size"]
        return NVMET_DEFAULT_MAX_QUEUE_SIZE if size == TRANSPORT_DEFAULT else size

    def _check_writable(self, spec: AttrSpec) -> None:
        # A port with linked subsystems is enabled: the kernel answers EACCES.
        # allow_p2pmem only affects controllers created later, so it stays writable.
        if spec.group in ("addr", "param") and self._subsystems:
            raise ConfigError(f"{self.describe()} is enabled (subsystems linked: "
                              f"{', '.join(self._subsystems)}), so {spec.pyname} cannot "
                              "change; unlink its subsystems first")

    def _apply(self, spec: AttrSpec, old: Any, new: Any) -> None:
        super()._apply(spec, old, new)
        self._root.hooks.port_changed(self)

    def _check_enable(self) -> None:
        """What nvmet_enable_port() would reject, checked before the first link."""
        v = self._values
        trtype = v["addr_trtype"]
        if not trtype:
            raise ConfigError(f"cannot enable {self.describe()}: addr_trtype is not set; set "
                              "it to rdma, tcp or loop first")
        if trtype == "loop":
            return
        adrfam, traddr = v["addr_adrfam"], v["addr_traddr"]
        allowed = ("ipv4", "ipv6", "ib") if trtype == "rdma" else ("ipv4", "ipv6")
        if adrfam not in allowed:
            raise ConfigError(f"cannot enable {self.describe()}: addr_adrfam {adrfam!r} does not "
                              f"suit {trtype}; set it to {' or '.join(allowed)}")
        if adrfam in ("ipv4", "ipv6"):
            try:
                ip = ipaddress.ip_address(traddr)
            except ValueError:
                raise ConfigError(f"cannot enable {self.describe()}: addr_traddr {traddr!r} is "
                                  f"not an {adrfam} address; set it (0.0.0.0 or :: listens on "
                                  "all)") from None
            if ip.version != (4 if adrfam == "ipv4" else 6):
                raise ConfigError(f"cannot enable {self.describe()}: addr_traddr {traddr} is "
                                  f"not {adrfam}; fix addr_adrfam or addr_traddr")
        svc = self.addr_trsvcid
        if not (svc.isascii() and svc.isdigit()) or not 1 <= int(svc) <= 0xFFFF:
            raise ConfigError(f"cannot enable {self.describe()}: addr_trsvcid {svc!r} is not "
                              "a port number; set it, e.g. 4420")

    def link_subsystem(self, nqn: str) -> None:
        self._check_live()
        subsys = self._root._subsystems.get(nqn)
        if subsys is None:
            raise ConfigError(f"no subsystem {nqn} exists; create it before linking it to "
                              f"{self.describe()}")
        if nqn in self._subsystems:
            raise ConfigError(f"subsystem {nqn} is already linked to {self.describe()}")
        if not self._subsystems:
            self._check_enable()
        self._root.hooks.port_add_subsys(self, subsys)  # may veto by raising
        self._subsystems.append(nqn)
        self._root.record(lambda: self.unlink_subsystem(nqn))
        self._root.hooks.discovery_changed()

    def unlink_subsystem(self, nqn: str) -> None:
        self._check_live()
        if nqn not in self._subsystems:
            raise ConfigError(f"subsystem {nqn} is not linked to {self.describe()}; linked: "
                              f"{', '.join(self._subsystems) or '(none)'}")
        index = self._subsystems.index(nqn)
        self._subsystems.remove(nqn)
        self._root.record(lambda: self._relink(index, nqn))
        self._root.hooks.port_remove_subsys(self, self._root._subsystems[nqn])
        self._root.hooks.discovery_changed()

    def _relink(self, index: int, nqn: str) -> None:
        self._root.hooks.port_add_subsys(self, self._root._subsystems[nqn])
        self._subsystems.insert(index, nqn)
        self._root.hooks.discovery_changed()

    def create_referral(self, name: str) -> Referral:
        self._check_live()
        if not isinstance(name, str) or not name or "/" in name or \
                any(c.isspace() for c in name) or len(name) > 255:
            raise ConfigError(f"referral name {name!r} is invalid: use a non-empty word "
                              "without '/' or spaces")
        if name in self._referrals:
            raise ConfigError(f"{self.describe()} already has a referral {name}; pick another "
                              "name or delete it")
        utf8_size(name, "referral name")
        ref = Referral(self._root, self, name)
        self._referrals[name] = ref
        self._root.record(lambda: _forget(self._referrals, name, ref))
        return ref

    def delete_referral(self, name: str) -> None:
        self._check_live()
        ref = self._referrals.get(name)
        if ref is None:
            raise ConfigError(f"{self.describe()} has no referral {name}; existing: "
                              f"{_listing(self._referrals)}")
        if ref.enable:
            ref.enable = False  # the kernel's disconnect_notify disables it first
        self._root.record(_restore_later(self._referrals, name, ref))
        _forget(self._referrals, name, ref)


class Root:
    """The whole tree: /sys/kernel/config/nvmet as objects."""

    def __init__(self, hooks: TreeHooks | None = None) -> None:
        self.hooks: TreeHooks = hooks if hooks is not None else TreeHooks()
        self._hosts: dict[str, Host] = {}
        self._subsystems: dict[str, Subsystem] = {}
        self._ports: dict[int, Port] = {}
        self._journal: list[Callable[[], None]] | None = None  # undo steps, in a transaction

    # -- transactions ----------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing: on any exception every change made inside is undone.

        A transaction inside another one joins it (the outer one decides).  The undo
        steps go through the hooks, so live state (backends, listeners, controllers)
        follows the tree back.
        """
        if self._journal is not None:
            yield
            return
        self._journal = []
        try:
            yield
        except BaseException:
            journal, self._journal = self._journal, None
            for undo in reversed(journal):
                try:
                    undo()
                except Exception:  # keep going: every other step still goes back
                    log.exception("%s", logfmt.line("event", "undo_failed", {
                        "reason": "undoing a change failed"}))
            raise
        self._journal = None

    def record(self, undo: Callable[[], None]) -> None:
        """Called by the tree for each change: how to undo it, if a transaction is open."""
        if self._journal is not None:
            self._journal.append(undo)

    def warnings(self) -> list[str]:
        """What is accepted but worth a look: NQNs off the NVMe naming format."""
        out = []
        for kind, names in (("host", self._hosts), ("subsystem", self._subsystems)):
            for nqn in names:
                why = nqn_format_warning(nqn)
                if why is not None:
                    out.append(f"{kind} {why}")
        return out

    @property
    def hosts(self) -> Mapping[str, Host]:
        return MappingProxyType(self._hosts)

    @property
    def subsystems(self) -> Mapping[str, Subsystem]:
        return MappingProxyType(self._subsystems)

    @property
    def ports(self) -> Mapping[int, Port]:
        return MappingProxyType(self._ports)

    def is_empty(self) -> bool:
        return not (self._hosts or self._subsystems or self._ports)

    def create_host(self, nqn: str) -> Host:
        check_nqn(nqn, "host NQN")
        if nqn in self._hosts:
            raise ConfigError(f"host {nqn} already exists")
        host = Host(self, nqn)
        self._hosts[nqn] = host
        self.record(lambda: _forget(self._hosts, nqn, host))
        _warn_nqn("host", nqn)
        return host

    def delete_host(self, nqn: str) -> None:
        if nqn not in self._hosts:
            raise ConfigError(f"no host {nqn}; existing: {_listing(self._hosts)}")
        users = [s.nqn for s in self._subsystems.values() if nqn in s._allowed_hosts]
        if users:
            raise ConfigError(f"host {nqn} is still allowed by {', '.join(users)}; remove it "
                              "from their allowed_hosts first")
        host = self._hosts[nqn]
        self.record(_restore_later(self._hosts, nqn, host))
        _forget(self._hosts, nqn, host)

    def create_subsystem(self, nqn: str) -> Subsystem:
        if nqn == NVME_DISC_SUBSYS_NAME:
            raise ConfigError(f"{nqn} is the discovery subsystem, which always exists and "
                              "cannot be created; pick another NQN")
        check_nqn(nqn, "subsystem NQN")
        if nqn in self._subsystems:
            raise ConfigError(f"subsystem {nqn} already exists")
        subsys = Subsystem(self, nqn)
        self._subsystems[nqn] = subsys
        self.record(lambda: _forget(self._subsystems, nqn, subsys))
        _warn_nqn("subsystem", nqn)
        return subsys

    def delete_subsystem(self, nqn: str) -> None:
        subsys = self._subsystems.get(nqn)
        if subsys is None:
            raise ConfigError(f"no subsystem {nqn}; existing: {_listing(self._subsystems)}")
        ports = [str(p.portid) for p in self._ports.values() if nqn in p._subsystems]
        if ports:
            raise ConfigError(f"subsystem {nqn} is linked to port {', '.join(ports)}; unlink it "
                              "from those ports first")
        for nsid in list(subsys._namespaces):
            subsys.delete_namespace(nsid)
        for host in list(subsys._allowed_hosts):
            subsys.remove_allowed_host(host)
        self.record(_restore_later(self._subsystems, nqn, subsys))
        _forget(self._subsystems, nqn, subsys)

    def create_port(self, portid: int) -> Port:
        if isinstance(portid, bool) or not isinstance(portid, int) or \
                not 0 <= portid <= 0xFFFF:
            raise ConfigError(f"port id {portid!r} is invalid: use an integer 0..65535")
        if portid in self._ports:
            raise ConfigError(f"port {portid} already exists; pick another port id")
        port = Port(self, portid)
        self._ports[portid] = port
        self.record(lambda: _forget(self._ports, portid, port))
        return port

    def delete_port(self, portid: int) -> None:
        port = self._ports.get(portid)
        if port is None:
            raise ConfigError(f"no port {portid}; existing: {_listing(self._ports)}")
        for nqn in list(port._subsystems):
            port.unlink_subsystem(nqn)
        for name in list(port._referrals):
            port.delete_referral(name)
        self.record(_restore_later(self._ports, portid, port))
        _forget(self._ports, portid, port)

    def clear(self) -> None:
        """Tear everything down in reverse dependency order, calling the hooks."""
        for portid in list(self._ports):
            self.delete_port(portid)
        for nqn in list(self._subsystems):
            self.delete_subsystem(nqn)
        for nqn in list(self._hosts):
            self.delete_host(nqn)

    # -- JSON ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return jsonfile.dump_root(self)

    def restore(self, doc: dict, *, source: str = "<dict>",
                on_error: Callable[[str], None] | None = None) -> list[str]:
        return jsonfile.restore_root(self, doc, source=source, on_error=on_error)

    def save(self, path: str | os.PathLike) -> None:
        jsonfile.save_doc(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, hooks: TreeHooks | None = None) -> Root:
        root = cls(hooks)
        doc = jsonfile.read_doc(path)
        with root.transaction():  # nothing half-configured stays live
            root.restore(doc, source=str(path))
        return root


def lookup(root: Root, path: str) -> Any:
    """Resolve a configfs-style path such as /subsystems/<nqn>/namespaces/1.

    Directories of objects (/hosts, /subsystems/<nqn>/namespaces, ...) resolve to a
    read-only mapping of their children; everything else to the tree object.
    """
    node: Any = root
    walked = ""
    for part in (p for p in path.split("/") if p):
        children = _children(node)
        if children is None or part not in children:
            there = ", ".join(children) if children else "(nothing)"
            raise ConfigError(f"{path} does not exist: no {part!r} under {walked or '/'}; "
                              f"there: {there}")
        node = children[part]
        walked += "/" + part
    return node


def _children(node: Any) -> dict[str, Any] | None:
    if isinstance(node, Mapping):
        return {str(k): v for k, v in node.items()}
    kind = "root" if isinstance(node, Root) else getattr(node, "KIND", "")
    names = CHILD_DIRS.get(kind)
    if names is None:
        return None
    out = {}
    for name in names:
        value = getattr(node, name)
        if isinstance(value, list):  # a directory of links: names of objects elsewhere
            pool = node._root.hosts if name == "allowed_hosts" else node._root.subsystems
            value = MappingProxyType({n: pool[n] for n in value})
        out[name] = value
    return out


def _forget(children: dict[Any, Any], key: Any, obj: Node) -> None:
    del children[key]
    obj._deleted = True


def _restore_later(children: dict[Any, Any], key: Any, obj: Node) -> Callable[[], None]:
    """The undo of deleting `obj`: the same object back at its place in `children`."""
    index = list(children).index(key)

    def undo() -> None:
        items = list(children.items())
        items.insert(index, (key, obj))
        children.clear()
        children.update(items)
        obj._deleted = False
    return undo


def _warn_nqn(kind: str, nqn: str) -> None:
    why = nqn_format_warning(nqn)
    if why is not None:
        logfmt.warning(log, "nqn_off_format", kind=kind, nqn=nqn,
                       reason=f"{why} (accepted, as the kernel target does)")


def _listing(d: Mapping[Any, Any]) -> str:
    return ", ".join(str(k) for k in d) or "(none)"
