"""Driving a namespace backend directly from a test: reproducible payloads, one request
polled to completion."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

COMPLETION_TIMEOUT_S = 30.0  # real time for one command of a healthy controller under TCG


def pattern(n: int, seed: int) -> bytes:
    """`n` pseudo-random bytes, the same for the same seed (to write, then compare)."""
    return random.Random(seed).randbytes(n)


def run(backend: Any, submit: Callable[[Callable[[int], None]], None],
        timeout: float = COMPLETION_TIMEOUT_S) -> int:
    """Submit one request through `submit(cb)`, poll `backend` until its status arrives."""
    got: list[int] = []
    submit(got.append)
    deadline = time.monotonic() + timeout
    while not got:
        backend.poll()
        assert time.monotonic() < deadline, "completion never arrived"
    return got[0]
