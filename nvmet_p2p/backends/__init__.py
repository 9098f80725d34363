"""Namespace backends and `open_backend`, the factory that turns a device path into one.

The factory owns validating what the operator configured (block size, size,
create, the kind of object at the path) and saying what to fix when it is wrong;
each backend module owns its own I/O.
"""

from __future__ import annotations

import logging
import os
import stat

from ..errors import BackendError
from .base import Backend, Completion
from .bdev import BdevBackend, open_bdev
from .file import CompletionLoop, FileBackend, open_file
from .memory import MemoryBackend

__all__ = ["Backend", "BdevBackend", "Completion", "CompletionLoop", "FileBackend",
           "MemoryBackend", "open_backend"]

log = logging.getLogger("nvmet_p2p.backend")

KINDS = ("auto", "file", "bdev", "memory")
BLOCK_SIZES = (512, 4096)  # the LBA formats the target advertises


def open_backend(path: str, *, kind: str = "auto", block_size: int = 512,
                 size: int | None = None, create: bool = False, buffered_io: bool = False,
                 loop: CompletionLoop) -> Backend:
    """Open the namespace backend for ``path``; BackendError says what is wrong.

    kind "auto" picks "bdev" for a block device and "file" for a regular file.
    "memory" is only ever chosen explicitly: it needs ``size`` and ``path`` is just
    a label.  ``size`` and ``create`` make a missing file (sparse); an existing one
    is used at its own size.  ``loop`` receives completions of blocking backends.
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
            log.warning("%s: size is ignored for a block device; its own capacity is used",
                        path)
        return open_bdev(path, st.st_rdev, block_size=block_size, buffered_io=buffered_io,
                         loop=loop)
    if stat.S_ISREG(st.st_mode):
        if kind == "bdev":
            raise BackendError(f"{path} is a regular file, not a block device; "
                               f"use kind file or auto")
        return open_file(path, block_size=block_size, size=size, create=False,
                         buffered_io=buffered_io, loop=loop)
    raise BackendError(f"{path} is neither a regular file nor a block device")
