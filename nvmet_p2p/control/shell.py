"""`targetcli-ext`: a configshell-fb shell over the control socket.

The shell is an adapter.  Every node asks the daemon (`list`, `get`, `status`) each time
it is shown, completed or changed, and every change is one RPC; nothing is cached, so
two shells and a script can work on one target at the same time.

Tree and groups mirror the kernel's configfs tree.  Attribute groups are the configfs
file prefixes (attr, addr, param, device, ana); the files without a prefix (namespace
enable / buffered_io / p2pmem, referral enable) are the group `attr` here, since those
objects have no `attr_` files of their own.  Ports keep their `attr` group
(allow_p2pmem).  `global` is the shell's own preferences group, as in targetcli,
including targetcli's `auto_save_on_exit` (default true): leaving the interactive shell
saves the configuration to the daemon's file (by default /etc/nvmet-p2p/config.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from typing import Any, ClassVar

from configshell_fb import (  # type: ignore[import-untyped]
    ConfigNode,
    ConfigShell,
    Console,
    ExecutionError,
)

import nvmet_p2p
from nvmet_p2p.config.values import nqn_format_warning
from nvmet_p2p.control.defaults import DEFAULT_RPC_SOCKET
from nvmet_p2p.control.rpc import NOT_AVAILABLE, RpcClient, RpcError, RpcUnreachable
from nvmet_p2p.errors import NvmetError

DEFAULT_PREFS_DIR = "~/.targetcli-ext"
UNPREFIXED_GROUP = "attr"  # the shell's name for configfs group "" (see module docstring)
GLOBAL_GROUP = "global"
AUTO_SAVE = "auto_save_on_exit"  # targetcli's preference, and its default (true)
_OFF = ("0", "n", "no", "false", "off")


def _shell_group(group: str, groups: Iterable[str]) -> str:
    return UNPREFIXED_GROUP if group == "" and UNPREFIXED_GROUP not in groups else group


class UINode(ConfigNode):
    """A node of the daemon's tree at `rpc_path`; children come from `list` every time."""

    def __init__(self, name: str, parent: UINode | None, rpc_path: str, *,
                 shell: ConfigShell | None = None, client: RpcClient | None = None) -> None:
        self.rpc_path = rpc_path
        self._client = client
        super().__init__(name, parent, shell)
        self.define_config_group_param(
            GLOBAL_GROUP, AUTO_SAVE, "bool",
            "If true, leaving the interactive shell saves the configuration to the "
            "daemon's file (saveconfig without a file).")

    # -- the daemon ------------------------------------------------------------------
    @property
    def rpc(self) -> RpcClient:
        client = self.get_root()._client
        assert client is not None
        return client

    def call(self, method: str, **params: Any) -> Any:
        return self.rpc.call(method, **params)

    def child_path(self, name: Any) -> str:
        return f"{self.rpc_path.rstrip('/')}/{name}"

    # -- children, always fresh ------------------------------------------------------
    def _sync(self) -> list[UINode]:
        listing = self.call("list", path=self.rpc_path)["children"]
        wanted = {c["name"]: c["kind"] for c in listing}
        for child in list(self._children):
            if child.name not in wanted:
                self.remove_child(child)
        have = {c.name for c in self._children}
        for name, kind in wanted.items():
            if name not in have:
                NODE_CLASSES.get(kind, UINode)(name, self, self.child_path(name))
        return list(self._children)

    @property  # type: ignore[override]
    def children(self) -> list[UINode]:
        return self._sync()

    def get_child(self, name: str) -> UINode:
        for child in self._sync():
            if child.name == name:
                return child
        raise ValueError(f"No such path {self.path.rstrip('/')}/{name}")

    def child_names(self) -> list[str]:
        return [c["name"] for c in self.call("list", path=self.rpc_path)["children"]]

    # -- attribute groups from the daemon ---------------------------------------------
    def rpc_groups(self) -> dict[str, str]:
        """Shell group name -> configfs group ("" for unprefixed files)."""
        groups = list(self.call("get", path=self.rpc_path))
        return {_shell_group(g, groups): g for g in groups}

    def _rpc_group(self, group: str) -> str:
        groups = self.rpc_groups()
        if group not in groups:
            shown = ", ".join([GLOBAL_GROUP, *groups])
            raise ExecutionError(f"{self.path} has no group {group!r}; groups: {shown}")
        return groups[group]

    def attrs(self, group: str) -> dict[str, str]:
        return self.call("get", path=self.rpc_path, group=group)[group]

    def list_config_groups(self) -> list[str]:  # type: ignore[override]
        return [GLOBAL_GROUP, *self.rpc_groups()]

    def ui_command_get(self, group: str | None = None, *parameter: str) -> None:
        '''
        Shows attribute values of this object: `get GROUP` lists the whole group,
        `get GROUP name...` the named ones.  Without a group, lists the groups.

        Groups are the configfs prefixes: attr, addr, param, device, ana.  On
        namespaces and referrals, `attr` holds the unprefixed files (enable,
        buffered_io, p2pmem).  `global` holds the shell's own preferences.

        Example: get device path size
        '''
        if group is None or group == GLOBAL_GROUP:
            super().ui_command_get(group, *parameter)
            return
        rgroup = self._rpc_group(group)
        values = self.attrs(rgroup)
        for name in parameter:
            if name not in values:
                raise ExecutionError(f"no attribute {name!r} in group {group}; valid: "
                                     f"{', '.join(values)}")
        for name in parameter or list(values):
            self.shell.con.display(f"{name}={values[name]}")

    def ui_command_set(self, group: str | None = None, **parameter: str) -> None:
        '''
        Writes attributes of this object, all or nothing:
        `set GROUP name=value ...`.  The daemon applies a disable first and an
        enable last, so `set attr enable=0` with other changes works in one line.

        Example: set device path=/dev/nvme0n1 ; set attr allow_p2pmem=1
        '''
        if group is None or group == GLOBAL_GROUP or not parameter:
            if group not in (None, GLOBAL_GROUP):
                self.ui_command_get(group)
                return
            super().ui_command_set(group, **parameter)
            return
        rgroup = self._rpc_group(group)
        result = self.call("set", path=self.rpc_path, attrs={rgroup: parameter})
        for name, value in result[rgroup].items():
            self.shell.con.display(f"Parameter {name} is now '{value}'.")

    def _complete_group_params(self, parameters: dict, text: str, current_param: str,
                               values: bool) -> list[str]:
        if current_param == "group":
            return [g for g in self.list_config_groups() if g.startswith(text)]
        group = parameters.get("group")
        if group is None or group == GLOBAL_GROUP or group not in self.rpc_groups():
            return []
        rgroup = self.rpc_groups()[group]
        names = list(self.attrs(rgroup))
        if values and current_param in names:
            choices = self.call("attr_choices", path=self.rpc_path, group=rgroup,
                                name=current_param) or []
            return [c for c in choices if c.startswith(text)]
        suffix = "=" if values else ""
        return [n + suffix for n in names if n.startswith(text) and n not in parameters]

    def ui_complete_set(self, parameters: dict, text: str, current_param: str) -> list[str]:
        if parameters.get("group") == GLOBAL_GROUP:
            return super().ui_complete_set(parameters, text, current_param)
        return _one(self._complete_group_params(parameters, text, current_param, True))

    def ui_complete_get(self, parameters: dict, text: str, current_param: str) -> list[str]:
        if parameters.get("group") == GLOBAL_GROUP:
            return super().ui_complete_get(parameters, text, current_param)
        return _one(self._complete_group_params(parameters, text, current_param, False))

    def ui_command_exit(self) -> str:
        '''
        Leaves the shell.  With `set global auto_save_on_exit=true` (the default, as
        in targetcli) the configuration is first saved to the daemon's file, as a
        bare `saveconfig` does; `set global auto_save_on_exit=false` turns that off.
        '''
        return "EXIT"

    def ui_command_saveconfig(self, savefile: str | None = None) -> None:
        '''
        Saves the whole configuration as nvmetcli JSON, atomically (from any node).
        Without a file, the daemon writes the file it was started with (--config).
        '''
        path = os.path.abspath(savefile) if savefile else None
        result = self.call("save_config", path=path)
        self.shell.con.display(f"Configuration saved to {result['path']}.")

    def ui_command_info(self) -> None:
        '''
        Shows everything about this object: every attribute (group_name: value, the
        exact byte counts `ls` rounds) and its run-time status.
        '''
        values = self.call("get", path=self.rpc_path)
        for group, names in values.items():
            shown = _shell_group(group, values)
            for name, value in names.items():
                self.shell.con.display(f"{shown}_{name}: {value}")
        status = self.status_part(self.call("status"))
        if status:
            self.shell.con.display("status: " + json.dumps(status, indent=2, sort_keys=True))

    # -- status ------------------------------------------------------------------------
    def ui_command_status(self) -> None:
        '''
        Shows the target's run-time state for this object (controllers, namespaces
        with I/O counters, ports, P2P decisions) as JSON.
        '''
        self.shell.con.display(json.dumps(self.status_part(self.call("status")), indent=2,
                                          sort_keys=True))

    def status_part(self, status: dict) -> Any:
        return status

    def summary(self) -> tuple[str, bool | None]:
        return ("", None)


