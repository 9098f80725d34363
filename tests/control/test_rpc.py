"""The control socket: every method, the JSON-RPC error cases, robustness, live effects.

Most tests talk to a real `nvmet-p2p serve --rpc-socket` subprocess (module-scoped,
configuration cleared before each test).  Live effects on connected hosts need a
LoopHost in the target's own thread, so those tests run `RpcServer` in-process on the
loop of conftest's `LoopEnv` and call it through the socket with an asyncio client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nvmet_p2p.control.rpc import (
    CONFIG_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_LINE,
    METHOD_NOT_FOUND,
    NOT_AVAILABLE,
    PARSE_ERROR,
    RpcClient,
    RpcError,
    RpcServer,
    RpcUnreachable,
)
from nvmet_p2p.host.base import NvmeError
from nvmet_p2p.wire import log as lg
from tests.support.loop_env import HOSTNQN, PORTID, SUBNQN, LoopEnv
from tests.support.rpc import IO_TIMEOUT_S, START_TIMEOUT_S, InProcess, RpcDaemon

NQN = "nqn.2026-11.io.nvmet-p2p:rpc"
HOST = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
MEM_NS = {"device": {"backend": "memory", "size": "1M", "path": "mem0"}}


@pytest.fixture
def rpc(daemon: RpcDaemon) -> Iterator[RpcClient]:
    with daemon.client() as c:
        c.call("clear_config")
        yield c


def make_target(rpc: RpcClient, *, enable: bool = True) -> None:
    """Subsystem NQN (any host) with a 1 MiB memory namespace 1, loop port 1 exporting it."""
    rpc.call("create", path="/subsystems", name=NQN, attrs={"attr": {"allow_any_host": 1}})
    attrs = dict(MEM_NS, **({"": {"enable": 1}} if enable else {}))
    rpc.call("create", path=f"/subsystems/{NQN}/namespaces", name=1, attrs=attrs)
    rpc.call("create", path="/ports", name=1, attrs={"addr": {"trtype": "loop"}})
    rpc.call("link", port=1, subsystem=NQN)


def raw(sock_path: str, payload: bytes, timeout: float = IO_TIMEOUT_S) -> list[Any]:
    """Send bytes on a fresh connection, half-close, return every answer line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def expect_error(rpc: RpcClient, code: int, method: str, **params: Any) -> RpcError:
    with pytest.raises(RpcError) as e:
        rpc.call(method, **params)
    assert e.value.code == code, e.value.message
    return e.value


# -- the socket ----------------------------------------------------------------------

def test_socket_mode_0600(daemon: RpcDaemon) -> None:
    st = os.stat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_second_server_on_a_live_socket_is_refused(daemon: RpcDaemon) -> None:
    loop = asyncio.new_event_loop()
    try:
        server = RpcServer(SimpleNamespace(target=None, config_path=None), daemon.socket)
        with pytest.raises(Exception, match="another process is serving"):
            loop.run_until_complete(server.start())
    finally:
        loop.close()
    assert os.path.exists(daemon.socket)


def test_stale_socket_is_replaced_and_removed_at_close(env: LoopEnv) -> None:
    d = Path(tempfile.mkdtemp(prefix="nvmet-rpc-"))
    path = str(d / "stale.sock")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(path)  # bound, never listening: what a killed daemon leaves behind
        server = RpcServer(SimpleNamespace(target=env.target, p2p=env.p2p, config_path=None), path)
        env.loop.run_until_complete(server.start())
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        env.loop.run_until_complete(server.close())
        assert not os.path.exists(path)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- methods: happy paths -------------------------------------------------------------

