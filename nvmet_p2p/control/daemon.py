"""The target process: event loop, transports, configuration, signals, control socket.

`nvmet-p2p serve --config FILE` restores the configuration (nvmetcli JSON plus our
attributes) into a live `Target`, runs until SIGTERM/SIGINT, and then tears every
controller down so hosts see a disconnect rather than a hang.  SIGUSR1 logs the
status (controllers, queues, namespaces, resource counts) as JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from typing import Any

from nvmet_p2p.backends import open_backend
from nvmet_p2p.config import jsonfile
from nvmet_p2p.core.target import Target
from nvmet_p2p.core.transport import TransportOps
from nvmet_p2p.errors import ConfigError, NvmetError
from nvmet_p2p.p2p.policy import P2PPolicy
from nvmet_p2p.transports.loop import LoopTransport

log = logging.getLogger("nvmet_p2p.daemon")

TICK_S = 1.0  # keep-alive granularity (KAS is 1 s)


def _rdma_transport(target: Target) -> TransportOps | None:
    """The RDMA transport, if this machine has pyverbs; None (and why) otherwise."""
    try:
        from nvmet_p2p.rdma import RdmaTransport
    except ImportError as e:
        log.info("rdma transport unavailable: %s", e)
        return None
    return RdmaTransport(target)


class Daemon:
    def __init__(self, config_path: str | None, rpc_socket: str | None = None) -> None:
        self.config_path = config_path
        self.rpc_socket = rpc_socket
        self.loop = asyncio.new_event_loop()
        self.p2p = P2PPolicy()
        self.target = Target(loop=self.loop, open_backend=open_backend, p2p=self.p2p)
        self.transports: list[TransportOps] = [LoopTransport(self.target)]
        rdma = _rdma_transport(self.target)
        if rdma is not None:
            self.transports.append(rdma)
        self.rpc: Any = None
        self._stopping = asyncio.Event()

    def load(self) -> None:
        """Restore the configuration file; on any error nothing stays live."""
        if not self.config_path:
            return
        doc = jsonfile.read_doc(self.config_path)
        try:
            self.target.root.restore(doc, source=self.config_path)
        except ConfigError:
            self.target.root.clear()
            raise

    def status(self) -> dict:
        return self.target.status()

    def _tick(self) -> None:
        self.target.tick()
        self.loop.call_later(TICK_S, self._tick)

    def _dump_status(self) -> None:
        log.warning("status: %s", json.dumps(self.status(), default=str))

    def stop(self) -> None:
        self._stopping.set()

    async def _main(self) -> None:
        self.load()
        if self.rpc_socket:
            from nvmet_p2p.control.rpc import RpcServer

            self.rpc = RpcServer(self, self.rpc_socket)
            await self.rpc.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stop)
        self.loop.add_signal_handler(signal.SIGUSR1, self._dump_status)
        self.loop.call_later(TICK_S, self._tick)
        log.info("nvmet-p2p serving (%d ports listening)", len(self.target.listening))
        await self._stopping.wait()
        log.info("shutting down")

    def run(self) -> int:
        try:
            self.loop.run_until_complete(self._main())
        except NvmetError as e:
            log.error("%s", e)
            return 1
        finally:
            self.close()
        return 0

    def close(self) -> None:
        if self.rpc is not None:
            self.loop.run_until_complete(self.rpc.close())
            self.rpc = None
        self.target.shutdown()
        for t in self.transports:
            t.close()
        self.p2p.close()
        # let completions posted by backend threads during teardown run
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
