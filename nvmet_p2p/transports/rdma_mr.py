"""Registering a buffer provider's memory with an RDMA device, and why it failed when it did.

Owns the choice of verb per region, the MRs that result (`PoolRegistration`, made once per
device and provider, never per I/O) and the words a failure is reported in.  For each region
of a provider (`cmb.Provider.regions()`):

* the provider offers a dma-buf for it (`Provider.dmabuf(region)`) -> `ibv_reg_dmabuf_mr`
  (pyverbs `DmaBufMR`);
* otherwise -> `ibv_reg_mr` on the region's CPU mapping (pyverbs `MR(address=...)`).

A dma-buf failure is not retried with `ibv_reg_mr`: what gets exported as a dma-buf is BAR
memory, whose CPU mapping (VFIO, sysfs resource) is VM_IO|VM_PFNMAP, and `ib_umem_get`
cannot pin such a mapping on any kernel; a second try would only add a second failure.

The address an SGE carries differs by verb: an `ibv_reg_mr` MR is addressed by CPU virtual
address, while pyverbs 44 registers a dma-buf MR with iova = the offset in the dma-buf, so
`PoolRegistration.sge_addr` turns a chunk into the address its MR expects.

Any failure becomes a `RegistrationError` naming the verb, the provider, the device and the
OS error ("ibv_reg_mr on nvme-cmb 0000:00:0a.0/cmb failed on rxe0: [Errno 14] Bad
address"); `register_provider` hands that text back instead of raising, so the transport can
fall back to system memory with it.  What rxe (Linux 6.1) does is measured in
tests/transports/test_rdma_mr_vm.py and written down in README.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

from pyverbs.mr import MR, DmaBufMR  # type: ignore[import-untyped]

from nvmet_p2p.cmb import Chunk, Provider
from nvmet_p2p.errors import P2PError
from nvmet_p2p.transports.rdma_verbs import LOCAL_ACCESS

REG_MR = "ibv_reg_mr"
REG_DMABUF_MR = "ibv_reg_dmabuf_mr"


class RegistrationError(P2PError):
    """An RDMA device refused to register a provider's region; the text says which and why."""

    def __init__(self, verb: str, provider: Provider, region: int, device: str,
                 err: BaseException) -> None:
        self.verb, self.device, self.region = verb, device, region
        self.provider = provider.name
        self.errno, why = os_error(err)
        n = len(provider.regions())
        where = f" region {region} of {n}" if n > 1 else ""
        super().__init__(f"{verb} on {provider_label(provider)}{where} failed on {device}: "
                         f"{why}")


def provider_label(provider: Provider) -> str:
    """"nvme-cmb 0000:00:0a.0/cmb": kind and name, once when they are the same word."""
    kind = provider.kind
    return provider.name if not kind or kind == provider.name else f"{kind} {provider.name}"


def os_error(err: BaseException) -> tuple[int | None, str]:
    """(errno, "[Errno N] text") of a failed verb; pyverbs keeps the errno in error_code."""
    code = getattr(err, "error_code", None)  # PyverbsRDMAError
    if isinstance(err, OSError):
        code = err.errno
    if isinstance(code, int) and code > 0:
        return code, f"[Errno {code}] {os.strerror(code)}"
    return None, str(err) or type(err).__name__


@dataclass(frozen=True)
class Verbs:
    """The two registration calls; tests swap in fakes, the transport uses `PYVERBS`."""

    reg_mr: Callable[[Any, int, int, int], Any]  # (pd, length, access, cpu addr) -> MR
    reg_dmabuf_mr: Callable[[Any, int, int, int, int], Any]  # (pd, length, access, fd, off)


PYVERBS = Verbs(
    reg_mr=lambda pd, length, access, addr: MR(pd, length, access, address=addr),
    reg_dmabuf_mr=lambda pd, length, access, fd, off: DmaBufMR(pd, length, access,
                                                               dmabuf=fd, offset=off),
)


class PoolRegistration:
    """The MRs covering a buffer provider's regions: registered once, never per I/O.

    `lkeys[i]` and `verbs_used[i]` belong to region i; `sge_addr(chunk)` is the address an
    SGE uses for a chunk.  Raises `RegistrationError` (after closing what it had registered)
    when a region cannot be registered.
    """

    def __init__(self, pd: Any, provider: Provider, device: str, *,
                 access: int = LOCAL_ACCESS, verbs: Verbs = PYVERBS) -> None:
        self.provider = provider.name
        self.device = device
        self.mrs: list[Any] = []
        self.verbs_used: list[str] = []
        self._iova_base: list[int] = []  # what the MR calls the region's first byte
        for i, (addr, length, _view) in enumerate(provider.regions()):
            dmabuf = provider.dmabuf(i)
            verb = REG_MR if dmabuf is None else REG_DMABUF_MR
            try:
                if dmabuf is None:
                    mr = verbs.reg_mr(pd, length, access, addr)
                    base = addr
                else:
                    fd, offset = dmabuf
                    mr = verbs.reg_dmabuf_mr(pd, length, access, fd, offset)
                    base = offset  # pyverbs registers a dma-buf MR with iova = offset
            except Exception as err:  # pyverbs raises its own types, Cython TypeError etc.
                self.close()
                raise RegistrationError(verb, provider, i, device, err) from err
            self.mrs.append(mr)
            self.verbs_used.append(verb)
            self._iova_base.append(base)
        self.lkeys = [mr.lkey for mr in self.mrs]

    def sge_addr(self, chunk: Chunk) -> int:
        """The address of `chunk` in its region's MR (for an ibv_reg_mr MR: chunk.addr)."""
        return self._iova_base[chunk.region] + chunk.offset

    def close(self) -> None:
        while self.mrs:
            self.mrs.pop().close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def register_provider(pd: Any, provider: Provider, device: str, *,
                      access: int = LOCAL_ACCESS,
                      verbs: Verbs = PYVERBS) -> tuple[PoolRegistration | None, str]:
    """(registration, "") or (None, why): never raises for a refused registration.

    `device` is the RDMA device's name, used only in the reason.
    """
    try:
        return PoolRegistration(pd, provider, device, access=access, verbs=verbs), ""
    except RegistrationError as err:
        return None, str(err)