def test_list(rpc: RpcClient) -> None:
    root = rpc.call("list", path="/")
    assert root["kind"] == "root"
    assert [(c["name"], c["kind"]) for c in root["children"]] == [
        ("hosts", "hosts"), ("ports", "ports"), ("subsystems", "subsystems")]
    make_target(rpc)
    sub = rpc.call("list", path=f"/subsystems/{NQN}")
    assert [c["name"] for c in sub["children"]] == ["allowed_hosts", "namespaces"]
    assert rpc.call("list", path=f"/subsystems/{NQN}/namespaces")["children"] == [
        {"name": "1", "kind": "namespace"}]
    assert rpc.call("list", path="/ports/1/subsystems")["children"] == [
        {"name": NQN, "kind": "port_subsystem"}]
    assert rpc.call("list", path=f"/subsystems/{NQN}/namespaces/1")["children"] == []


def test_get(rpc: RpcClient) -> None:
    make_target(rpc, enable=False)
    ns = f"/subsystems/{NQN}/namespaces/1"
    everything = rpc.call("get", path=ns)
    assert set(everything) == {"device", "ana", ""}
    assert everything[""] == {"enable": "0", "buffered_io": "0", "p2pmem": "1"}
    assert rpc.call("get", path=ns, group="device", name="backend") == {
        "device": {"backend": "memory"}}
    port = rpc.call("get", path="/ports/1", group="attr")
    assert port == {"attr": {"allow_p2pmem": "0"}}
    assert rpc.call("get", path="/hosts") == {}
    assert rpc.call("attr_choices", path="/ports/1", group="addr", name="trtype") == [
        "rdma", "tcp", "loop"]
    assert rpc.call("attr_choices", path=ns, group="device", name="path") is None


def test_set_single_and_several(rpc: RpcClient) -> None:
    make_target(rpc, enable=False)
    assert rpc.call("set", path="/ports/1", group="attr", name="allow_p2pmem",
                    value=True) == {"attr": {"allow_p2pmem": "1"}}
    ns = f"/subsystems/{NQN}/namespaces/1"
    # enable is applied last whatever the order: the device changes are allowed first
    out = rpc.call("set", path=ns, attrs={"": {"enable": "1"},
                                          "device": {"size": "2M", "block_size": 4096}})
    assert out == {"": {"enable": "1"}, "device": {"size": "2097152", "block_size": "4096"}}
    # and disable comes first, so a change of an enabled namespace works in one call
    out = rpc.call("set", path=ns, attrs={"device": {"size": "4M"}, "": {"enable": 0}})
    assert out["device"]["size"] == "4194304"


def test_set_is_all_or_nothing(rpc: RpcClient) -> None:
    make_target(rpc, enable=False)
    ns = f"/subsystems/{NQN}/namespaces/1"
    e = expect_error(rpc, CONFIG_ERROR, "set", path=ns,
                     attrs={"device": {"path": "other", "block_size": "999"}})
    assert "block_size" in e.message
    assert rpc.call("get", path=ns, group="device", name="path")["device"]["path"] == "mem0"


def test_create_and_delete_every_kind(rpc: RpcClient) -> None:
    make_target(rpc)
    assert rpc.call("create", path="/hosts", name=HOST) == {"path": f"/hosts/{HOST}"}
    rpc.call("set", path=f"/subsystems/{NQN}", group="attr", name="allow_any_host", value=0)
    assert rpc.call("create", path=f"/subsystems/{NQN}/allowed_hosts", name=HOST) == {
        "path": f"/subsystems/{NQN}/allowed_hosts/{HOST}"}
    rpc.call("create", path="/ports/1/referrals", name="r1",
             attrs={"addr": {"trtype": "rdma", "adrfam": "ipv4", "traddr": "10.0.0.2",
                             "portid": 2}})
    assert rpc.call("get", path="/ports/1/referrals/r1", group="addr",
                    name="traddr")["addr"]["traddr"] == "10.0.0.2"
    for path in ("/ports/1/referrals/r1", f"/subsystems/{NQN}/allowed_hosts/{HOST}",
                 f"/hosts/{HOST}", "/ports/1/subsystems/" + NQN,
                 f"/subsystems/{NQN}/namespaces/1", "/ports/1", f"/subsystems/{NQN}"):
        assert rpc.call("delete", path=path) == {"deleted": path}
    assert rpc.call("get", path="/") == {}
    for d in ("/hosts", "/ports", "/subsystems"):
        assert rpc.call("list", path=d)["children"] == []


