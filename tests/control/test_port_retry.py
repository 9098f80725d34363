"""A port that cannot listen stays configured, says why, and is retried (issue #11):
periodically and as soon as an RDMA device appears.  The VM test
(tests/system/test_port_retry_vm.py) shows the same with rxe0 and the Linux host."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nvmet_p2p import logfmt
from nvmet_p2p.control import daemon as daemon_mod
from nvmet_p2p.errors import TransportError
from tests.support.loop_env import SUBNQN, LoopEnv
from tests.support.rpc import InProcess


class FlakyTransport:
    """A transport whose listener cannot start until `up` is set (a NIC still down)."""

    trtype = "rdma"
    keyed_sgls = True
    msdbd = 1

    def __init__(self) -> None:
        self.up = False
        self.ports: list[int] = []

    def add_port(self, port: object) -> None:
        if not self.up:
            raise TransportError("rdma_create_event_channel: No such device")
        self.ports.append(port.portid)  # type: ignore[attr-defined]

    def remove_port(self, port: object) -> None:
        self.ports.remove(port.portid)  # type: ignore[attr-defined]

    def queue_response(self, req: object) -> None: ...
    def delete_ctrl(self, ctrl: object) -> None: ...
    def p2p_client(self, port: object) -> str | None:
        return None

    def p2p_can_register(self, provider: object) -> str | None:
        return None

    def resources(self) -> dict[str, int]:
        return {"ports": len(self.ports)}

    def close(self) -> None: ...


@pytest.fixture
def flaky(env: LoopEnv) -> FlakyTransport:
    t = FlakyTransport()
    env.target.register_transport(t)
    env.add_subsystem(portid=None)
    port = env.root.create_port(7)
    port.addr_trtype = "rdma"
    port.addr_adrfam = "ipv4"
    port.addr_traddr = "192.0.2.1"
    return t


def test_a_port_that_cannot_listen_stays_configured_with_its_reason(
        env: LoopEnv, flaky: FlakyTransport, caplog: pytest.LogCaptureFixture) -> None:
    env.root.ports[7].link_subsystem(SUBNQN)  # not vetoed: the kernel keeps it too
    assert env.root.ports[7].subsystems == [SUBNQN]
    status = env.target.status()["ports"][7]
    assert status["listening"] is False
    assert "rdma_create_event_channel: No such device; retrying" in status["error"]
    [line] = [logfmt.parse(r.getMessage()) for r in caplog.records]
    assert line["event"] == "port_not_listening" and line["portid"] == "7"
    assert line["reason"].startswith("cannot listen on 192.0.2.1:4420: ")
    env.target.retry_ports()  # still down: still configured, one log line only
    assert caplog.text.count("cannot listen") == 1
    flaky.up = True
    caplog.set_level(logging.INFO)
    env.target.retry_ports()
    assert "event=port_listening portid=7 trtype=rdma traddr=192.0.2.1" in caplog.text
    assert env.target.status()["ports"][7] == {"listening": True}
    assert flaky.ports == [7]


def test_unlinking_a_port_that_never_listened_forgets_its_error(env: LoopEnv,
                                                               flaky: FlakyTransport) -> None:
    env.root.ports[7].link_subsystem(SUBNQN)
    env.root.ports[7].unlink_subsystem(SUBNQN)
    assert env.target.listen_errors == {}
    assert flaky.ports == []


def test_status_and_ls_show_the_reason(env: LoopEnv, flaky: FlakyTransport) -> None:
    ip = InProcess(env)
    try:
        ip.call("link", port=7, subsystem=SUBNQN)
        assert "No such device" in ip.call("status")["ports"]["7"]["error"]
    finally:
        ip.close()


def test_the_daemon_retries_when_an_rdma_device_appears(env: LoopEnv, flaky: FlakyTransport,
                                                        tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setattr(daemon_mod, "RDMA_DEVICES_DIR", str(tmp_path))
    monkeypatch.setattr(daemon_mod, "PORT_RETRY_S", 3600.0)  # only the device can trigger it
    d = daemon_mod.Daemon.__new__(daemon_mod.Daemon)  # the tick alone, on the env's target
    d.target, d.loop = env.target, env.loop
    d._rdma_devices, d._next_retry = daemon_mod.rdma_devices(), env.loop.time() + 3600.0
    env.root.ports[7].link_subsystem(SUBNQN)
    flaky.up = True  # the NIC is up, but nothing told us yet
    d._tick()
    assert 7 not in env.target.listening
    (tmp_path / "rxe0").mkdir()  # the device appears
    d._tick()
    assert 7 in env.target.listening
    for handle in list(env.loop._scheduled):  # type: ignore[attr-defined]
        handle.cancel()


def test_ls_shows_why_a_port_does_not_listen(env: LoopEnv, flaky: FlakyTransport,
                                             tmp_path: Path) -> None:
    """The shell's port summary, fed by the same methods over a client stand-in."""
    from types import SimpleNamespace

    from nvmet_p2p.control.rpc import RpcServer
    from nvmet_p2p.control.shell import UIPort, make_shell

    env.root.ports[7].link_subsystem(SUBNQN)
    server = RpcServer(SimpleNamespace(target=env.target, p2p=env.p2p, config_path=None), "unused")

    class Direct:  # RpcClient.call, answered in this thread
        def call(self, method: str, **params: object) -> object:
            result, error = env.loop.run_until_complete(server.call(method, params))
            assert error is None, error
            return result

        def close(self) -> None: ...

    shell = make_shell("unused", str(tmp_path / "prefs"))
    shell._root_node._client = Direct()
    summary, ok = UIPort("7", shell._root_node, "/ports/7").summary()
    assert ok is False
    assert "not listening: cannot listen on 192.0.2.1:4420" in summary
