"""The host side of the loop transport: a `Host` whose queues are in-process connections.

Host buffers are registered in the transport's `MemoryRegistry` and named by keyed
SGLs, so the target moves data the way it does over RDMA.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from nvmet_p2p.host.base import Host, HostQueue
from nvmet_p2p.transports.loop import MemoryRegistry
from nvmet_p2p.wire.command import Sgl, SglType

if TYPE_CHECKING:
    from nvmet_p2p.core.target import Target
    from nvmet_p2p.transports.loop import LoopConnection, LoopTransport


class LoopQueue(HostQueue):
    def __init__(self, host: LoopHost, qid: int, size: int) -> None:
        super().__init__(qid, size)
        self.host = host
        self.conn: LoopConnection = host.transport.connect(host.portid, host.mem, self.on_cqe,
                                                           qid, size)
        self._waiter: asyncio.Future | None = None

    def on_cqe(self, raw: bytes) -> None:
        super().on_cqe(raw)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def send(self, capsule: bytes) -> None:
        self.conn.submit(capsule)

    def progress(self, timeout: float) -> None:
        loop = self.host.target.loop
        self._waiter = loop.create_future()
        try:
            loop.run_until_complete(asyncio.wait_for(asyncio.shield(self._waiter), timeout))
        except TimeoutError:
            pass
        finally:
            self._waiter = None

    def expose(self, buf: bytearray, invalidate: bool = False) -> Sgl:
        key = self.host.mem.register(buf)
        t = SglType.KEYED_DATA_BLOCK_INV if invalidate else SglType.KEYED_DATA_BLOCK
        return Sgl(t, 0, len(buf), key)

    def unexpose(self, sgl: Sgl) -> None:
        self.host.mem.deregister(sgl.key)

    def close(self) -> None:
        self.conn.disconnect()

    @property
    def connected(self) -> bool:
        return self.conn.connected


class LoopHost(Host):
    def __init__(self, target: Target, transport: LoopTransport, portid: int,
                 hostnqn: str | None = None, hostid: bytes | None = None) -> None:
        super().__init__(hostnqn, hostid)
        self.target = target
        self.transport = transport
        self.portid = portid
        self.mem: MemoryRegistry = MemoryRegistry()

    def open_queue(self, qid: int, size: int) -> LoopQueue:
        return LoopQueue(self, qid, size)