def test_create_with_bad_attrs_leaves_nothing(rpc: RpcClient) -> None:
    e = expect_error(rpc, CONFIG_ERROR, "create", path="/ports", name=7,
                     attrs={"addr": {"trtype": "fc"}})
    assert "fc" in e.message
    assert rpc.call("list", path="/ports")["children"] == []


def test_link_unlink_allow_disallow_enable_disable(rpc: RpcClient) -> None:
    make_target(rpc, enable=False)
    rpc.call("create", path="/ports", name=2, attrs={"addr": {"trtype": "loop"}})
    assert rpc.call("link", port="/ports/2", subsystem=NQN) == {
        "path": f"/ports/2/subsystems/{NQN}"}
    assert rpc.call("status")["ports"]["2"]["listening"] is True
    rpc.call("unlink", port=2, subsystem=NQN)
    assert rpc.call("status")["ports"]["2"]["listening"] is False
    rpc.call("create", path="/hosts", name=HOST)
    rpc.call("set", path=f"/subsystems/{NQN}", group="attr", name="allow_any_host", value=0)
    rpc.call("allow_host", subsystem=NQN, host=HOST)
    assert rpc.call("list", path=f"/subsystems/{NQN}/allowed_hosts")["children"][0][
        "name"] == HOST
    rpc.call("disallow_host", subsystem=f"/subsystems/{NQN}", host=HOST)
    assert rpc.call("list", path=f"/subsystems/{NQN}/allowed_hosts")["children"] == []
    ns = f"/subsystems/{NQN}/namespaces/1"
    assert rpc.call("enable", path=ns) == {"path": ns, "enable": "1"}
    nss = rpc.call("status")["subsystems"][NQN]["namespaces"]
    assert [n["nsid"] for n in nss] == [1]
    assert rpc.call("disable", path=ns) == {"path": ns, "enable": "0"}
    assert rpc.call("status")["subsystems"][NQN]["namespaces"] == []
    e = expect_error(rpc, CONFIG_ERROR, "enable", path="/ports/1")
    assert "namespace or referral" in e.message


def test_save_and_load_config(rpc: RpcClient, daemon: RpcDaemon, tmp_path: Path) -> None:
    make_target(rpc)
    rpc.call("set", path="/ports/1", group="attr", name="allow_p2pmem", value="1")
    # default: the daemon's --config file, written atomically, its mode kept
    mode = stat.S_IMODE(os.stat(daemon.config).st_mode)
    assert rpc.call("save_config") == {"path": str(daemon.config)}
    saved = json.loads(daemon.config.read_text())
    assert saved["subsystems"][0]["nqn"] == NQN
    assert saved["ports"][0]["attr"] == {"allow_p2pmem": "1"}
    assert stat.S_IMODE(os.stat(daemon.config).st_mode) == mode
    assert [p.parent.name for p in (daemon.config.parent / "backup").iterdir()] == ["backup"]
    other = tmp_path / "copy.json"
    assert rpc.call("save_config", path=str(other)) == {"path": str(other)}
    assert json.loads(other.read_text()) == saved
    # loading over a live configuration needs replace
    e = expect_error(rpc, CONFIG_ERROR, "load_config", path=str(other))
    assert "replace" in e.message
    assert rpc.call("load_config", path=str(other), replace=True) == {
        "hosts": 0, "subsystems": 1, "ports": 1}
    rpc.call("clear_config")
    assert rpc.call("load_config", doc=saved)["ports"] == 1
    assert rpc.call("get", path="/ports/1", group="attr") == {"attr": {"allow_p2pmem": "1"}}
    assert rpc.call("status")["ports"]["1"]["listening"] is True


