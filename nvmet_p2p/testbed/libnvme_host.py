"""The Linux NVMe host through libnvme's Python bindings (Debian python3-nvme, 1.3).

What nvme-cli's `discover`, `connect`, `disconnect` and `list` do, called as a library:
no subprocess and no parsing of its output; controller and namespace names come from
libnvme's own scan of /sys/class/nvme.  Used inside the test VM (as root) by the demo,
the bench and the VM tests; nvme-cli stays where a shell command is the point (the
README's commands, fio-style end-to-end runs).

The host ID.  Linux keeps one host (NQN, ID) pair per NQN and per ID and refuses a
Connect whose ID is already another NQN's (nvmf_host_add(): "found same hostid ... but
different hostnqn", EINVAL).  libnvme 1.3's `nvme.host(root, hostnqn=X)` leaves the ID
unset, so the kernel uses its default host's ID with NQN X and the Connect fails with
"invalid arguments" (that is why an earlier version of this module failed in the VM).
So every connect here names its host ID: the UUID of a `...:uuid:<UUID>` NQN (what
nvme-cli 2.5 and later derive), or a UUID made from the NQN itself, stable across runs.

Who frees what.  The bindings free a host or controller made from Python when that
object is collected, and the root frees its whole tree (hosts, subsystems, controllers)
when it is; a controller, once connected, is also part of the tree.  Two owners of one
controller is a double free (glibc aborts the interpreter).  So there is one root for
the process, as libnvme intends (its own examples call it a singleton), and the hosts
and controllers made here are handed to the tree (`thisown = False`): the tree frees
them at its next refresh_topology().
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from nvmet_p2p.errors import VMError
from nvmet_p2p.wire.limits import NVME_DISC_SUBSYS_NAME

try:
    from libnvme import nvme  # type: ignore[import-not-found]
except ImportError as e:  # the venv sees Debian's packages (tools/setup.sh)
    nvme = None
    IMPORT_ERROR = f"libnvme's Python bindings are missing ({e}); apt install python3-nvme"
else:
    IMPORT_ERROR = ""

UUID_NQN_PREFIX = "nqn.2014-08.org.nvmexpress:uuid:"
HOSTNQN_FILE = Path("/etc/nvme/hostnqn")
HOSTID_FILE = Path("/etc/nvme/hostid")
LIVE_TIMEOUT_S = 60.0  # a Connect over soft-RoCE under TCG can take seconds


def hostid_of(hostnqn: str) -> str:
    """The host ID that goes with `hostnqn` (see the module docstring)."""
    if hostnqn.startswith(UUID_NQN_PREFIX):
        try:
            return str(uuid.UUID(hostnqn[len(UUID_NQN_PREFIX):]))
        except ValueError:
            pass
    return str(uuid.uuid5(uuid.NAMESPACE_URL, hostnqn))


def default_host() -> tuple[str, str]:
    """(hostnqn, hostid) of this machine as nvme-cli takes them: /etc/nvme, else made up."""
    try:
        hostnqn = HOSTNQN_FILE.read_text().strip()
    except OSError:
        hostnqn = ""
    if not hostnqn:
        hostnqn = UUID_NQN_PREFIX + str(uuid.uuid5(uuid.NAMESPACE_DNS, "nvmet-p2p.host"))
    try:
        hostid = HOSTID_FILE.read_text().strip()
    except OSError:
        hostid = ""
    return hostnqn, hostid or hostid_of(hostnqn)


_root_of_process: Any = None


def _root() -> Any:
    """libnvme's root, its topology scanned afresh (see "Who frees what")."""
    global _root_of_process
    if nvme is None:
        raise VMError(IMPORT_ERROR)
    if _root_of_process is None:
        _root_of_process = nvme.root()
    _root_of_process.refresh_topology()
    return _root_of_process


def _tree_owned(obj: Any) -> Any:
    obj.thisown = False  # freed by the root's tree, never by Python (see the docstring)
    return obj


def _chain(first: Any) -> list[Any]:
    """libnvme 1.3 hands out the first object of a list; iterating it walks the rest."""
    return [] if first is None else list(first)


def fabrics_config(*, nr_io_queues: int | None = None, queue_size: int | None = None,
                   ctrl_loss_tmo: int | None = None, digests: bool = False,
                   disable_sqflow: bool = False) -> dict[str, Any]:
    """The `cfg` of ctrl.connect(): nvme-cli's -i, -Q, -l, --hdr-digest --data-digest,
    --disable-sqflow.  Keys left out keep libnvme's (the kernel's) defaults."""
    cfg: dict[str, Any] = {}
    if nr_io_queues is not None:
        cfg["nr_io_queues"] = nr_io_queues
    if queue_size is not None:
        cfg["queue_size"] = queue_size
    if ctrl_loss_tmo is not None:
        cfg["ctrl_loss_tmo"] = ctrl_loss_tmo
    if digests:
        cfg["hdr_digest"] = cfg["data_digest"] = True
    if disable_sqflow:
        cfg["disable_sqflow"] = True
    return cfg


