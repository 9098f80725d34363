"""NVMe and nvmet limits and defaults: the one place each is defined.

As the kernel keeps them in include/linux/nvme.h and drivers/nvme/target/nvmet.h, every
layer (config, core, transports, backends, host) imports them from here, under the
kernel's names.  Each carries the reason for its value.
"""

from __future__ import annotations

# -- names and identifiers ---------------------------------------------------------------

# NVMe base spec 4.5: an NQN is at most 223 bytes of UTF-8 (its field is 256 bytes).
NVMF_NQN_SIZE = 223
# The well-known discovery subsystem NQN (NVMe base spec 4.5.1).
NVME_DISC_SUBSYS_NAME = "nqn.2014-08.org.nvmexpress.discovery"
# Controller IDs 0xFFF0..0xFFFF are reserved; 0 is never handed out by the kernel.
NVME_CNTLID_MIN = 1
NVME_CNTLID_MAX = 0xFFEF
# The host asks for "any controller" at admin Connect: the dynamic controller model,
# the only one we (and the kernel) offer; the discovery log says so per entry too.
NVME_CNTLID_DYNAMIC = 0xFFFF
# 0xFFFFFFFF is the broadcast NSID, so the largest a namespace can have is one less.
NVME_NSID_ALL = 0xFFFFFFFF
NVME_NSID_MAX = 0xFFFFFFFE
# Identify Controller's SN, MN and FR fields (ASCII, space padded).
NVMET_SN_MAX_SIZE = 20
NVMET_MN_MAX_SIZE = 40
NVMET_FR_MAX_SIZE = 8
# configfs addr_traddr / addr_trsvcid sizes (the discovery log entry fields).
NVMF_TRADDR_SIZE = 256
NVMF_TRSVCID_SIZE = 32
# IANA port for NVMe over Fabrics on RDMA and TCP; configfs leaves trsvcid empty.
NVME_RDMA_IP_PORT = 4420

# -- queues --------------------------------------------------------------------------------

# Admin queue entries: the Linux host asks for exactly this, the discovery log advertises
# it as ASQSZ, and our own userspace NVMe driver uses it for its admin queue.
NVME_AQ_DEPTH = 32
# The most I/O queues a controller may have (configfs attr_qid_max's bound); larger qids
# are refused at RDMA CM time.
NVMET_NR_QUEUES = 128
# Bounds of a port's param_max_queue_size, and so of CAP.MQES + 1.
NVMET_MIN_QUEUE_SIZE = 16
NVMET_MAX_QUEUE_SIZE = 1024
# param_max_queue_size = -1 ("transport default"): nvmet-rdma's NVME_RDMA_MAX_QUEUE_SIZE.
NVMET_DEFAULT_MAX_QUEUE_SIZE = 128

# -- data transfer -------------------------------------------------------------------------

# CAP.MPSMIN: 4 KiB memory pages, the unit of MDTS.
NVMET_PAGE_SIZE = 4096
# MDTS 2^8 pages = 1 MiB per command, as nvmet-rdma (NVMET_RDMA_MAX_MDTS).
NVMET_RDMA_MAX_MDTS = 8
NVMET_MAX_TRANSFER = NVMET_PAGE_SIZE << NVMET_RDMA_MAX_MDTS
# In-capsule data on I/O queues: nvmet-rdma offers at most 16 KiB (at 4 KiB pages) and
# one page by default (param_inline_data_size = -1).  Admin queues carry none.
NVMET_RDMA_MAX_INLINE_DATA_SIZE = 16384
NVMET_RDMA_DEFAULT_INLINE_DATA_SIZE = NVMET_PAGE_SIZE
# nvmet-tcp's default in-capsule data on I/O queues (param_inline_data_size = -1): 4 pages.
NVMET_TCP_DEF_INLINE_DATA_SIZE = 4 * NVMET_PAGE_SIZE

# -- namespaces and logs -------------------------------------------------------------------

# NN and MNAN: a list of NSIDs must fit in one 4 KiB page (Identify CNS 02h).
NVMET_MAX_NAMESPACES = 1024
# The changed namespace log is one page of NSIDs; past it, the sole entry 0xFFFFFFFF.
NVME_MAX_CHANGED_NAMESPACES = 1024
# ANA group IDs 1..128; group 1 always exists.
NVMET_MAX_ANAGRPS = 128
# Error log entries kept per controller (Identify ELPE + 1).
NVMET_ERROR_LOG_SLOTS = 128
# param_error_location when no field of the command is to blame.
NVMET_NO_ERROR_LOC = 0xFFFF
# Outstanding Asynchronous Event Requests a controller holds (Identify AERL + 1).
NVMET_ASYNC_EVENTS = 4

# -- keep-alive ----------------------------------------------------------------------------

# Identify KAS: keep-alive granularity in 100 ms units (10: 1 s).
NVMET_KAS = 10
# A discovery controller whose host asked for kato 0 still times out, after 120 s, so a
# vanished host does not pin it forever.
NVMET_DISC_KATO_MS = 120_000

# -- bounds of our own (the kernel target has neither) ------------------------------------

# Controllers one host NQN may hold in one subsystem.  The kernel lets a host take every
# cntlid; a host that connects with kato 0 and never enables (or vanishes without the
# transport noticing) would then lock every other host out.  The Linux host makes one
# controller per path, so 32 leaves room for any real multipath setup.
NVMET_P2P_MAX_CTRLS_PER_HOST = 32
# Seconds a controller may stay connected without being ready (never enabled, or reset
# or shut down and not enabled again) before it is torn down.  The Linux host enables
# within milliseconds of Connect and waits CAP.TO (7.5 s) for RDY; 60 s is far beyond.
NVMET_P2P_ENABLE_TIMEOUT_S = 60.0

# -- I/O command fields ----------------------------------------------------------------------

# Force Unit Access: the kernel's NVME_RW_FUA is bit 14 of the 16-bit control field,
# which is bit 30 of CDW12.
NVME_RW_FUA = 1 << 30
# Dataset Management CDW11 attribute Deallocate.
NVME_DSMGMT_AD = 1 << 2
# Dataset Management NR is 0's based in 8 bits: at most 256 ranges of 16 bytes.
NVME_DSM_MAX_RANGES = 256