def _one(completions: list[str]) -> list[str]:
    """configshell's convention: a single complete word gets its trailing space."""
    if len(completions) == 1 and not completions[0].endswith("="):
        return [completions[0] + " "]
    return completions


def _group(group: str, values: dict[str, str]) -> dict | None:
    return {group: values} if values else None


def _p2p_decisions(status: dict) -> list[dict]:
    p2p = status.get("p2p")
    return list(p2p.get("decisions", [])) if isinstance(p2p, dict) else []


# -- directories ---------------------------------------------------------------------

class UIDirectory(UINode):
    """A configfs directory of objects: create and delete children."""

    label = "Objects"
    member_kind = ""  # the kind of object `create` makes
    create_group = ""  # the attribute group `create name=value` writes

    def _create_table(self) -> dict[str, list[str] | None]:
        if not self.create_group:
            return {}
        return self.call("attr_names", kind=self.member_kind).get(self.create_group, {})

    def ui_complete_create(self, parameters: dict, text: str, current_param: str) -> list[str]:
        """The enumerated values of a create attribute (`create 1 trtype=<TAB>`)."""
        choices = self._create_table().get(current_param) or []
        return _one([c for c in choices if c.startswith(text)])

    def complete_free_kparams(self, command: str, text: str, kparams: dict) -> list[str]:
        """`create 1 tr<TAB>` -> trtype= (configshell completes declared params only)."""
        if command != "create":
            return []
        return [n + "=" for n in self._create_table() if n.startswith(text) and
                n not in kparams]

    def summary(self) -> tuple[str, bool | None]:
        return (f"{self.label}: {len(self.child_names())}", None)

    def _created(self, result: dict) -> None:
        self.shell.con.display(f"Created {result['path']}.")

    def ui_command_delete(self, name: str) -> None:
        '''
        Deletes the named child (an object, or a link from this directory).
        '''
        result = self.call("delete", path=self.child_path(name))
        self.shell.con.display(f"Deleted {result['deleted']}.")

    def ui_complete_delete(self, parameters: dict, text: str, current_param: str) -> list[str]:
        if current_param != "name":
            return []
        return _one([n for n in self.child_names() if n.startswith(text)])


