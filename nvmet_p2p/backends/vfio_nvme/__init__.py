"""The userspace NVMe driver: a PCIe NVMe controller owned through VFIO.

`vfio` owns the VFIO container, group and device (driver rebinding, BAR mmaps, DMA
maps), `nvme_pci` the controller's registers and queues (bring-up, commands, PRPs),
`backend` the namespace backend that issues I/O on it, P2P-capable through the CMB.
"""
