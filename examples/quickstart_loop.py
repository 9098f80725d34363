#!/usr/bin/env python3
"""Quick start without a VM or RDMA: a target with a 64 MiB memory namespace and the
Python NVMe-oF host, connected in one process over the loop transport.

    python examples/quickstart_loop.py
"""

import asyncio
import pathlib

from nvmet_p2p.backends import open_backend
from nvmet_p2p.config import jsonfile
from nvmet_p2p.core.target import Target
from nvmet_p2p.host.loop import LoopHost
from nvmet_p2p.p2p.policy import P2PPolicy
from nvmet_p2p.transports.loop import LoopTransport

CONFIG = pathlib.Path(__file__).with_name("memory.json")
NQN = "nqn.2026-11.io.example:mem"


def main() -> None:
    # the target is composed: how namespaces open their backends, which memory I/O uses
    target = Target(loop=asyncio.new_event_loop(), open_backend=open_backend, p2p=P2PPolicy())
    transport = LoopTransport(target)
    with target.root.transaction():  # all of the file or nothing
        target.root.restore(jsonfile.read_doc(CONFIG), source=str(CONFIG))
    host = LoopHost(target, transport, portid=1).connect(NQN)
    print("namespaces:", host.active_ns())
    host.write(1, 0, b"hello, nvmet-p2p".ljust(512, b"\0"))
    print("read back:", host.read(1, 0, 1)[:16])
    host.disconnect()
    target.shutdown()


if __name__ == "__main__":
    main()