class UIHosts(UIDirectory):
    label = "Hosts"

    def ui_command_create(self, nqn: str) -> None:
        '''
        Creates a host entry (a host NQN that subsystems can then allow).
        '''
        self._created(self.call("create", path=self.rpc_path, name=nqn))


class UISubsystems(UIDirectory):
    label = "Subsystems"
    member_kind = "subsystem"
    create_group = "attr"

    def ui_command_create(self, nqn: str, **attr: str) -> None:
        '''
        Creates a subsystem; attr_* values may follow, e.g.
        `create nqn.2014-08.com.example:disk1 allow_any_host=1`.
        '''
        self._created(self.call("create", path=self.rpc_path, name=nqn, attrs=_group("attr",
                                                                                     attr)))


class UINamespaces(UIDirectory):
    label = "Namespaces"
    member_kind = "namespace"
    create_group = "device"

    def ui_command_create(self, nsid: str | None = None, **device: str) -> None:
        '''
        Creates a namespace (the lowest free NSID when none is given); device_*
        values may follow, e.g. `create 1 path=/dev/nvme0n1` or
        `create path=mem0 backend=memory size=64M`.  Enable it with `enable`.
        '''
        if nsid is None:
            used = {int(n) for n in self.child_names()}
            nsid = str(next(i for i in range(1, len(used) + 2) if i not in used))
        self._created(self.call("create", path=self.rpc_path, name=nsid,
                                attrs=_group("device", device)))


