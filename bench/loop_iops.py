"""4 KiB reads at queue depth 32 through the core and the loop transport.

With the default memory namespace this is what the protocol engine costs per command,
with no fabric and no media.  `--backend file --path F` or `--backend vfio-nvme --path
BDF [--p2p]` (inside the VM: the QEMU NVMe with its CMB) compare namespace backends on
the same path; `--p2p` sets allow_p2pmem on the port so data buffers come from the CMB.

    .venv/bin/python bench/loop_iops.py [--seconds 5] [--qd 32] [--bs 4096] [--json]
        [--backend memory|file|vfio-nvme] [--path PATH] [--p2p]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from nvmet_p2p.backends import open_backend
from nvmet_p2p.core.target import Target
from nvmet_p2p.host.loop import LoopHost
from nvmet_p2p.p2p.policy import P2PPolicy
from nvmet_p2p.transports.loop import LoopTransport
from nvmet_p2p.wire.command import IoOpcode, Sqe

SUBNQN = "nqn.2026-11.io.nvmet-p2p:bench"


def build(loop: asyncio.AbstractEventLoop, size: int, backend: str = "memory",
          path: str = "bench0", p2p: bool = False) -> tuple[Target, LoopTransport]:
    target = Target(loop=loop, open_backend=open_backend, p2p=P2PPolicy())
    transport = LoopTransport(target)
    root = target.root
    subsys = root.create_subsystem(SUBNQN)
    subsys.attr_allow_any_host = True
    ns = subsys.create_namespace(1)
    ns.device_backend, ns.device_path = backend, path
    if backend == "memory":
        ns.device_size = size
    ns.enable = True
    port = root.create_port(1)
    port.addr_trtype = "loop"
    port.attr_allow_p2pmem = p2p
    port.link_subsystem(SUBNQN)
    return target, transport


def run(seconds: float, qd: int, bs: int, backend: str = "memory", path: str = "bench0",
        p2p: bool = False) -> dict:
    loop = asyncio.new_event_loop()
    target, transport = build(loop, 256 << 20, backend, path, p2p)
    size = target.get_subsys(SUBNQN).ns[1].nblocks * 512
    host = LoopHost(target, transport, 1).connect(SUBNQN, nr_io_queues=1, queue_size=qd + 1)
    q = host.io[1]
    nblocks, nlb = size // 512, bs // 512
    rng = int.from_bytes(os.urandom(4), "little")

    def submit():
        nonlocal rng
        rng = (rng * 1103515245 + 12345) & 0x7FFFFFFF
        slba = (rng % (nblocks // nlb)) * nlb
        return q.submit(Sqe(opcode=IoOpcode.READ, nsid=1, cdw10=slba, cdw12=nlb - 1),
                        read_len=bs)

    inflight = [submit() for _ in range(qd)]
    done = errors = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for i, p in enumerate(inflight):
            cqe, _ = q.wait(p)
            errors += cqe.status != 0
            done += 1
            inflight[i] = submit()
    elapsed = time.perf_counter() - start
    for p in inflight:
        q.wait(p)
    stats = target.get_subsys(SUBNQN).ns[1].stats
    host.disconnect()
    target.shutdown()
    loop.close()
    return {"job": f"loop {bs // 1024}k randread QD{qd}", "backend": backend, "p2p": p2p,
            "commands": done, "errors": errors, "seconds": round(elapsed, 3),
            "iops": round(done / elapsed), "us_per_cmd": round(elapsed / done * 1e6, 2),
            "p2p_bytes": stats["p2p_bytes"], "sysmem_reqs": stats["sysmem_reqs"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--bs", type=int, default=4096)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--backend", default="memory", choices=["memory", "file", "vfio-nvme"])
    ap.add_argument("--path", default="bench0", help="file path or PCI BDF for the backend")
    ap.add_argument("--p2p", action="store_true", help="allow_p2pmem=1 on the port")
    args = ap.parse_args()
    res = run(args.seconds, args.qd, args.bs, args.backend, args.path, args.p2p)
    print(json.dumps(res) if args.json else
          f"{res['job']} ({res['backend']}{', P2P' if res['p2p'] else ''}): {res['iops']:,} "
          f"commands/s ({res['us_per_cmd']} us/command, {res['errors']} errors, "
          f"{res['commands']:,} commands in {res['seconds']} s, P2P bytes {res['p2p_bytes']})")


if __name__ == "__main__":
    main()
