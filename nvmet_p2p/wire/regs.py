"""NVMe controller registers: offsets and bit fields (NVMe base spec 1.4, §3.1).

The same registers are MMIO in a PCIe controller's BAR0 (the userspace driver) and
properties reached with Property Get/Set over fabrics (the target's controllers).
"""

REG_CAP = 0x00
REG_VS = 0x08
REG_INTMS = 0x0C
REG_CC = 0x14
REG_CSTS = 0x1C
REG_AQA = 0x24
REG_ASQ = 0x28
REG_ACQ = 0x30
REG_CMBLOC = 0x38
REG_CMBSZ = 0x3C
REG_CMBMSC = 0x50
REG_CMBSTS = 0x58
REG_DBS = 0x1000  # first doorbell (PCIe only)

CC_EN = 1 << 0
CC_CSS_NVM = 0 << 4
CC_SHN_NORMAL = 1 << 14
CC_SHN_MASK = 3 << 14
CC_IOSQES = 6 << 16  # 64-byte SQEs
CC_IOCQES = 4 << 20  # 16-byte CQEs

CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_MASK = 3 << 2
CSTS_SHST_CMPLT = 2 << 2

CMBMSC_CRE = 1 << 0
CMBMSC_CMSE = 1 << 1
CMBSTS_CBAI = 1 << 0
