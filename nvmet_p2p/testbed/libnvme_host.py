"""The Linux NVMe host through libnvme's Python bindings (Debian python3-nvme).

What nvme-cli's `discover`, `connect` and `disconnect` do, called as a library: no
subprocess and no parsing of its output, and the controller and namespace names come
from libnvme's own view of /sys/class/nvme.  Used inside the test VM (as root);
nvme-cli stays where a shell command is the point (fio-style end-to-end use).
"""

from __future__ import annotations

from typing import Any

from nvmet_p2p.errors import VMError

try:
    from libnvme import nvme  # type: ignore[import-not-found]
except ImportError as e:  # the venv sees Debian's packages (tools/setup.sh)
    nvme = None
    IMPORT_ERROR = f"libnvme's Python bindings are missing ({e}); apt install python3-nvme"
else:
    IMPORT_ERROR = ""

DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"


def _root() -> Any:
    if nvme is None:
        raise VMError(IMPORT_ERROR)
    root = nvme.root()
    root.refresh_topology()
    return root


def _host(root: Any, hostnqn: str | None) -> Any:
    return nvme.host(root, hostnqn=hostnqn) if hostnqn else nvme.host(root)


def connect(subnqn: str, traddr: str, trsvcid: int | str, *, transport: str = "rdma",
            hostnqn: str | None = None, nr_io_queues: int | None = None) -> str:
    """Connect a controller of `subnqn`; its name (e.g. "nvme1")."""
    root = _root()
    ctrl = nvme.ctrl(root, subsysnqn=subnqn, transport=transport, traddr=traddr,
                     trsvcid=str(trsvcid))
    cfg: dict[str, Any] = {}
    if nr_io_queues is not None:
        cfg["nr_io_queues"] = nr_io_queues
    try:
        ctrl.connect(_host(root, hostnqn), cfg)
    except Exception as e:  # libnvme raises plain Exceptions with errno text
        raise VMError(f"libnvme connect {subnqn} at {traddr}:{trsvcid}: {e}") from e
    return str(ctrl.name)


def discover(traddr: str, trsvcid: int | str, *, transport: str = "rdma",
             hostnqn: str | None = None) -> list[dict[str, Any]]:
    """The discovery log page entries of the target at traddr:trsvcid."""
    root = _root()
    ctrl = nvme.ctrl(root, subsysnqn=DISCOVERY_NQN, transport=transport, traddr=traddr,
                     trsvcid=str(trsvcid))
    try:
        ctrl.connect(_host(root, hostnqn), {})
    except Exception as e:
        raise VMError(f"libnvme discover at {traddr}:{trsvcid}: {e}") from e
    try:
        entries = ctrl.discover()
    finally:
        ctrl.disconnect()
    return list(entries or [])


def controllers(subnqn: str) -> list[Any]:
    """libnvme's controllers of `subnqn` (every host entry)."""
    root = _root()
    out = []
    for host in root.hosts() or []:
        for subsys in host.subsystems() or []:
            if subsys.subsysnqn == subnqn:
                out.extend(subsys.controllers() or [])
    return out


def namespaces(subnqn: str) -> dict[int, str]:
    """NSID -> block device name ("nvme1n1") of every namespace the host sees."""
    out: dict[int, str] = {}
    for ctrl in controllers(subnqn):
        for ns in ctrl.namespaces() or []:
            out[int(ns.nsid)] = str(ns.name)
    root = _root()
    for host in root.hosts() or []:  # multipath: namespaces hang off the subsystem
        for subsys in host.subsystems() or []:
            if subsys.subsysnqn == subnqn:
                for ns in subsys.namespaces() or []:
                    out.setdefault(int(ns.nsid), str(ns.name))
    return out


def disconnect(subnqn: str) -> int:
    """Disconnect every controller of `subnqn`; how many there were."""
    ctrls = controllers(subnqn)
    for ctrl in ctrls:
        ctrl.disconnect()
    return len(ctrls)