def test_load_config_reports_every_error_and_keeps_the_previous(rpc: RpcClient) -> None:
    make_target(rpc)
    bad = {"hosts": [{"nqn": "not/an-nqn"}],
           "subsystems": [{"nqn": "nqn.2026-11.io.x:ok", "attr": {"serial": "x" * 40},
                           "namespaces": [{"nsid": 0, "device": {"path": "/nope"}}]}],
           "ports": [{"portid": 3, "addr": {"trtype": "carrier-pigeon"}}]}
    e = expect_error(rpc, CONFIG_ERROR, "load_config", doc=bad, replace=True)
    errors = e.data["errors"]
    assert len(errors) >= 4, errors
    joined = "\n".join(errors)
    for needle in ("not/an-nqn", "serial", "NSID 0", "carrier-pigeon"):
        assert needle in joined
    assert e.message.startswith(f"{len(errors)} error(s) in <doc>; nothing was loaded")
    # nothing of the bad file, and the previous configuration is back and live
    assert [c["name"] for c in rpc.call("list", path="/subsystems")["children"]] == [NQN]
    assert rpc.call("list", path="/ports")["children"][0]["name"] == "1"
    assert rpc.call("status")["subsystems"][NQN]["namespaces"][0]["nsid"] == 1


def test_load_config_unreadable_file(rpc: RpcClient, tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{ not json")
    e = expect_error(rpc, CONFIG_ERROR, "load_config", path=str(tmp_path / "bad.json"))
    assert "not valid JSON" in e.message
    e = expect_error(rpc, CONFIG_ERROR, "load_config", path=str(tmp_path / "missing.json"))
    assert "cannot read" in e.message


def test_clear_config(rpc: RpcClient) -> None:
    make_target(rpc)
    assert rpc.call("clear_config") == {"cleared": True}
    assert all(not rpc.call("list", path=d)["children"]
               for d in ("/hosts", "/ports", "/subsystems"))
    assert rpc.call("status")["ports"] == {}


def test_status(rpc: RpcClient) -> None:
    make_target(rpc)
    st = rpc.call("status")
    ns = st["subsystems"][NQN]["namespaces"][0]
    assert ns["nsid"] == 1
    assert {"read_cmds", "write_cmds", "read_bytes", "write_bytes"} <= set(ns["stats"])
    assert st["ports"] == {"1": {"listening": True}}
    assert st["controllers"] == []
    assert "loop" in st["transports"]
    assert "decisions" in st["p2p"]


def test_p2p_explain(rpc: RpcClient) -> None:
    make_target(rpc)
    rpc.call("create", path="/ports", name=2, attrs={"addr": {"trtype": "loop"}})
    rpc.call("link", port=2, subsystem=NQN)
    try:
        everything = rpc.call("p2p_explain")
    except RpcError as e:
        assert e.code == NOT_AVAILABLE and "not available" in e.message
        return
    assert {(d["portid"], d["nsid"]) for d in everything} == {(1, 1), (2, 1)}
    only = rpc.call("p2p_explain", path="/ports/2")
    assert [d["portid"] for d in only] == [2]
    ns = rpc.call("p2p_explain", path=f"/subsystems/{NQN}/namespaces/1")
    assert len(ns) == 2 and all(d["p2p"] is False and d["reason"] for d in ns)


# -- errors -------------------------------------------------------------------------

def test_parse_error_then_the_connection_still_works(daemon: RpcDaemon) -> None:
    good = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "list", "params": {"path": "/"}})
    answers = raw(daemon.socket, b"{ nope\n" + b"\xff\xfe\n" + good.encode() + b"\n")
    assert [a["error"]["code"] for a in answers[:2]] == [PARSE_ERROR, PARSE_ERROR]
    assert answers[0]["id"] is None
    assert answers[2]["id"] == 7 and answers[2]["result"]["kind"] == "root"