class UIPorts(UIDirectory):
    label = "Ports"
    member_kind = "port"
    create_group = "addr"

    def ui_command_create(self, portid: str, **addr: str) -> None:
        '''
        Creates a port; addr_* values may follow, e.g.
        `create 1 trtype=rdma adrfam=ipv4 traddr=10.0.0.1 trsvcid=4420`.
        '''
        self._created(self.call("create", path=self.rpc_path, name=portid,
                                attrs=_group("addr", addr)))


class UIReferrals(UIDirectory):
    label = "Referrals"
    member_kind = "referral"
    create_group = "addr"

    def ui_command_create(self, name: str, **addr: str) -> None:
        '''
        Creates a discovery referral; addr_* values may follow, e.g.
        `create r1 trtype=rdma adrfam=ipv4 traddr=10.0.0.2 portid=2`.
        '''
        self._created(self.call("create", path=self.rpc_path, name=name,
                                attrs=_group("addr", addr)))


class UILinks(UIDirectory):
    """A directory of links to objects elsewhere (port subsystems, allowed hosts)."""

    source = "/"

    def ui_command_create(self, name: str) -> None:
        '''
        Adds a link to an existing object (see `help` for which directory).
        '''
        self._created(self.call("create", path=self.rpc_path, name=name))

    def ui_complete_create(self, parameters: dict, text: str, current_param: str) -> list[str]:
        if current_param != "name":
            return []
        have = set(self.child_names())
        names = [c["name"] for c in self.call("list", path=self.source)["children"]]
        return _one([n for n in names if n.startswith(text) and n not in have])


class UIPortSubsystems(UILinks):
    label = "Subsystems"
    source = "/subsystems"

    def ui_command_create(self, name: str) -> None:
        '''
        Exports the subsystem NQN `name` through this port (configfs: link it
        here).  The port starts listening with its first subsystem.
        '''
        super().ui_command_create(name)


class UIAllowedHosts(UILinks):
    label = "Allowed hosts"
    source = "/hosts"

    def ui_command_create(self, name: str) -> None:
        '''
        Allows the host NQN `name` (which must exist under /hosts) to connect to
        this subsystem.  Controllers already connected stay connected after a host
        is removed, as with the kernel target; new connects are refused.
        '''
        super().ui_command_create(name)


# -- objects ------------------------------------------------------------------------------

class UIRoot(UINode):
    def __init__(self, shell: ConfigShell, client: RpcClient) -> None:
        super().__init__("/", None, "/", shell=shell, client=client)

    def summary(self) -> tuple[str, bool | None]:
        return (f"{len(self.call('status')['controllers'])} controllers", None)

    def ui_command_restoreconfig(self, savefile: str | None = None,
                                 clear_existing: str = "false") -> None:
        '''
        Loads an nvmetcli JSON file (read by the daemon; without a file, the one the
        daemon was started with, by default /etc/nvmet-p2p/config.json).  All or
        nothing: every problem in the file is reported and nothing is loaded.  With
        clear_existing=true the current configuration is replaced.
        '''
        replace = clear_existing.lower() not in _OFF
        path = os.path.abspath(savefile) if savefile else None
        try:
            result = self.call("load_config", path=path, replace=replace)
        except RpcError as e:
            if "pass replace: true" in e.message:  # the RPC's words, not the shell's
                raise ExecutionError("the target already has a configuration; run "
                                     f"`restoreconfig {savefile or ''} clear_existing=true`"
                                     " to replace it, or `clear confirm=true` first") from None
            raise
        self.shell.con.display(f"Configuration restored from {savefile or 'the daemon file'}"
                               f": {result['hosts']} hosts, {result['subsystems']} "
                               f"subsystems, {result['ports']} ports.")

    def ui_command_clear(self, confirm: str = "false") -> None:
        '''
        Deletes the whole configuration: ports first (hosts see a disconnect), then
        subsystems, then hosts.  Asks for confirm=true, as targetcli does.
        '''
        if confirm.lower() in _OFF:
            raise ExecutionError("clear deletes the whole configuration and disconnects "
                                 "every host; run `clear confirm=true` to do it")
        self.call("clear_config")
        self.shell.con.display("All configuration cleared.")


