"""A target serving NVMe/TCP on 127.0.0.1 from its own thread, for host-side tests.

`TcpEnv` is a `LoopEnv` (same configuration helpers, same fake clock, same leak check)
whose target runs `loop.run_forever()` in a thread with a `TcpTransport`, so that the
Python `TcpHost` in the test's thread talks to it over real sockets, as a remote host
would.  Everything that touches the target (configuration, status) runs in the
target's thread through `call()`.  Ports listen on 127.0.0.1 (or ::1) at a free port.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from nvmet_p2p.host.tcp import TcpHost
from nvmet_p2p.tcp import TcpTransport
from tests.support.loop_env import PORTID, SUBNQN, LoopEnv, _losetup

T = TypeVar("T")
CALL_TIMEOUT = 10.0


def free_port(family: int = socket.AF_INET) -> int:
    """A TCP port nobody listens on now (the kernel's choice for an ephemeral bind)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return int(s.getsockname()[1])


class TcpEnv(LoopEnv):
    """A target on 127.0.0.1 in its own thread; see the module docstring."""

    def __init__(self, tmp_path: Path, **transport_kw: Any) -> None:
        super().__init__(tmp_path)
        self.tcp = TcpTransport(self.target, **transport_kw)
        self.trsvcids: dict[int, int] = {}
        self.tcp_hosts: list[TcpHost] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name="tcp-target",
                                        daemon=True)
        self._thread.start()

    # -- the target's thread ------------------------------------------------------------
    def call(self, fn: Callable[[], T], timeout: float = CALL_TIMEOUT) -> T:
        """Run `fn` on the target's loop and return its result (or raise its error)."""
        if threading.current_thread() is self._thread:
            return fn()  # already there (a configuration step calling another)

        async def run() -> T:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def pump(self, seconds: float = 0.0) -> None:
        """The target runs by itself: give it time (and the GIL)."""
        time.sleep(max(seconds, 0.001))

    # -- configuration --------------------------------------------------------------------
    def port(self, portid: int = PORTID, *, inline_data_size: int | None = None,
             max_queue_size: int | None = None, traddr: str = "127.0.0.1") -> Any:
        port = self.root.ports.get(portid)
        if port is None:
            port = self.root.create_port(portid)
            port.addr_trtype = "tcp"
            port.addr_adrfam = "ipv6" if ":" in traddr else "ipv4"
            port.addr_traddr = traddr
            family = socket.AF_INET6 if ":" in traddr else socket.AF_INET
            port.addr_trsvcid = str(free_port(family))
            self.trsvcids[portid] = int(port.addr_trsvcid)
            if inline_data_size is not None:
                port.param_inline_data_size = inline_data_size
            if max_queue_size is not None:
                port.param_max_queue_size = max_queue_size
        return port

    def add_subsystem(self, nqn: str = SUBNQN, **kw: Any) -> Any:
        return self.call(lambda: LoopEnv.add_subsystem(self, nqn, **kw))

    def tcp_port(self, portid: int = PORTID, **kw: Any) -> Any:
        """A tcp port made (not yet linked) in the target's thread."""
        return self.call(lambda: self.port(portid, **kw))

    # -- hosts ------------------------------------------------------------------------------
    def tcp_host(self, hostnqn: str | None = None, portid: int = PORTID,
                 **kw: Any) -> TcpHost:
        port = self.root.ports[portid]
        h = TcpHost(port.addr_traddr, self.trsvcids[portid], adrfam=port.addr_adrfam,
                    hostnqn=hostnqn, **kw)
        self.tcp_hosts.append(h)
        return h

    def tcp_connect(self, subnqn: str = SUBNQN, *, hostnqn: str | None = None,
                    portid: int = PORTID, nr_io_queues: int = 1, queue_size: int = 32,
                    kato_ms: int = 0, **kw: Any) -> TcpHost:
        h = self.tcp_host(hostnqn, portid, **kw)
        h.connect(subnqn, nr_io_queues=nr_io_queues, queue_size=queue_size, kato_ms=kato_ms)
        return h

    def queues(self) -> int:
        return len(self.tcp.queues)

    def wait(self, cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.call(cond):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.01)

    # -- teardown -------------------------------------------------------------------------
    def leaks(self) -> list[str]:
        out = super().leaks()
        if self.tcp.queues:
            out.append(f"tcp transport still has {len(self.tcp.queues)} queues")
        return out

    def close(self) -> list[str]:
        for h in self.tcp_hosts:
            h.disconnect()
        try:
            self.wait(lambda: not self.target.controllers() and not self.tcp.queues,
                      "hosts' controllers and queues to go away")
        except AssertionError:
            pass  # reported as leaks below
        leaks = self.call(self.leaks)

        def shut() -> None:
            self.target.shutdown()
            self.tcp.close()
        self.call(shut)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CALL_TIMEOUT)
        self.loop.run_until_complete(asyncio.sleep(0))  # completions posted during shutdown
        self.loop.close()
        self.hosts.clear()
        for dev in self.loop_devices:
            _losetup("-d", dev)
        return leaks
