"""The userspace NVMe driver: a PCIe NVMe controller owned through VFIO.

`vfio` owns the VFIO container, group and device (driver rebinding, BAR mmaps, DMA
maps), `nvme_pci` the controller's registers and queues (bring-up, commands, PRPs),
`controller` brings that controller up and down (reset, admin queue, Identify, the
queue pair, the CMB), `backend` is the namespace backend that issues I/O on it, with
deadlines and recovery, P2P-capable through the CMB.
"""
