"""Registering provider memory for RDMA without a device: which verb each region gets, the
SGE addresses, the reason texts, and that nothing leaks or raises on the way out.  The real
verbs on rxe are exercised in tests/test_rdma_mr_vm.py."""

from __future__ import annotations

import errno

import pytest

pytest.importorskip("pyverbs.mr", reason="pyverbs (python3-pyverbs) is not installed")

from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError

from nvmet_p2p.cmb import SystemMemoryProvider
from nvmet_p2p.errors import P2PError
from nvmet_p2p.transports import rdma_verbs
from nvmet_p2p.transports.rdma_mr import (
    REG_DMABUF_MR,
    REG_MR,
    PoolRegistration,
    RegistrationError,
    Verbs,
    os_error,
    register_provider,
)

DEV = "rxe0"
PD = object()  # the fakes only pass it through
SLAB = 1 << 20


class FakeMR:
    keys = iter(range(0x100, 0x10000))

    def __init__(self, calls: list, verb: str, args: tuple) -> None:
        self.lkey = next(FakeMR.keys)
        self.closed = 0
        self.verb, self.args = verb, args
        calls.append(self)

    def close(self) -> None:
        self.closed += 1


class FakeVerbs:
    """Records every registration; `fail` maps (verb, call number) -> exception to raise."""

    def __init__(self, fail: dict[tuple[str, int], BaseException] | None = None) -> None:
        self.mrs: list[FakeMR] = []
        self.calls: list[tuple] = []
        self.fail = fail or {}

    def _reg(self, verb: str, args: tuple) -> FakeMR:
        n = sum(1 for c in self.calls if c[0] == verb)
        self.calls.append((verb, *args[1:]))
        if (verb, n) in self.fail:
            raise self.fail[(verb, n)]
        return FakeMR(self.mrs, verb, args)

    def verbs(self) -> Verbs:
        return Verbs(reg_mr=lambda *a: self._reg(REG_MR, a),
                     reg_dmabuf_mr=lambda *a: self._reg(REG_DMABUF_MR, a))


class DmabufOffering(SystemMemoryProvider):
    """System memory whose listed regions pretend to come with a dma-buf (fd, offset)."""

    kind = "nvme-cmb"

    def __init__(self, offers: dict[int, tuple[int, int]], slabs: int = 2) -> None:
        super().__init__(slabs * SLAB, hugepages=False, slab_size=SLAB, name="0000:00:0a.0/cmb")
        self.offers = offers

    def dmabuf(self, region: int) -> tuple[int, int] | None:
        return self.offers.get(region)


@pytest.fixture
def system():
    p = SystemMemoryProvider(2 * SLAB, hugepages=False, slab_size=SLAB)
    yield p
    p.close()


def test_no_provider_offers_a_dmabuf_by_default(system):
    assert [system.dmabuf(i) for i in range(len(system.regions()))] == [None, None]


def test_system_memory_one_reg_mr_per_region(system):
    fv = FakeVerbs()
    with PoolRegistration(PD, system, DEV, verbs=fv.verbs()) as reg:
        regions = system.regions()
        assert fv.calls == [(REG_MR, length, rdma_verbs.LOCAL_ACCESS, addr)
                            for addr, length, _ in regions]
        assert reg.verbs_used == [REG_MR, REG_MR]
        assert reg.lkeys == [mr.lkey for mr in fv.mrs]
        chunks = [system.alloc(SLAB), system.alloc(4096)]
        assert [c.region for c in chunks] == [0, 1]
        assert [reg.sge_addr(c) for c in chunks] == [c.addr for c in chunks]
    assert [mr.closed for mr in fv.mrs] == [1, 1]
    reg.close()  # idempotent: nothing closed twice
    assert [mr.closed for mr in fv.mrs] == [1, 1]


