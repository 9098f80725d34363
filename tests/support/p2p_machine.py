"""A synthetic PCI machine in a sysfs tree for P2P policy and topology tests."""

from __future__ import annotations

from pathlib import Path

from tests.support.sysfs_tree import SysfsTree

INTEL = "GenuineIntel:6"
AMD_ZEN = "AuthenticAMD:25"
NOT_PCI = "cannot be used for peer-to-peer DMA"


# -- a synthetic machine -------------------------------------------------------------------

class Machine:
    """root bus 00 (q35 host bridge, not whitelisted) -> root port -> switch with 4 DSPs.

    nvme: the namespace's controller (DSP 0, function 0); nvme_fn1: a second function of
    the same device (distance 2 from nvme); peer1, peer2: endpoints under DSPs 1 and 2
    (distance 4); nic: a hardware RDMA NIC under DSP 3 (mlx5_0 on eth0); far: an endpoint
    under a second root port (crosses the host bridge); rxe0 on dummy0.
    """

    def __init__(self, root: Path) -> None:
        self.tree = t = SysfsTree(root)
        self.root = str(root)
        rb = t.root_bus(0, 0)
        t.host_bridge(rb)
        rp = t.root_port(rb, 1)
        _, dsps = t.switch(rp, 4)
        self.nvme_fn = t.endpoint(dsps[0])
        self.nvme = self.nvme_fn.bdf
        self.nvme_fn1 = t.endpoint(dsps[0], 0, 1).bdf
        self.peer1_fn = t.endpoint(dsps[1])
        self.peer1 = self.peer1_fn.bdf
        self.peer2_fn = t.endpoint(dsps[2])
        self.peer2 = self.peer2_fn.bdf
        self.nic_fn = nic = t.endpoint(dsps[3], vendor=0x15B3, device=0x1017,
                                       class_code=0x020000)
        self.nic = nic.bdf
        t.infiniband("mlx5_0", nic)
        t.netdev("eth0", nic)
        rp2 = t.root_port(rb, 2)
        self.far = t.endpoint(rp2).bdf
        t.netdev("dummy0")
        t.rxe("rxe0", "dummy0")

    def bar(self, bdf: str, bar: int, size: int, start: int = 0xFE00_0000) -> None:
        """A prefetchable memory BAR whose resourceN is a regular file of `size` bytes."""
        d = Path(self.root) / "bus/pci/devices" / bdf
        lines = ["0x0000000000000000 0x0000000000000000 0x0000000000000000"] * 6
        lines[bar] = f"0x{start:016x} 0x{start + size - 1:016x} 0x000000000014220c"
        (d / "resource").write_text("\n".join(lines) + "\n")
        with open(d / f"resource{bar}", "wb") as f:
            f.truncate(size)
