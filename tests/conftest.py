"""Fixtures every test directory shares, and the one rule for VM tests.

`env` gives a `LoopEnv` (tests/support/loop_env.py): a target on its own asyncio loop
under a fake clock, torn down with a leak check.  A test marked `vm` (a module-level
`pytestmark = pytest.mark.vm`) needs the soft-RoCE VM; outside it the test is skipped
with the reason in the summary, and `make test` runs every such test in one VM boot.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmet_p2p.testbed.guest import VM_SKIP_REASON, in_vm
from tests.support.loop_env import NS_KINDS, LoopEnv


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if in_vm():
        return
    skip = pytest.mark.skip(reason=VM_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("vm") is not None:
            item.add_marker(skip)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[LoopEnv]:
    e = LoopEnv(tmp_path)
    yield e
    leaks = e.close()
    assert not leaks, "leaks at teardown:\n" + "\n".join(leaks)


@pytest.fixture
def target_env(env: LoopEnv) -> LoopEnv:
    """`env` with the default subsystem (one 16 MiB memory namespace) on loop port 1."""
    env.add_subsystem()
    return env


@pytest.fixture(params=NS_KINDS)
def ns_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)