def test_dmabuf_first_and_no_reg_mr_for_that_region():
    p = DmabufOffering({0: (17, 0x3000)})
    fv = FakeVerbs()
    try:
        reg = PoolRegistration(PD, p, DEV, verbs=fv.verbs())
        (addr1, len1, _) = p.regions()[1]
        assert fv.calls == [(REG_DMABUF_MR, SLAB, rdma_verbs.LOCAL_ACCESS, 17, 0x3000),
                            (REG_MR, len1, rdma_verbs.LOCAL_ACCESS, addr1)]
        assert reg.verbs_used == [REG_DMABUF_MR, REG_MR]
        a, b = p.alloc(SLAB // 2), p.alloc(SLAB // 2)  # both in region 0
        assert (a.region, b.region) == (0, 0)
        # The dma-buf MR is addressed from its offset in the dma-buf, not by CPU address.
        assert [reg.sge_addr(c) for c in (a, b)] == [0x3000 + a.offset, 0x3000 + b.offset]
        c = p.alloc(SLAB)
        assert c.region == 1 and reg.sge_addr(c) == c.addr
        reg.close()
    finally:
        p.close()


def test_reason_carries_verb_provider_device_and_os_error():
    p = DmabufOffering({}, slabs=1)
    efault = PyverbsRDMAError("Failed to register a MR", errno.EFAULT)
    try:
        reg, why = register_provider(PD, p, DEV, verbs=FakeVerbs({(REG_MR, 0): efault}).verbs())
        assert reg is None
        assert why == "ibv_reg_mr on nvme-cmb 0000:00:0a.0/cmb failed on rxe0: " \
                      "[Errno 14] Bad address"
        with pytest.raises(RegistrationError) as ei:
            PoolRegistration(PD, p, DEV, verbs=FakeVerbs({(REG_MR, 0): efault}).verbs())
    finally:
        p.close()
    err = ei.value
    assert isinstance(err, P2PError)
    assert (err.verb, err.provider, err.device, err.region, err.errno) == \
        (REG_MR, "0000:00:0a.0/cmb", DEV, 0, errno.EFAULT)


def test_dmabuf_failure_is_not_retried_with_reg_mr():
    p = DmabufOffering({0: (5, 0), 1: (5, SLAB)})
    eop = PyverbsRDMAError("Failed to register a dma-buf MR", errno.EOPNOTSUPP)
    fv = FakeVerbs({(REG_DMABUF_MR, 1): eop})
    try:
        reg, why = register_provider(PD, p, DEV, verbs=fv.verbs())
    finally:
        p.close()
    assert reg is None
    assert why == "ibv_reg_dmabuf_mr on nvme-cmb 0000:00:0a.0/cmb region 1 of 2 failed on " \
                  "rxe0: [Errno 95] Operation not supported"
    assert [c[0] for c in fv.calls] == [REG_DMABUF_MR, REG_DMABUF_MR]
    assert [mr.closed for mr in fv.mrs] == [1]  # region 0's MR went back


def test_partial_failure_closes_what_was_registered(system):
    fv = FakeVerbs({(REG_MR, 1): PyverbsRDMAError("Failed to register a MR", errno.ENOMEM)})
    reg, why = register_provider(PD, system, DEV, verbs=fv.verbs())
    assert reg is None
    assert why == "ibv_reg_mr on system region 1 of 2 failed on rxe0: " \
                  "[Errno 12] Cannot allocate memory"
    assert len(fv.mrs) == 1 and fv.mrs[0].closed == 1


@pytest.mark.parametrize("err,code,text", [
    (PyverbsRDMAError("Failed to register a MR", errno.EFAULT), 14, "[Errno 14] Bad address"),
    (OSError(errno.EPERM, "Operation not permitted"), 1, "[Errno 1] Operation not permitted"),
    (PyverbsUserError("Invalid access flags"), None, "Invalid access flags"),
    (PyverbsRDMAError("Failed to register a MR"), None, "Failed to register a MR"),  # no errno
    (TypeError(), None, "TypeError"),
])
def test_os_error_texts(err, code, text):
    assert os_error(err) == (code, text)


def test_any_verb_exception_becomes_a_reason(system):
    fv = FakeVerbs({(REG_MR, 0): TypeError("an integer is required")})
    reg, why = register_provider(PD, system, DEV, verbs=fv.verbs())
    assert reg is None
    assert why == "ibv_reg_mr on system region 0 of 2 failed on rxe0: an integer is required"


def test_success_returns_no_reason(system):
    fv = FakeVerbs()
    reg, why = register_provider(PD, system, DEV, verbs=fv.verbs())
    assert why == "" and reg is not None and len(reg.mrs) == 2
    reg.close()
