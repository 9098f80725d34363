"""The transport conformance suite over NVMe/TCP: the Python TCP host against our target
on 127.0.0.1, the target in its own thread (tests/support/tcp_env.py).

Variants: memory and bdev (loop device) namespaces at 512-byte blocks without digests,
a memory namespace at 4096-byte blocks with header and data digests, and a file
namespace whose host disabled SQ flow control (reads then end with the C2HData SUCCESS
flag instead of a CapsuleResp).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nvmet_p2p.host.base import Host
from nvmet_p2p.wire import log as lg
from tests.support.conformance import CHECKS, Connect, TargetSide
from tests.support.loop_env import NS_SIZE, PORTID, SUBNQN
from tests.support.tcp_env import TcpEnv

TCP_QUIET = 0.2  # "no completion arrives" over loopback TCP

# (namespace kind, block size, host options)
VARIANTS = [
    ("memory", 512, {}),
    ("bdev", 512, {}),
    ("memory", 4096, {"hdgst": True, "ddgst": True}),
    ("file", 512, {"disable_sqflow": True}),
]
VARIANT_IDS = ["memory-512", "bdev-512", "memory-4096-digests", "file-512-no-sqflow"]


@pytest.fixture
def tcp_env(tmp_path: Path) -> Iterator[TcpEnv]:
    e = TcpEnv(tmp_path)
    yield e
    leaks = e.close()
    assert not leaks, "leaks at teardown:\n" + "\n".join(leaks)


def tcp_pair(env: TcpEnv, kind: str, block_size: int, host_kw: dict[str, Any]):
    env.add_subsystem(namespaces={1: kind, 2: "memory"}, block_size=block_size)
    side = TargetSide(
        target=env.target, subnqn=SUBNQN, nsids=[1, 2], portid=PORTID,
        trtype=lg.Trtype.TCP, block_size=block_size, ns_size=NS_SIZE, clock=env.clock,
        quiet=TCP_QUIET, pump=env.pump, call=env.call, queues=env.queues)

    def connect(subnqn: str | None = None, *, hostnqn: str | None = None,
                nr_io_queues: int = 1, queue_size: int = 32, kato_ms: int = 0) -> Host:
        return env.tcp_connect(subnqn or SUBNQN, hostnqn=hostnqn, nr_io_queues=nr_io_queues,
                               queue_size=queue_size, kato_ms=kato_ms, **host_kw)

    made: list[Any] = []

    def make_pair() -> tuple[TargetSide, Connect]:
        assert not made, "the tcp pair is built once per test"
        made.append(side)
        return side, connect

    return make_pair


@pytest.mark.parametrize("kind,block_size,host_kw", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_")
                                               for c in CHECKS])
def test_tcp(tcp_env: TcpEnv, check: Any, kind: str, block_size: int,
             host_kw: dict[str, Any]) -> None:
    check(tcp_pair(tcp_env, kind, block_size, host_kw))
