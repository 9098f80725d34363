"""The transport conformance suite over the loop transport, on every namespace kind.

Memory, file and bdev (loop device) namespaces at 512-byte blocks, and a memory
namespace at 4096-byte blocks; each check on a fresh target from the `env` fixture.
"""

from __future__ import annotations

from typing import Any

import pytest

from nvmet_p2p.host.base import Host
from nvmet_p2p.wire import log as lg
from tests.support.conformance import CHECKS, Connect, TargetSide
from tests.support.loop_env import NS_SIZE, PORTID, SUBNQN, LoopEnv

LOOP_QUIET = 0.05  # loop delivers completions synchronously: no round trip to wait for

VARIANTS = [("memory", 512), ("file", 512), ("bdev", 512), ("memory", 4096)]


def loop_pair(env: LoopEnv, kind: str, block_size: int):
    env.add_subsystem(namespaces={1: kind, 2: "memory"}, block_size=block_size)
    side = TargetSide(
        target=env.target, subnqn=SUBNQN, nsids=[1, 2], portid=PORTID,
        trtype=lg.Trtype.LOOP, block_size=block_size, ns_size=NS_SIZE, clock=env.clock,
        quiet=LOOP_QUIET, pump=env.pump, queues=lambda: env.transport.resources()["queues"])

    def connect(subnqn: str | None = None, *, hostnqn: str | None = None,
                nr_io_queues: int = 1, queue_size: int = 32, kato_ms: int = 0) -> Host:
        return env.connect(subnqn or SUBNQN, hostnqn=hostnqn, nr_io_queues=nr_io_queues,
                           queue_size=queue_size, kato_ms=kato_ms)

    made: list[Any] = []

    def make_pair() -> tuple[TargetSide, Connect]:
        assert not made, "the loop pair is built once per test"
        made.append(side)
        return side, connect

    return make_pair


@pytest.mark.parametrize("kind,block_size", VARIANTS,
                         ids=[f"{k}-{b}" for k, b in VARIANTS])
@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_")
                                               for c in CHECKS])
def test_loop(env: LoopEnv, check: Any, kind: str, block_size: int) -> None:
    check(loop_pair(env, kind, block_size))
