"""Namespace backends and `open_backend`, the factory that turns a device path into one.

The factory owns validating what the operator configured (block size, size,
create, the kind of object at the path, the PCI address of a vfio-nvme controller)
and saying what to fix when it is wrong; each backend module owns its own I/O.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Any

from nvmet_p2p import logfmt
from nvmet_p2p.backends.base import Backend, Completion
from nvmet_p2p.backends.bdev import BdevBackend, open_bdev
from nvmet_p2p.backends.file import CompletionLoop, FileBackend, open_file
from nvmet_p2p.backends.memory import MemoryBackend
from nvmet_p2p.errors import BackendError, P2PError

__all__ = ["Backend", "BdevBackend", "Completion", "CompletionLoop", "FileBackend",
           "MemoryBackend", "open_backend"]

log = logging.getLogger("nvmet_p2p.backend")

KINDS = ("auto", "file", "bdev", "memory", "vfio-nvme")
BLOCK_SIZES = (512, 4096)  # the LBA formats the target advertises


def open_backend(path: str, *, kind: str = "auto", block_size: int = 512,
                 size: int | None = None, create: bool = False, buffered_io: bool = False,
                 loop: CompletionLoop) -> Backend:
    """Open the namespace backend for ``path``; BackendError says what is wrong.

    kind "auto" picks "bdev" for a block device and "file" for a regular file.
    "memory" is only ever chosen explicitly: it needs ``size`` and ``path`` is just
    a label.  ``size`` and ``create`` make a missing file (sparse); an existing one
    is used at its own size.  ``loop`` receives completions of blocking backends.
    "vfio-nvme" is only chosen explicitly: ``path`` is the controller's PCI address,
    the controller is taken from its kernel driver (given back at close) and its
    completions are polled on ``loop``.
    """
    if block_size not in BLOCK_SIZES:
        raise BackendError(f"block_size {block_size} is not supported: use 512 or 4096")
    if kind not in KINDS:
        raise BackendError(f"unknown backend kind {kind!r}: use one of {', '.join(KINDS)}")
    if size is not None and (size <= 0 or size % block_size):
        raise BackendError(f"size {size} is not a positive multiple of "
                           f"block_size {block_size}")
    if kind == "memory":
        if size is None:
            raise BackendError(f"memory namespace {path!r} needs a size (set device.size)")
        return MemoryBackend(path, size, block_size)
    if not path:
        raise BackendError("no device path is set (set device.path)")
    if kind == "vfio-nvme":
        return open_vfio_nvme(path, block_size=block_size, size=size, loop=loop)
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        if kind == "bdev":
            raise BackendError(f"block device {path} does not exist") from e
        if not create:
            raise BackendError(f"{path} does not exist; set device.create=1 and "
                               f"device.size to create it") from e
        if size is None:
            raise BackendError(f"{path} does not exist and creating it needs a size; "
                               f"set device.size") from e
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise BackendError(f"cannot create {path}: directory {parent} "
                               f"does not exist") from e
        return open_file(path, block_size=block_size, size=size, create=True,
                         buffered_io=buffered_io, loop=loop)
    except PermissionError as e:
        raise BackendError(f"permission denied looking up {path}") from e
    except NotADirectoryError as e:
        raise BackendError(f"{path}: a component of the path is not a directory") from e
    except OSError as e:
        raise BackendError(f"cannot look up {path}: {e.strerror}") from e

    if stat.S_ISDIR(st.st_mode):
        raise BackendError(f"{path} is a directory, not a file or block device")
    if stat.S_ISBLK(st.st_mode):
        if kind == "file":
            raise BackendError(f"{path} is a block device, not a file; use kind bdev or auto")
        if size is not None:
            logfmt.warning(log, "size_ignored", path=path,
                           reason="a block device has its own capacity")
        return open_bdev(path, st.st_rdev, block_size=block_size, buffered_io=buffered_io,
                         loop=loop)
    if stat.S_ISREG(st.st_mode):
        if kind == "bdev":
            raise BackendError(f"{path} is a regular file, not a block device; "
                               f"use kind file or auto")
        return open_file(path, block_size=block_size, size=size, create=False,
                         buffered_io=buffered_io, loop=loop)
    raise BackendError(f"{path} is neither a regular file nor a block device")


def open_vfio_nvme(path: str, *, block_size: int, size: int | None, loop: Any) -> Backend:
    """Namespace 1 of the PCIe NVMe controller at PCI address ``path``, through VFIO."""
    from nvmet_p2p.pci import normalize_bdf

    bdf = normalize_bdf(path)
    if bdf is None:
        raise BackendError(f"{path!r} is not a PCI address: a vfio-nvme namespace needs "
                           f"device.path set to the controller's address, e.g. 0000:00:0a.0 "
                           f"(see lspci -D)")
    # Imported here: the VFIO driver needs numpy and ioctls no other backend does.
    from nvmet_p2p.backends.vfio_nvme.backend import VfioNvmeBackend

    try:
        backend = VfioNvmeBackend(bdf)
    except P2PError as e:
        raise BackendError(f"cannot take NVMe controller {bdf} through VFIO: {e} (needs "
                           f"root, vfio-pci and an IOMMU: boot with intel_iommu=on)") from e
    except BackendError as e:
        raise BackendError(f"NVMe controller {bdf} through VFIO: {e}") from e
    if size is not None:
        logfmt.warning(log, "size_ignored", bdf=bdf,
                       reason="a vfio-nvme namespace has the controller's capacity")
    if block_size != backend.block_size:
        logfmt.warning(log, "block_size_ignored", bdf=bdf, block_size=block_size,
                       formatted=backend.block_size,
                       reason="the controller's namespace is formatted with other blocks")
    if hasattr(loop, "call_later"):  # an asyncio loop: poll on it while I/O is in flight
        backend.attach(loop)
    return backend
