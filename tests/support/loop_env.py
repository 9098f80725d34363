"""A loop-transport target under a fake clock, for tests of the core and above.

`LoopEnv` is a `Target` on its own fresh asyncio loop with a `FakeClock`,
a `LoopTransport`, helpers that build a configuration (subsystem, namespaces of kind
memory / file / bdev, a loop port) and connected `LoopHost`s.  At teardown it
disconnects the hosts it made and checks for leaks the way blktests does: no
controller left, the loop transport back to 0 queues, no namespace with I/O in flight.
A bdev namespace sits on a loop device; where losetup cannot make one the test skips.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nvmet_p2p.backends import open_backend
from nvmet_p2p.core.clock import FakeClock
from nvmet_p2p.core.subsys import Ns
from nvmet_p2p.core.target import Target
from nvmet_p2p.host.loop import LoopHost
from nvmet_p2p.p2p.policy import P2PPolicy
from nvmet_p2p.transports.loop import LoopTransport

SUBNQN = "nqn.2026-11.io.nvmet-p2p:test"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
PORTID = 1
NS_SIZE = 16 << 20  # big enough for MDTS-sized transfers, small enough to be quick
NS_KINDS = ("memory", "file", "bdev")
LOSETUP_TIMEOUT = 10.0


def _losetup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["losetup", *args], capture_output=True, text=True,
                          timeout=LOSETUP_TIMEOUT, check=False)


class LoopEnv:
    """One target, one loop transport, the hosts a test made; see the module docstring."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.p2p = P2PPolicy()
        self.target = Target(loop=self.loop, clock=self.clock, open_backend=open_backend,
                             p2p=self.p2p)
        self.transport = LoopTransport(self.target)
        self.root = self.target.root
        self.hosts: list[LoopHost] = []
        self.loop_devices: list[str] = []
        self._names = itertools.count()

    # -- configuration -----------------------------------------------------------
    def port(self, portid: int = PORTID, *, inline_data_size: int | None = None,
             max_queue_size: int | None = None) -> Any:
        port = self.root.ports.get(portid)
        if port is None:
            port = self.root.create_port(portid)
            port.addr_trtype = "loop"
            if inline_data_size is not None:
                port.param_inline_data_size = inline_data_size
            if max_queue_size is not None:
                port.param_max_queue_size = max_queue_size
        return port

    def backing(self, kind: str, name: str, size: int) -> str:
        """A device path for a namespace of `kind` (memory: just a label)."""
        if kind == "memory":
            return name
        path = self.tmp_path / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        if kind == "file":
            return str(path)
        try:
            r = _losetup("--find", "--show", str(path))
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"bdev namespace needs losetup: {e}")
        dev = r.stdout.strip()
        if r.returncode or not dev.startswith("/dev/"):
            pytest.skip(f"bdev namespace needs a loop device; losetup says: "
                        f"{r.stderr.strip() or r.returncode}")
        self.loop_devices.append(dev)
        return dev

    def add_namespace(self, subsys: Any, nsid: int, kind: str = "memory", *,
                      block_size: int = 512, size: int = NS_SIZE, enable: bool = True,
                      **attrs: Any) -> Any:
        ns = subsys.create_namespace(nsid)
        ns.device_backend = kind
        ns.device_block_size = block_size
        ns.device_path = self.backing(kind, f"ns{nsid}-{next(self._names)}", size)
        if kind == "memory":
            ns.device_size = size
        for name, value in attrs.items():
            setattr(ns, name, value)
        if enable:
            ns.enable = True
        return ns

    def add_subsystem(self, nqn: str = SUBNQN, *, namespaces: dict[int, str] | None = None,
                      block_size: int = 512, ns_size: int = NS_SIZE,
                      allow_any_host: bool = True, allowed_hosts: tuple[str, ...] = (),
                      portid: int | None = PORTID, **attrs: Any) -> Any:
        """A subsystem with `namespaces` ({nsid: kind}, default one memory NS), linked to
        the loop port `portid` (None: not linked)."""
        subsys = self.root.create_subsystem(nqn)
        for name, value in attrs.items():
            setattr(subsys, name, value)
        for host in allowed_hosts:
            if host not in self.root.hosts:
                self.root.create_host(host)
            subsys.add_allowed_host(host)
        if allow_any_host and not allowed_hosts:
            subsys.attr_allow_any_host = True
        for nsid, kind in (namespaces if namespaces is not None else {1: "memory"}).items():
            self.add_namespace(subsys, nsid, kind, block_size=block_size, size=ns_size)
        if portid is not None:
            self.port(portid).link_subsystem(nqn)
        return subsys

    # -- hosts ---------------------------------------------------------------------
    def host(self, hostnqn: str | None = None, portid: int = PORTID) -> LoopHost:
        h = LoopHost(self.target, self.transport, portid, hostnqn=hostnqn)
        self.hosts.append(h)
        return h

    def connect(self, subnqn: str = SUBNQN, *, hostnqn: str | None = None,
                portid: int = PORTID, **kw: Any) -> LoopHost:
        return self.host(hostnqn, portid).connect(subnqn, **kw)

    # -- run time --------------------------------------------------------------------
    def pump(self, seconds: float = 0.0) -> None:
        """Let completions posted to the target's loop (file backends) run."""
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def ns(self, nsid: int = 1, nqn: str = SUBNQN) -> Ns | None:
        subsys = self.target.get_subsys(nqn)
        return subsys.ns.get(nsid) if subsys is not None else None

    def leaks(self) -> list[str]:
        out = [f"controller left: {c.describe()}" for c in self.target.controllers()]
        queues = self.transport.resources()["queues"]
        if queues:
            out.append(f"loop transport still has {queues} queues")
        for nqn in self.root.subsystems:
            subsys = self.target.get_subsys(nqn)
            out += [f"namespace {ns.nsid} of {nqn}: {ns.inflight} commands in flight"
                    for ns in subsys.ns.values() if ns.inflight]
        return out

    def close(self) -> list[str]:
        """Disconnect hosts, check for leaks, tear down; returns the leaks found."""
        for h in self.hosts:
            h.disconnect()
        self.pump()
        leaks = self.leaks()
        self.target.shutdown()
        self.pump()
        self.loop.close()
        self.p2p.close()
        for dev in self.loop_devices:
            _losetup("-d", dev)
        return leaks