class UIHost(UINode):
    def summary(self) -> tuple[str, bool | None]:
        return (_nqn_note(self.name), None)


class UISubsystem(UINode):
    def summary(self) -> tuple[str, bool | None]:
        attrs = self.attrs("attr")
        access = "any host" if attrs["allow_any_host"] == "1" else "allowed hosts only"
        ctrls = self.status_part(self.call("status")).get("controllers", [])
        note = _nqn_note(self.name)
        return (f"{access}, {len(ctrls)} controllers{', ' + note if note else ''}", None)

    def status_part(self, status: dict) -> Any:
        return status["subsystems"].get(self.name, {})


class UINamespace(UINode):
    def summary(self) -> tuple[str, bool | None]:
        values = self.call("get", path=self.rpc_path)
        device, enabled = values["device"], values[""]["enable"] == "1"
        size = f" {human_size(device['size'])}" if device.get("size") else ""
        parts = [f"{device['path'] or '(no path)'} ({device['backend']}{size})",
                 "enabled" if enabled else "disabled"]
        status = self.call("status")
        stats = self.status_part(status).get("stats", {})
        moved = ""
        if stats.get("p2p_bytes") or stats.get("sysmem_bytes"):  # Read/Write payload so far
            moved = (f"{human_size(str(stats['p2p_bytes']))} P2P, "
                     f"{human_size(str(stats['sysmem_bytes']))} system memory")
        decision = self._decision(status) or self._explained()
        if decision is not None and decision.get("p2p"):
            parts.append(f"p2p: {decision['provider']}")
        elif decision is not None:  # the reason gets what the line has left (ls wraps)
            rest = len(", ".join([*parts, moved])) + len(", system memory: ")
            parts.append("system memory: " + _short(decision.get("reason", "?"),
                                                    self._ls_room() - rest))
        return (", ".join([*parts, *([moved] if moved else [])]), True if enabled else None)

    def _ls_room(self) -> int:
        """Characters of summary that fit on this node's `ls` line (configshell's layout:
        two per level, "o- ", the name, at least one dot, " [", "]", a last column)."""
        level = self.path.rstrip("/").count("/")
        return self.shell.con.get_width() - (2 * level + 3) - len(self.name) - 6

    def _ids(self) -> tuple[str, str]:
        parts = self.rpc_path.strip("/").split("/")
        return parts[1], parts[3]

    def _decision(self, status: dict) -> dict | None:
        """The P2P decision in use for this namespace (P2P first, if any controller has it)."""
        nqn, nsid = self._ids()
        mine = [d for d in _p2p_decisions(status)
                if d.get("subnqn") == nqn and str(d.get("nsid")) == nsid]
        return max(mine, key=lambda d: bool(d.get("p2p")), default=None)

    def _explained(self) -> dict | None:
        """With no controller connected, the decision one connecting now would get."""
        try:
            entries = self.call("p2p_explain", path=self.rpc_path)
        except RpcError as e:
            if e.code != NOT_AVAILABLE:
                raise
            return None
        if not isinstance(entries, list):
            return None
        return max(entries, key=lambda d: bool(d.get("p2p")), default=None)

    def status_part(self, status: dict) -> Any:
        nqn, nsid = self._ids()
        for ns in status["subsystems"].get(nqn, {}).get("namespaces", []):
            if str(ns.get("nsid")) == nsid:
                return ns
        return {}

    def ui_command_enable(self) -> None:
        '''
        Enables the namespace: opens its device; connected hosts get a
        namespace-changed event.
        '''
        self.call("enable", path=self.rpc_path)
        self.shell.con.display(f"Enabled {self.rpc_path}.")

    def ui_command_disable(self) -> None:
        '''
        Disables the namespace: new I/O is refused, I/O in flight completes first.
        '''
        self.call("disable", path=self.rpc_path)
        self.shell.con.display(f"Disabled {self.rpc_path}.")

    def ui_command_p2p(self) -> None:
        '''
        Explains the P2P decision for this namespace on every port: which provider
        is used, or why system memory is.
        '''
        _show_p2p(self)


