"""Baseline: fio against the Linux kernel target (nvmet-rdma over rxe0), run inside the VM.

From the host:
    python -m nvmet_p2p.testbed.vm run --cmb -- python tools/vm/kernel_target_fio.py --runtime 10
Prints one JSON line: the job, IOPS, bandwidth and mean completion latency.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nvmet_p2p.testbed import guest
from nvmet_p2p.testbed.kernel_target import KernelTarget

SUBNQN = "nqn.2014-08.org.nvmexpress:nvmet-p2p-kernel-baseline"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:5f1c1c3e-6a3a-4d4e-9e0c-0b5a1e4d2cff"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rw", default="randread")
    p.add_argument("--bs", default="4k")
    p.add_argument("--iodepth", type=int, default=32)
    p.add_argument("--runtime", type=int, default=10)
    p.add_argument("--size", default="256M", help="namespace size when backed by /dev/shm")
    p.add_argument("--backing", choices=("shm", "cmb-nvme"), default="shm",
                   help="a tmpfs file (buffered_io) or the QEMU NVMe's block device")
    args = p.parse_args(argv)

    guest.setup_rxe()
    if args.backing == "shm":
        size = int(args.size.rstrip("M")) << 20
        device, buffered = guest.shm_file("kernel-baseline.img", size), True
    else:
        bdf = guest.cmb_nvme_bdf()
        [ctrl] = (Path("/sys/bus/pci/devices") / bdf / "nvme").iterdir()
        device, buffered = f"/dev/{ctrl.name}n1", None
    with KernelTarget(SUBNQN, device, buffered_io=buffered):
        guest.nvme_connect(SUBNQN, hostnqn=HOSTNQN)
        try:
            bdev = guest.namespace_block_device(SUBNQN)
            res = guest.run_fio([
                "--name=baseline", f"--filename={bdev}", f"--rw={args.rw}", f"--bs={args.bs}",
                f"--iodepth={args.iodepth}", "--ioengine=libaio", "--direct=1",
                "--time_based", f"--runtime={args.runtime}", "--ramp_time=2",
                "--group_reporting"], timeout=args.runtime + 120)
        finally:
            guest.nvme_disconnect(SUBNQN)
    ddir = "write" if "write" in args.rw else "read"
    [job] = res["jobs"]
    print(json.dumps({
        "target": "kernel nvmet-rdma", "backing": args.backing, "rw": args.rw, "bs": args.bs,
        "iodepth": args.iodepth, "runtime_s": args.runtime,
        "iops": round(guest.fio_iops(res, ddir)),
        "bw_MBps": round(guest.fio_bw_bytes(res, ddir) / 1e6, 1),
        "clat_mean_us": round(job[ddir]["clat_ns"]["mean"] / 1000, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