@pytest.mark.parametrize("req,code,needle", [
    ({"id": 1, "method": "list"}, INVALID_REQUEST, "jsonrpc"),
    ({"jsonrpc": "2.0", "id": 1, "method": 5}, INVALID_REQUEST, "method"),
    ({"jsonrpc": "2.0", "id": [1], "method": "list"}, INVALID_REQUEST, "id"),
    ([], INVALID_REQUEST, "empty batch"),
    (5, INVALID_REQUEST, "JSON object"),
    ({"jsonrpc": "2.0", "id": 1, "method": "list", "params": ["/"]}, INVALID_PARAMS,
     "object of named values"),
])
def test_invalid_requests(daemon: RpcDaemon, req: Any, code: int, needle: str) -> None:
    [answer] = raw(daemon.socket, json.dumps(req).encode() + b"\n")
    assert answer["error"]["code"] == code
    assert needle in answer["error"]["message"]


def test_unknown_method_lists_the_valid_ones(rpc: RpcClient) -> None:
    e = expect_error(rpc, METHOD_NOT_FOUND, "frobnicate")
    assert "frobnicate" in e.message and "load_config" in e.message
    assert "status" in e.data["methods"]


@pytest.mark.parametrize("method,params,field,needle", [
    ("get", {}, "path", "is missing"),
    ("get", {"path": 3}, "path", "must be a tree path"),
    ("get", {"path": "/", "grp": "x"}, "grp", "valid: path, group, name"),
    ("get", {"path": "/ports", "name": "x"}, "group", "is needed"),
    ("set", {"path": "/ports/1", "group": "addr", "name": "trtype"}, "value", "is missing"),
    ("set", {"path": "/ports/1", "attrs": {"addr": {"trtype": None}}}, "attrs",
     "string, number or boolean"),
    ("set", {"path": "/ports/1", "attrs": {"a": 1}, "group": "a"}, "attrs", "one form"),
    ("create", {"path": "/ports", "name": True}, "name", "id or name"),
    ("load_config", {"path": "/x", "doc": {}}, "path", "cannot both be given"),
    ("load_config", {"doc": {}, "replace": "yes"}, "replace", "true or false"),
])
def test_invalid_params_name_the_field(rpc: RpcClient, method: str, params: dict,
                                       field: str, needle: str) -> None:
    e = expect_error(rpc, INVALID_PARAMS, method, **params)
    assert e.data["field"] == field
    assert needle in e.message


def test_config_errors_pass_through(rpc: RpcClient) -> None:
    make_target(rpc)
    e = expect_error(rpc, CONFIG_ERROR, "set", path="/ports/1", group="addr", name="trtype",
                     value="rdma")
    assert e.message == ("port 1 is enabled (subsystems linked: " + NQN + "), so addr_trtype "
                         "cannot change; unlink its subsystems first")
    e = expect_error(rpc, CONFIG_ERROR, "get", path="/subsystems/nqn.2026-11.io.x:none")
    assert "does not exist" in e.message
    e = expect_error(rpc, CONFIG_ERROR, "list", path="/bogus/path")
    assert "not a path of the nvmet tree" in e.message
    e = expect_error(rpc, CONFIG_ERROR, "create", path="/subsystems", name="nqn/bad")
    assert "contains '/' or NUL" in e.message


def test_notifications_and_batches(daemon: RpcDaemon, rpc: RpcClient) -> None:
    batch = [{"jsonrpc": "2.0", "method": "create",
              "params": {"path": "/hosts", "name": HOST}},  # notification: no answer
             {"jsonrpc": "2.0", "id": "a", "method": "list", "params": {"path": "/hosts"}},
             {"jsonrpc": "2.0", "id": "b", "method": "nope"}]
    answers = raw(daemon.socket, json.dumps(batch).encode() + b"\n")
    assert len(answers) == 1
    by_id = {a["id"]: a for a in answers[0]}
    assert by_id["a"]["result"]["children"] == [{"name": HOST, "kind": "host"}]
    assert by_id["b"]["error"]["code"] == METHOD_NOT_FOUND
    assert raw(daemon.socket, json.dumps(batch[0]).encode() + b"\n") == []