class UIPort(UINode):
    def summary(self) -> tuple[str, bool | None]:
        values = self.call("get", path=self.rpc_path)
        addr = values["addr"]
        where = addr["trtype"] or "no trtype"
        if addr["trtype"] in ("rdma", "tcp"):
            where += f" {addr['traddr']}:{addr['trsvcid']}"
        p2p = "P2P allowed" if values["attr"]["allow_p2pmem"] == "1" else "P2P off"
        port = self.status_part(self.call("status"))
        if port.get("error"):
            return (f"{where}, {p2p}, not listening: {port['error']}", False)
        return (f"{where}, {p2p}", True if port.get("listening") else None)

    def status_part(self, status: dict) -> Any:
        return status["ports"].get(self.name, {})

    def ui_command_p2p(self) -> None:
        '''
        Explains the P2P decision for every namespace reached through this port.
        '''
        _show_p2p(self)


class UIReferral(UINode):
    def summary(self) -> tuple[str, bool | None]:
        values = self.call("get", path=self.rpc_path)
        addr, enabled = values["addr"], values[""]["enable"] == "1"
        where = f"{addr['trtype']} {addr['traddr']}" + (f":{addr['trsvcid']}"
                                                        if addr["trsvcid"] else "")
        state = "enabled" if enabled else "disabled"
        return (f"{where}, {state}", True if enabled else None)

    def ui_command_enable(self) -> None:
        '''
        Enables the referral: it appears in the discovery log of this port.
        '''
        self.call("enable", path=self.rpc_path)
        self.shell.con.display(f"Enabled {self.rpc_path}.")

    def ui_command_disable(self) -> None:
        '''
        Disables the referral.
        '''
        self.call("disable", path=self.rpc_path)
        self.shell.con.display(f"Disabled {self.rpc_path}.")


class UILink(UINode):
    def summary(self) -> tuple[str, bool | None]:
        return ("link", None)


LS_REASON_CHARS = 48  # at most, of a P2P reason in `ls`; `info` and `p2p` show it whole
MORE = "… (info)"


def _short(text: str, room: int = LS_REASON_CHARS) -> str:
    """`text`, or as much of it as `room` holds followed by MORE (MORE alone at worst)."""
    room = min(room, LS_REASON_CHARS)
    if len(text) <= room:
        return text
    return text[:max(0, room - len(MORE))].rstrip() + MORE


def human_size(value: str) -> str:
    """A byte count as ls shows it: 64M, 1.5G, 512 (exact below 1 KiB)."""
    try:
        n = int(value)
    except ValueError:
        return value
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            q = n / (1 << shift)
            return f"{q:.0f}{unit}" if q == int(q) or q >= 100 else f"{q:.1f}{unit}"
    return str(n)


def _nqn_note(nqn: str) -> str:
    """A short mark for an NQN accepted although off the NVMe format (status says why)."""
    return "NQN not in the NVMe format" if nqn_format_warning(nqn) else ""


