"""Bad input to the control plane, class by class (issue #11): each answered with the
exact error, nothing changed, the target still serving.

In-process (`live`: RpcServer on a LoopEnv with a connected loop host) where the test
must see live effects; a real `nvmet-p2p serve` subprocess (`daemon`) for connection
handling and `serve --config`; a server on its own thread (`threaded`) where a test
shortens the socket timeouts.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nvmet_p2p import cli
from nvmet_p2p.backends import open_backend
from nvmet_p2p.configfs import Root
from nvmet_p2p.control.rpc import (
    CONFIG_ERROR,
    INVALID_PARAMS,
    MAX_CLIENTS,
    PARSE_ERROR,
    RpcClient,
    RpcError,
    RpcServer,
)
from nvmet_p2p.control.rpc import server as rpc_server
from nvmet_p2p.core.target import Target
from nvmet_p2p.errors import ConfigError
from nvmet_p2p.p2p.policy import P2PPolicy
from nvmet_p2p.transports.loop import LoopTransport
from nvmet_p2p.wire.limits import NVMET_MAX_NAMESPACES
from tests.support.loop_env import PORTID, SUBNQN, LoopEnv
from tests.support.rpc import IO_TIMEOUT_S, InProcess, RpcDaemon

MEM = {"backend": "memory", "size": "1M", "path": "m"}
HUGE = "9" * 5000


@pytest.fixture
def live(target_env: LoopEnv) -> Iterator[InProcess]:
    ip = InProcess(target_env)
    yield ip
    ip.close()


def error_of(live: InProcess, method: str, **params: Any) -> RpcError:
    before = live.env.root.to_dict()
    with pytest.raises(RpcError) as info:
        live.call(method, **params)
    assert live.env.root.to_dict() == before, "a refused change left something behind"
    return info.value


# -- 1. load_config replace is all or nothing ---------------------------------------------

def test_load_config_replace_with_an_unexpected_type_changes_nothing(live: InProcess) -> None:
    h = live.env.connect()
    h.write(1, 0, b"\x5a" * 512)
    doc = {"subsystems": [{"nqn": "nqn.2026-11.io.x:new", "attr": {"allow_any_host": "1"}}],
           "ports": [{"portid": 9, "addr": {"trtype": ["rdma"]}}]}
    e = error_of(live, "load_config", doc=doc, replace=True)
    assert e.code == CONFIG_ERROR
    assert "ports[0].addr.trtype: port 9: addr_trtype: ['rdma'] is not valid" in e.message
    assert h.read(1, 0, 1) == b"\x5a" * 512  # the host was never disconnected
    assert list(live.env.root.subsystems) == [SUBNQN]


def test_load_config_whose_backend_fails_live_is_rolled_back(live: InProcess) -> None:
    """What only the live load can find (ENOMEM) rolls back too.  Replacing the live tree
    disconnects its hosts (docs/kernel-differences.md); the old configuration is back
    and serves them again when they reconnect."""
    before = live.env.root.to_dict()
    doc = json.loads(json.dumps(before))
    doc["subsystems"][0]["namespaces"].append(
        {"nsid": 2, "device": {"backend": "memory", "size": "1024T", "path": "big"},
         "enable": 1})  # the scratch tree cannot see ENOMEM; the live load does
    e = error_of(live, "load_config", doc=doc, replace=True)
    assert e.code == CONFIG_ERROR and "cannot reserve" in e.message
    assert live.env.connect().active_ns() == [1]


# -- 2. set / create leave nothing behind ---------------------------------------------------

@pytest.mark.parametrize("group, name, value, why", [
    ("device", "size", HUGE, "is not a size"),
    ("device", "path", "/tmp/a\0b", "NUL byte"),
    ("device", "path", "/tmp/\udc80", "lone surrogate"),
    ("device", "path", "/" + "p" * 4096, "PATH_MAX"),
    ("device", "block_size", "\u00b2", "not a number"),
])
def test_set_refuses_before_anything_changes(live: InProcess, group: str, name: str,
                                             value: str, why: str) -> None:
    path = f"/subsystems/{SUBNQN}/namespaces/1"
    live.call("disable", path=path)
    e = error_of(live, "set", path=path, attrs={"device": {"nguid": "0" * 32},
                                                group: {name: value}})
    assert e.code == CONFIG_ERROR and why in e.message


def test_create_with_attrs_that_fail_late_leaves_no_object(live: InProcess) -> None:
    ns_dir = f"/subsystems/{SUBNQN}/namespaces"
    e = error_of(live, "create", path=ns_dir, name=2,
                 attrs={"device": dict(MEM, size="1024T"), "": {"enable": 1}})
    assert e.code == CONFIG_ERROR and "cannot reserve" in e.message and "device_size" in e.message
    assert live.call("list", path=ns_dir)["children"] == [{"name": "1", "kind": "namespace"}]


def test_create_link_with_attrs_is_refused_before_the_link(live: InProcess) -> None:
    live.env.root.create_subsystem("nqn.2026-11.io.x:other")
    e = error_of(live, "create", path=f"/ports/{PORTID}/subsystems",
                 name="nqn.2026-11.io.x:other", attrs={"attr": {"x": "1"}})
    assert e.code == INVALID_PARAMS and "does not apply to a link" in e.message


def test_a_bug_is_internal_error_but_the_state_is_unchanged(live: InProcess,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    def broken(self: Any, subsys: Any, ns: Any) -> None:
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(Target, "ns_enable", broken)
    e = error_of(live, "create", path=f"/subsystems/{SUBNQN}/namespaces", name=2,
                 attrs={"device": MEM, "": {"enable": 1}})
    assert e.code == -32603 and "configuration is unchanged" in e.message


# -- 3. operator typos name the field -------------------------------------------------------

@pytest.mark.parametrize("method, params, needle", [
    ("create", {"path": "/ports", "name": "\u00b2"}, "port id must be a number"),
    ("create", {"path": f"/subsystems/{SUBNQN}/namespaces", "name": "\u00b2"},
     "NSID must be a number"),
    ("create", {"path": f"/subsystems/{SUBNQN}/namespaces", "name": HUGE},
     "NSID must be a number"),
    ("create", {"path": "/hosts", "name": "nqn.2026-11.io.x:\udc80"}, "lone surrogate"),
    ("create", {"path": "/subsystems", "name": "a\0b"}, "'/' or NUL"),
    ("load_config", {"doc": {"ports": [{"portid": "\u00b2"}]}, "replace": True},
     "ports[0].portid: expected an integer"),
    ("load_config", {"doc": {"ports": [{"portid": 3, "addr": {"adrfam": {"a": 1}}}]},
                     "replace": True}, "ports[0].addr.adrfam"),
])
def test_typos_are_config_errors_naming_the_field(live: InProcess, method: str,
                                                  params: dict, needle: str) -> None:
    e = error_of(live, method, **params)
    assert e.code == CONFIG_ERROR, e.message
    assert needle in e.message


# -- 4. JSON limits: answered, and the connection stays usable ----------------------------

def test_deep_nesting_and_huge_numbers_are_answered(daemon: RpcDaemon) -> None:
    ok = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "list", "params": {"path": "/"}})
    payload = ("[" * 100_000 + "\n" + '{"jsonrpc": "2.0", "id": ' + "1" * 5000 + "}\n"
               + ok + "\n").encode()
    answers = raw(daemon.socket, payload)
    assert [a.get("error", {}).get("code") for a in answers[:2]] == [PARSE_ERROR] * 2
    assert "nested deeper than 32" in answers[0]["error"]["message"]
    assert "5000 digits" in answers[1]["error"]["message"]
    assert answers[2]["id"] == 7 and "result" in answers[2]


# -- 5. configuration files: bounded, never blocking ----------------------------------------

@pytest.fixture
def fifo() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="nvmet-fifo-")
    path = os.path.join(d, "config.json")
    os.mkfifo(path)
    yield path
    os.unlink(path)
    os.rmdir(d)


@pytest.mark.timeout(30)
def test_load_config_refuses_what_is_no_regular_file(live: InProcess, fifo: str,
                                                     tmp_path: Path) -> None:
    for path, kind in ((fifo, "a FIFO"), ("/dev/zero", "a character device"),
                       (str(tmp_path), "a directory")):
        e = error_of(live, "load_config", path=path, replace=True)
        assert e.code == CONFIG_ERROR and f"is {kind}, not a configuration file" in e.message
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(17 << 20)
    e = error_of(live, "load_config", path=str(big), replace=True)
    assert "larger than 16 MiB" in e.message


@pytest.mark.timeout(30)
def test_serve_config_fifo_exits_with_one_line(fifo: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "nvmet_p2p.cli", "serve", "--config", fifo],
                          capture_output=True, text=True, timeout=20, check=False)
    assert proc.returncode == 1
    assert "is a FIFO, not a configuration file" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- 6. stalled connections do not lock others out ------------------------------------------

def test_stalled_half_lines_do_not_lock_others_out(daemon: RpcDaemon) -> None:
    stalled = []
    try:
        for _ in range(MAX_CLIENTS + 6):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(daemon.socket)
            s.sendall(b'{"jsonrpc": "2.0", "method": "list", ')
            stalled.append(s)
        time.sleep(0.2)
        with daemon.client() as c:
            assert c.call("list", path="/")["kind"] == "root"
    finally:
        for s in stalled:
            s.close()


@pytest.fixture
def threaded(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An RpcServer serving on its own thread's loop, with short socket timeouts."""
    monkeypatch.setattr(rpc_server, "LINE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(rpc_server, "IDLE_TIMEOUT_S", 0.6)
    d = tempfile.mkdtemp(prefix="nvmet-rpc-")
    path = os.path.join(d, "ctl.sock")
    loop = asyncio.new_event_loop()
    policy = P2PPolicy()
    target = Target(loop=loop, open_backend=open_backend, p2p=policy)
    LoopTransport(target)
    server = RpcServer(SimpleNamespace(target=target, p2p=policy, config_path=None), path)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield path
    asyncio.run_coroutine_threadsafe(server.close(), loop).result(IO_TIMEOUT_S)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(IO_TIMEOUT_S)
    loop.close()
    os.rmdir(d)


def test_partial_line_times_out_and_idle_connection_closes(threaded: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(IO_TIMEOUT_S)
        s.connect(threaded)
        s.sendall(b'{"jsonrpc": "2.0", ')
        answer = json.loads(s.makefile("rb").readline())
        assert answer["error"]["code"] == PARSE_ERROR
        assert "not finished within 0.3 s" in answer["error"]["message"]
        assert s.recv(1) == b""  # closed
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(IO_TIMEOUT_S)
        s.connect(threaded)
        t0 = time.monotonic()
        assert s.recv(1) == b""  # idle: closed without a word
        assert time.monotonic() - t0 < IO_TIMEOUT_S
    with RpcClient(threaded, timeout=IO_TIMEOUT_S) as c:  # and the server still serves
        assert c.call("list", path="/")["kind"] == "root"


# -- 7. namespace count: the kernel's limit ------------------------------------------------

def test_more_enabled_namespaces_than_the_kernel_allows_are_refused() -> None:
    root = Root()
    s = root.create_subsystem(SUBNQN)
    for nsid in range(1, NVMET_MAX_NAMESPACES + 1):
        ns = s.create_namespace(nsid)
        ns.device_path = f"/dev/fake{nsid}"
        ns.enable = True
    extra = s.create_namespace(NVMET_MAX_NAMESPACES + 1)
    extra.device_path = "/dev/fake"
    with pytest.raises(ConfigError, match="already has 1024 enabled namespaces"):
        extra.enable = True


@pytest.mark.timeout(120)
def test_ten_thousand_namespaces_in_a_file_load_nothing(live: InProcess,
                                                        tmp_path: Path) -> None:
    doc = {"subsystems": [{"nqn": "nqn.2026-11.io.x:many", "attr": {"allow_any_host": "1"},
                           "namespaces": [{"nsid": i, "device": dict(MEM, size="4K"),
                                           "enable": 1} for i in range(1, 10_001)]}]}
    f = tmp_path / "many.json"
    f.write_text(json.dumps(doc))
    e = error_of(live, "load_config", path=str(f), replace=True)
    assert e.code == CONFIG_ERROR
    assert e.message.startswith("8976 error(s)")
    assert "namespaces[1024].enable" in e.message and "NVMET_MAX_NAMESPACES" in e.message


# -- 8. serve --config: one line, never a traceback --------------------------------------

def _doc(**over: Any) -> str:
    port = {"portid": 1, "addr": {"trtype": "loop"}, "subsystems": [SUBNQN]}
    ns = {"nsid": 1, "device": dict(MEM), "enable": 1}
    sub = {"nqn": SUBNQN, "attr": {"allow_any_host": "1"}, "namespaces": [ns]}
    for key, value in over.items():
        where, _, name = key.partition("__")
        {"port": port, "ns": ns, "sub": sub}[where][name] = value
    return json.dumps({"hosts": [], "ports": [port], "subsystems": [sub]})


BAD_CONFIGS: dict[str, bytes | str] = {
    "not JSON": "{ nope",
    "not UTF-8": b"\xff\xfe{}",
    "empty": "",
    "a list": "[]",
    "deep nesting": "[" * 100_000,
    "5000-digit integer": '{"hosts": [' + "1" * 5000 + "]}",
    "lone surrogate NQN": _doc(sub__nqn="nqn.2026-11.io.x:\\udc80"),
    "NUL in a path": _doc(ns__device={"path": "/tmp/a\\u0000b"}),
    "superscript port id": _doc(port__portid="\u00b2"),
    "superscript NSID": _doc(ns__nsid="\u00b2"),
    "trtype as a list": _doc(port__addr={"trtype": ["loop"]}),
    "size of 5000 digits": _doc(ns__device=dict(MEM, size=HUGE)),
    "memory larger than the machine": _doc(ns__device=dict(MEM, size="1024T")),
    "unknown key": _doc(port__colour="red"),
    "namespaces not a list": _doc(sub__namespaces={"1": {}}),
    "link to a missing subsystem": _doc(port__subsystems=["nqn.2026-11.io.x:none"]),
    "nsid as a list": _doc(ns__nsid=[1]),
    "allowed host as an object": _doc(sub__allowed_hosts=[{"nqn": "x"}]),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(BAD_CONFIGS))
def test_serve_config_prints_one_line_never_a_traceback(kind: str, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    """In-process for speed: what `serve` prints is these log records (the FIFO test
    above runs the real command)."""
    f = tmp_path / "config.json"
    data = BAD_CONFIGS[kind]
    f.write_bytes(data if isinstance(data, bytes) else data.encode())
    assert cli.main(["serve", "--config", str(f)]) == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(f) in errors[0].getMessage()
    assert all(r.exc_info is None for r in caplog.records), "a traceback was logged"
    assert "internal error" not in caplog.text


def test_a_good_config_loads(tmp_path: Path) -> None:
    """The 18 above differ from this one by their one flaw."""
    root = Root()
    root.restore(json.loads(_doc()), source="good")
    assert list(root.subsystems) == [SUBNQN]


def raw(sock_path: str, payload: bytes) -> list[Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(IO_TIMEOUT_S)
        s.connect(sock_path)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    return [json.loads(line) for line in data.splitlines() if line.strip()]