def test_huge_line_is_refused_without_disturbing_others(daemon: RpcDaemon,
                                                        rpc: RpcClient) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(IO_TIMEOUT_S)
        s.connect(daemon.socket)
        junk = b"[" * (MAX_LINE + 4096)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(junk)  # the daemon may close before all of it is sent
        # meanwhile another client is served
        assert rpc.call("list", path="/")["kind"] == "root"
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(1 << 16):
                data += chunk
    answer = json.loads(data.splitlines()[0])
    assert answer["error"]["code"] == PARSE_ERROR
    assert "longer than" in answer["error"]["message"]


def test_bad_clients_do_not_disturb_a_good_one(daemon: RpcDaemon, rpc: RpcClient) -> None:
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half.connect(daemon.socket)
    half.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "li')  # and never finishes
    for _ in range(5):  # clients that vanish mid-request
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(daemon.socket)
            s.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "status"}\n{"jsonr')
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    try:
        make_target(rpc)
        assert rpc.call("status")["ports"]["1"]["listening"] is True
    finally:
        half.close()
    assert daemon.proc.poll() is None


def test_concurrent_clients(daemon: RpcDaemon, rpc: RpcClient) -> None:
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with daemon.client() as c:
                for j in range(10):
                    nqn = f"nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-{i:06d}{j:06d}"
                    c.call("create", path="/hosts", name=nqn)
                    assert nqn in [x["name"] for x in c.call("list", path="/hosts")["children"]]
        except BaseException as e:  # noqa: BLE001 reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(IO_TIMEOUT_S * 4)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert len(rpc.call("list", path="/hosts")["children"]) == 80


def test_nvmet_p2p_rpc_command(daemon: RpcDaemon, rpc: RpcClient) -> None:
    cmd = [sys.executable, "-m", "nvmet_p2p.cli", "rpc", "--rpc-socket", daemon.socket]
    ok = subprocess.run([*cmd, "list", '{"path": "/"}'], capture_output=True, text=True,
                        timeout=START_TIMEOUT_S, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["kind"] == "root"
    bad = subprocess.run([*cmd, "get", '{"path": "/nope"}'], capture_output=True, text=True,
                         timeout=START_TIMEOUT_S, check=False)
    assert bad.returncode == 1
    assert "not a path of the nvmet tree" in bad.stderr and not bad.stdout
    gone = subprocess.run([*cmd[:-1], daemon.socket + ".none", "status"], capture_output=True,
                          text=True, timeout=START_TIMEOUT_S, check=False)
    assert gone.returncode == 1
    assert "cannot reach nvmet-p2p at" in gone.stderr and "--rpc-socket" in gone.stderr


def test_client_without_daemon() -> None:
    with pytest.raises(RpcUnreachable, match=r"cannot reach nvmet-p2p at /nonexistent/x.sock: "
                       r".*\(is `nvmet-p2p serve --rpc-socket /nonexistent/x.sock` running\?\)"):
        RpcClient("/nonexistent/x.sock").call("status")


# -- live effects, in-process over loop ------------------------------------------------

@pytest.fixture
def live(target_env: LoopEnv) -> Iterator[InProcess]:
    ip = InProcess(target_env)
    yield ip
    ip.close()


def test_enable_namespace_raises_aen_and_host_sees_it(live: InProcess) -> None:
    h = live.env.connect()
    assert h.active_ns() == [1]
    aer = h.submit_aer()
    live.call("create", path=f"/subsystems/{SUBNQN}/namespaces", name=2,
              attrs=dict(MEM_NS, **{"": {"enable": "1"}}))
    cqe, _ = h.admin.wait(aer, timeout=IO_TIMEOUT_S)
    assert cqe.status == 0
    assert cqe.result & 0xFFFFFFFF == 0x040002  # notice, NS attribute changed, log 0x04
    assert lg.decode_changed_ns_list(h.get_log_page(lg.LogId.CHANGED_NS, 4096)) == [2]
    assert h.active_ns() == [1, 2]
    data = os.urandom(4096)
    h.write(2, 0, data)
    assert h.read(2, 0, 8) == data
    # disabling: another event, and the namespace is gone for the host
    aer = h.submit_aer()
    live.call("disable", path=f"/subsystems/{SUBNQN}/namespaces/2")
    cqe, _ = h.admin.wait(aer, timeout=IO_TIMEOUT_S)
    assert cqe.result & 0xFFFFFFFF == 0x040002
    assert lg.decode_changed_ns_list(h.get_log_page(lg.LogId.CHANGED_NS, 4096)) == [2]
    assert h.active_ns() == [1]


def test_link_bumps_discovery_genctr(live: InProcess) -> None:
    d = live.env.connect("nqn.2014-08.org.nvmexpress.discovery", nr_io_queues=0)

    def genctr() -> int:
        return lg.decode_disc_log_header(d.get_log_page(lg.LogId.DISC, lg.DISC_HDR_SIZE))[0]

    before = genctr()
    live.call("create", path="/subsystems", name=NQN, attrs={"attr": {"allow_any_host": 1}})
    live.call("link", port=PORTID, subsystem=NQN)
    after_link = genctr()
    assert after_link > before
    assert {e.subnqn for e in d.discover()} >= {SUBNQN, NQN}
    live.call("unlink", port=PORTID, subsystem=NQN)
    assert genctr() > after_link
    assert NQN not in {e.subnqn for e in d.discover()}


def test_disallowed_host_keeps_live_controller_but_cannot_connect(env: LoopEnv) -> None:
    env.add_subsystem(allowed_hosts=(HOSTNQN,), allow_any_host=False)
    live = InProcess(env)
    try:
        h = env.connect(hostnqn=HOSTNQN)
        live.call("disallow_host", subsystem=SUBNQN, host=HOSTNQN)
        # as with the kernel target: the controller already connected stays until it leaves
        data = os.urandom(4096)
        h.write(1, 8, data)
        assert h.read(1, 8, 8) == data
        assert [c["cntlid"] for c in live.call("status")["controllers"]] == [h.cntlid]
        # a new association from that host is refused: Connect Invalid Host
        with pytest.raises(NvmeError) as e:
            env.connect(hostnqn=HOSTNQN)
        assert e.value.status & 0x7FF == 0x184
        # allowing it again lets it in
        live.call("allow_host", subsystem=SUBNQN, host=HOSTNQN)
        assert env.connect(hostnqn=HOSTNQN).cntlid != h.cntlid
    finally:
        live.close()


def test_identified_subsystem_refuses_identity_changes(live: InProcess) -> None:
    path = f"/subsystems/{SUBNQN}"
    live.call("set", path=path, group="attr", name="serial", value="SN-A")
    h = live.env.connect()
    live.call("set", path=path, group="attr", name="serial", value="SN-B")  # not identified
    assert h.identify_ctrl().sn == "SN-B"
    with pytest.raises(RpcError) as e:
        live.call("set", path=path, group="attr", name="serial", value="SN-C")
    assert e.value.code == CONFIG_ERROR
    assert e.value.message == (f"subsystem {SUBNQN} has been identified by a host, so "
                               "attr_serial cannot change (hosts know it as 'SN-B'); delete "
                               "and re-create the subsystem to change it")
    # all or nothing: cntlid_max, written first, goes back when model is refused
    with pytest.raises(RpcError, match="attr_model cannot change"):
        live.call("set", path=path, attrs={"attr": {"cntlid_max": 100, "model": "m2"}})
    assert live.call("get", path=path, group="attr")["attr"]["cntlid_max"] == "65519"
    assert live.call("get", path=path, group="attr", name="serial") == {
        "attr": {"serial": "SN-B"}}
    assert h.identify_ctrl().sn == "SN-B"


def test_set_qid_max_reconnects_hosts(live: InProcess) -> None:
    h = live.env.connect(nr_io_queues=2)
    live.call("set", path=f"/subsystems/{SUBNQN}", group="attr", name="qid_max", value=1)
    assert not h.admin.connected and not any(q.connected for q in h.io.values())
    assert live.call("status")["controllers"] == []
    h2 = live.env.connect(nr_io_queues=1)
    assert h2.get_features(0x07) == 0