def _show_p2p(node: UINode) -> None:
    try:
        entries = node.call("p2p_explain", path=node.rpc_path)
        source = ""
    except RpcError as e:
        if e.code != NOT_AVAILABLE:
            raise
        # Without the offline explainer, the live decisions of connected controllers.
        entries = [d for d in _p2p_decisions(node.call("status"))
                   if _concerns(node, d)]
        source = " (decisions of connected controllers; p2p_explain is not available)"
    if isinstance(entries, str):
        node.shell.con.display(entries)
        return
    if not entries:
        node.shell.con.display(f"No P2P decision for {node.rpc_path}{source}.")
        return
    for entry in entries:
        node.shell.con.display(entry.get("text") if isinstance(entry, dict) else str(entry))
    if source:
        node.shell.con.display(source.strip(" ()") + ".")


def _concerns(node: UINode, decision: dict) -> bool:
    parts = node.rpc_path.strip("/").split("/")
    if isinstance(node, UIPort):
        return str(decision.get("portid")) == parts[1]
    return decision.get("subnqn") == parts[1] and str(decision.get("nsid")) == parts[3]


NODE_CLASSES: dict[str, type[UINode]] = {
    "hosts": UIHosts, "host": UIHost,
    "subsystems": UISubsystems, "subsystem": UISubsystem,
    "namespaces": UINamespaces, "namespace": UINamespace,
    "allowed_hosts": UIAllowedHosts, "allowed_host": UILink,
    "ports": UIPorts, "port": UIPort,
    "port_subsystems": UIPortSubsystems, "port_subsystem": UILink,
    "referrals": UIReferrals, "referral": UIReferral,
}

# What one command line can fail with that is the user's to fix: one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ExecutionError, NvmetError, ValueError)


