"""The control tests share one `nvmet-p2p serve` subprocess per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.rpc import RpcDaemon


@pytest.fixture(scope="module")
def daemon() -> Iterator[RpcDaemon]:
    d = RpcDaemon()
    yield d
    alive = d.proc.poll() is None
    d.stop()
    assert alive, "the daemon died during the tests"
