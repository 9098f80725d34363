"""The Linux nvmet configfs tree as Python objects, with nvmetcli-compatible JSON.

Public entry point of the configuration part; the implementation lives in
`nvmet_p2p.config`: `values` (attribute text syntax), `attrs` (attribute tables and
generic access), `tree` (the objects and the kernel's rules), `jsonfile` (nvmetcli JSON,
atomic save).  Attribute groups are the configfs file prefixes ("attr", "addr",
"param", "device", "ana"); files without a prefix (enable, buffered_io, p2pmem) are in
group "".
"""

from nvmet_p2p.config.attrs import (
    AttrSpec,
    attr_choices,
    attr_groups,
    get_attr,
    list_attrs,
    set_attr,
)
from nvmet_p2p.config.tree import (
    Host,
    Namespace,
    Port,
    Referral,
    Root,
    Subsystem,
    TreeHooks,
    lookup,
)
from nvmet_p2p.config.values import check_nqn
from nvmet_p2p.errors import ConfigError

__all__ = [
    "AttrSpec",
    "ConfigError",
    "Host",
    "Namespace",
    "Port",
    "Referral",
    "Root",
    "Subsystem",
    "TreeHooks",
    "attr_choices",
    "attr_groups",
    "check_nqn",
    "get_attr",
    "list_attrs",
    "lookup",
    "set_attr",
]