def _host(root: Any, hostnqn: str | None, hostid: str | None) -> Any:
    if hostnqn is None:
        hostnqn, default_id = default_host()
        hostid = hostid or default_id
    return _tree_owned(nvme.host(root, hostnqn=hostnqn, hostid=hostid or hostid_of(hostnqn)))


def connect(subnqn: str, traddr: str, trsvcid: int | str, *, transport: str = "rdma",
            hostnqn: str | None = None, hostid: str | None = None,
            timeout: float = LIVE_TIMEOUT_S, **cfg: Any) -> str:
    """Connect a controller of `subnqn` (nvme-cli's `connect`); its name ("nvme1") once
    it is live.  `cfg`: see fabrics_config."""
    root = _root()
    ctrl = _tree_owned(nvme.ctrl(root, subsysnqn=subnqn, transport=transport,
                                 traddr=traddr, trsvcid=str(trsvcid)))
    try:
        ctrl.connect(_host(root, hostnqn, hostid), fabrics_config(**cfg))
    except Exception as e:  # libnvme raises RuntimeError with the errno's text
        raise VMError(f"libnvme connect {subnqn} at {transport} {traddr}:{trsvcid}: "
                      f"{e}") from e
    name = str(ctrl.name)
    state = Path("/sys/class/nvme") / name / "state"
    deadline = time.monotonic() + timeout
    while _read(state) != "live":
        if time.monotonic() > deadline:
            raise VMError(f"{name} ({subnqn}) not live after {timeout:g} s: "
                          f"state {_read(state) or '?'}")
        time.sleep(0.1)
    return name


def discover(traddr: str, trsvcid: int | str, *, transport: str = "rdma",
             hostnqn: str | None = None, hostid: str | None = None) -> list[dict[str, Any]]:
    """The discovery log page entries (nvme-cli's `discover`): dicts with trtype, adrfam,
    subtype, treq, portid, trsvcid, subnqn, traddr, ..."""
    root = _root()
    ctrl = _tree_owned(nvme.ctrl(root, subsysnqn=NVME_DISC_SUBSYS_NAME, transport=transport,
                                 traddr=traddr, trsvcid=str(trsvcid)))
    try:
        ctrl.connect(_host(root, hostnqn, hostid), {})
    except Exception as e:
        raise VMError(f"libnvme discover at {transport} {traddr}:{trsvcid}: {e}") from e
    try:
        entries = ctrl.discover()
    except Exception as e:
        raise VMError(f"libnvme discover at {transport} {traddr}:{trsvcid}: {e}") from e
    finally:
        ctrl.disconnect()
    return list(entries or [])


def _subsystems(root: Any, subnqn: str) -> list[Any]:
    return [s for h in _chain(root.hosts()) for s in _chain(h.subsystems())
            if s.subsysnqn == subnqn]


def controllers(subnqn: str) -> list[str]:
    """Names of the controllers of `subnqn` (every host NQN), as libnvme scans them."""
    root = _root()
    return sorted({str(c.name) for s in _subsystems(root, subnqn)
                   for c in _chain(s.controllers())})


def namespaces(subnqn: str) -> dict[int, str]:
    """NSID -> block device name ("nvme1n1") of the namespaces of `subnqn`.  With native
    multipath (Debian's default) they hang off the subsystem, else off a controller."""
    root = _root()
    out: dict[int, str] = {}
    for s in _subsystems(root, subnqn):
        for ns in _chain(s.namespaces()):
            out.setdefault(int(ns.nsid), str(ns.name))
        for c in _chain(s.controllers()):
            for ns in _chain(c.namespaces()):
                out.setdefault(int(ns.nsid), str(ns.name))
    return out


def disconnect(subnqn: str, timeout: float = LIVE_TIMEOUT_S) -> int:
    """Disconnect every controller of `subnqn` (nvme-cli's `disconnect -n`); how many
    there were, once they are gone."""
    root = _root()
    ctrls = [c for s in _subsystems(root, subnqn) for c in _chain(s.controllers())]
    for c in ctrls:
        c.disconnect()
    deadline = time.monotonic() + timeout
    while controllers(subnqn):
        if time.monotonic() > deadline:
            raise VMError(f"controllers of {subnqn} still there after {timeout:g} s")
        time.sleep(0.1)
    return len(ctrls)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