class _CurrentStream:
    """Stands for sys.<name> as it is when used, not as it was when configshell started."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(getattr(sys, self._name), attr)


class _DebugLog:
    """configshell's Log.debug, locating its caller with one frame instead of inspect.stack().

    inspect.stack() reads the source of every frame on the stack, several ms per call and
    a dozen calls per command; the message (file:line function() text) is the same.
    """

    def __init__(self, log: Any) -> None:
        self._log = log

    def __call__(self, msg: str) -> None:
        caller = sys._getframe(1)
        self._log._log("debug", f"{caller.f_code.co_filename}:{caller.f_lineno} "
                                f"{caller.f_code.co_name}() {msg}")


def _writable_prefs_dir(prefs_dir: str | None) -> str | None:
    """The preferences directory if it is (or can be made) writable, else None.

    configshell writes its log and history there on every command; on a read-only home
    (a VM booted on the host's root filesystem) the shell must still work, just without.
    """
    if not prefs_dir:
        return None
    path = os.path.expanduser(prefs_dir)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    return path if os.access(path, os.W_OK) else None


class Shell(ConfigShell):
    """configshell's shell with targetcli's extra preference."""

    default_prefs: ClassVar[dict[str, Any]] = {**ConfigShell.default_prefs, AUTO_SAVE: True}


def make_shell(rpc_socket: str = DEFAULT_RPC_SOCKET,
               prefs_dir: str | None = DEFAULT_PREFS_DIR) -> ConfigShell:
    """A shell whose root node talks to the daemon at `rpc_socket`."""
    shell = Shell(_writable_prefs_dir(prefs_dir))
    shell._parser = _quoting_parser()
    _complete_free_kparams(shell)
    # configshell's Console (a Borg) took sys.stdout when it was imported; write to
    # whatever stdout and stderr are at the time (redirected, captured).
    Console(stdin=sys.stdin, stdout=_CurrentStream("stdout"), stderr=_CurrentStream("stderr"))
    shell.log.debug = _DebugLog(shell.log)  # the Log is a Borg: every instance gets it
    UIRoot(shell, RpcClient(rpc_socket))
    return shell


def _complete_free_kparams(shell: ConfigShell) -> None:
    """Let nodes complete the names of **kwargs parameters (create's attributes)."""
    declared = shell._complete_token_pparam

    def complete(text: str, path: str, command: str, pparams: list, kparams: dict) -> list:
        out = declared(text, path, command, pparams, kparams)
        node = shell._current_node.get_node(path)
        extra = getattr(node, "complete_free_kparams", None)
        if extra is not None and len(pparams) > 1 - (not text):
            out += [c for c in extra(command, text, kparams) if c not in out]
        return out
    shell._complete_token_pparam = complete


def _quoting_parser() -> Any:
    """configshell's command-line grammar, with "quoted" and 'quoted' values added, so
    that `set addr treq="not required"` works (configshell takes bare words only)."""
    from pyparsing import (  # configshell-fb's own dependency
        OneOrMore,
        Optional,
        QuotedString,
        Regex,
        Suppress,
        Word,
        alphanums,
        locatedExpr,
    )

    command = locatedExpr(Word(alphanums + "_"))("command")
    var = Word(alphanums + r"?;&*$!#,=_\+/.<>()~@:-%[]")
    value = QuotedString('"', esc_char="\\") | QuotedString("'") | var
    keyword = Word(alphanums + r"_\-")
    kparam = locatedExpr(keyword + Suppress("=") + Optional(value, default=""))("kparams*")
    pparam = locatedExpr(value)("pparams*")
    parameters = OneOrMore(kparam | pparam)
    bookmark = Regex("@([A-Za-z0-9:_.]|-)+")
    pathstd = (Regex(r"([A-Za-z0-9:_.\[\]]|-)*" + "/" + r"([A-Za-z0-9:_.\[\]/]|-)*")
               | ".." | ".")
    path = locatedExpr(bookmark | pathstd | "*")("path")
    return Optional(path) + Optional(command) + Optional(parameters)


def run_command(shell: ConfigShell, line: str) -> int:
    """Run one command line; report a failure as one line on stderr.  Exit status."""
    try:
        shell.run_cmdline(line)
    except USER_ERRORS as e:
        shell.log.error(str(e))
        return 1
    except Exception as e:  # noqa: BLE001  e.g. pyparsing's ParseException: still one line
        shell.log.error(f"{type(e).__name__}: {e}")
        return 1
    return 0


def _interactive(shell: ConfigShell) -> int:
    root = shell._root_node
    try:
        root.call("list", path="/")  # say at once when there is no daemon
    except RpcUnreachable as e:
        shell.log.error(str(e))
        return 1
    shell.con.display("targetcli-ext: nvmet-p2p configuration shell. `help` lists commands.")
    while not shell._exit:
        try:
            shell.run_interactive()
        except USER_ERRORS as e:
            shell.log.error(str(e))
        except Exception as e:  # noqa: BLE001  one line, and the shell goes on
            shell.log.error(f"{type(e).__name__}: {e}")
    return _auto_save(shell)


def _auto_save(shell: ConfigShell) -> int:
    """targetcli's auto_save_on_exit: a bare saveconfig as the shell is left."""
    if not shell.prefs[AUTO_SAVE]:
        return 0
    shell.log.info(f"Global pref {AUTO_SAVE}=true")
    rc = run_command(shell, "/ saveconfig")
    if rc:
        shell.log.error(f"the configuration was not saved on exit (`set global "
                        f"{AUTO_SAVE}=false` leaves without saving)")
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="targetcli-ext",
        description="Configure a running nvmet-p2p target (interactive, or one command).")
    parser.add_argument("--rpc-socket", metavar="PATH", default=DEFAULT_RPC_SOCKET,
                        help=f"control socket of `nvmet-p2p serve` (default: "
                             f"{DEFAULT_RPC_SOCKET})")
    parser.add_argument("--prefs-dir", metavar="DIR", default=DEFAULT_PREFS_DIR,
                        help=f"shell preferences and history (default: {DEFAULT_PREFS_DIR})")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="[PATH] COMMAND [ARGS...]: run one command and exit")
    parser.add_argument("--version", action="version",
                        version=f"targetcli-ext (nvmet-p2p) {nvmet_p2p.__version__}")
    args = parser.parse_args(argv)
    shell = make_shell(args.rpc_socket, args.prefs_dir)
    if args.command:
        return run_command(shell, " ".join(args.command))
    return _interactive(shell)


if __name__ == "__main__":
    sys.exit(main())
