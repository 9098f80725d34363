"""The daemon's log is key=value lines (issue #15): every configuration change, every
event of the target, and the SIGUSR1 status dump; never a Python repr."""

from __future__ import annotations

import ast
import re
import signal
import time
from pathlib import Path

import pytest

from nvmet_p2p import logfmt
from nvmet_p2p.control.daemon import status_lines
from tests.support.rpc import RpcDaemon

PACKAGE = Path(__file__).parents[2] / "nvmet_p2p"
NQN = "nqn.2026-11.io.nvmet-p2p:logs"
LINE = re.compile(r"^\S+ \S+ (?P<logger>\S+) (?P<level>[A-Z]+): (?P<msg>.*)$")


def messages(daemon: RpcDaemon) -> list[tuple[str, str]]:
    """(level, message) of every log line the daemon wrote so far."""
    out = []
    for text in daemon.output().splitlines():
        m = LINE.match(text)
        if m:
            out.append((m["level"], m["msg"]))
    return out


def wait_for(daemon: RpcDaemon, needle: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in daemon.output():
        assert time.monotonic() < deadline, f"no {needle!r} in:\n{daemon.output()}"
        time.sleep(0.05)


def serve_a_memory_namespace(c, device_path: str, portid: int) -> None:
    """A fresh tree: NQN with an enabled 1 MiB memory namespace, linked to a loop port."""
    c.call("clear_config")
    c.call("create", path="/subsystems", name=NQN, attrs={"attr": {"allow_any_host": 1}})
    c.call("create", path=f"/subsystems/{NQN}/namespaces", name=1,
           attrs={"device": {"path": device_path, "backend": "memory", "size": "1M"}})
    c.call("enable", path=f"/subsystems/{NQN}/namespaces/1")
    c.call("create", path="/ports", name=portid, attrs={"addr": {"trtype": "loop"}})
    c.call("create", path=f"/ports/{portid}/subsystems", name=NQN)


def test_a_line_round_trips() -> None:
    fields = {"cntlid": 3, "p2p": False, "reason": 'a "quoted" reason = odd', "none": None,
              "clients": ["0000:01:00.0", "0000:02:00.0"], "empty": "",
              "backend": {"kind": "file", "path": "/tmp/a b"},
              "by_reason": {"port 1: allow_p2pmem is off": 2}}
    text = logfmt.line("event", "ctrl_connected", fields)
    assert text.startswith("event=ctrl_connected cntlid=3 p2p=0 reason=")
    assert "{'" not in text and "[" not in text
    assert logfmt.parse(text) == {
        "event": "ctrl_connected", "cntlid": "3", "p2p": "0",
        "reason": 'a "quoted" reason = odd', "none": "", "clients": "0000:01:00.0,0000:02:00.0",
        "empty": "", "backend.kind": "file", "backend.path": "/tmp/a b",
        "by_reason": '{"port 1: allow_p2pmem is off": 2}'}


def test_every_change_and_event_is_a_key_value_line(daemon: RpcDaemon) -> None:
    with daemon.client() as c:
        serve_a_memory_namespace(c, "mem-logs", 9)
        c.call("set", path=f"/subsystems/{NQN}", attrs={"attr": {"model": "a model"}})
        c.call("disable", path=f"/subsystems/{NQN}/namespaces/1")
        c.call("delete", path="/ports/9")
        c.call("clear_config")
    wait_for(daemon, "change=cleared")
    lines = messages(daemon)
    assert lines
    parsed = []
    for level, msg in lines:
        assert "{'" not in msg and "('" not in msg, msg  # no dict or tuple repr
        fields = logfmt.parse(msg)
        assert next(iter(fields)) in ("event", "change"), msg
        parsed.append(fields)
    changes = [(f["change"], f.get("path"), f.get("attr"), f.get("value"))
               for f in parsed if "change" in f]
    for want in [("created", f"/subsystems/{NQN}", None, None),
                 ("set", f"/subsystems/{NQN}", "attr_allow_any_host", "1"),
                 ("enabled", f"/subsystems/{NQN}/namespaces/1", None, None),
                 ("set", f"/subsystems/{NQN}", "attr_model", "a model"),
                 ("created", f"/ports/9/subsystems/{NQN}", None, None),
                 ("disabled", f"/subsystems/{NQN}/namespaces/1", None, None),
                 ("deleted", "/ports/9", None, None)]:
        assert want in changes, changes
    events = {f["event"]: f for f in parsed if "event" in f}
    assert events["ns_enabled"]["backend.kind"] == "memory"  # the backend, flattened
    assert events["ns_enabled"]["backend.path"] == "mem-logs"
    assert events["port_listening"]["portid"] == "9"
    assert events["port_stopped"]["portid"] == "9"


def test_sigusr1_dumps_the_status_as_key_value_lines(daemon: RpcDaemon) -> None:
    with daemon.client() as c:
        serve_a_memory_namespace(c, "mem-usr1", 8)
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(daemon, "event=status_transport")
    dump = [(level, logfmt.parse(msg)) for level, msg in messages(daemon)
            if msg.startswith("event=status")]
    assert all(level == "INFO" for level, _ in dump)  # a status is no warning
    by_event = {f["event"]: f for _, f in dump}
    assert by_event["status"]["ports"] == "1" and by_event["status"]["subsystems"] == "1"
    assert by_event["status_port"] == {"event": "status_port", "portid": "8",
                                       "listening": "1"}
    ns = by_event["status_ns"]
    assert ns["subnqn"] == NQN and ns["nsid"] == "1" and ns["kind"] == "memory"
    assert ns["stats.read_cmds"] == "0"
    assert by_event["status_transport"]["transport"] in ("loop", "tcp", "rdma")
    with daemon.client() as c:
        c.call("clear_config")


def test_status_lines_cover_every_part_of_the_status() -> None:
    status = {"ports": {1: {"listening": True}}, "disc_genctr": 4,
              "subsystems": {NQN: {"namespaces": [{"nsid": 1, "stats": {"read_cmds": 2}}],
                                   "controllers": [1]}},
              "controllers": [{"cntlid": 1, "queues": [0, 1]}],
              "p2p": {"decisions": [{"nsid": 1, "p2p": False, "reason": "off"}],
                      "providers": [{"name": "p", "size": 4096}]},
              "transports": {"loop": {"queues": 2}}}
    got = [(what, logfmt.parse(logfmt.line("event", what, f))) for what, f in
           status_lines(status)]
    assert [w for w, _ in got] == ["status", "status_port", "status_ns", "status_ctrl",
                                   "status_p2p_decision", "status_p2p_provider",
                                   "status_transport"]
    assert got[3][1]["queues"] == "0,1" and got[2][1]["stats.read_cmds"] == "2"


LOG_METHODS = {"debug", "info", "warning", "error", "critical", "exception", "log"}


def test_log_lines_of_the_target_go_through_logfmt() -> None:
    """A guard: every line of the package above debug level is built by logfmt
    (logfmt.exception for a bug's traceback); debug lines may be free text."""
    free = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "logfmt.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value  # log.info(...) or p2pmem.log.info(...), not shell.log
            ours = (isinstance(owner, ast.Name) and owner.id == "log" or
                    isinstance(owner, ast.Attribute) and owner.attr == "log" and
                    isinstance(owner.value, ast.Name) and owner.value.id == "p2pmem")
            built = any(isinstance(a, ast.Call) and isinstance(a.func, ast.Attribute) and
                        a.func.attr == "line" and getattr(a.func.value, "id", "") == "logfmt"
                        for a in node.args)
            if ours and not built and node.func.attr in LOG_METHODS - {"debug"}:
                free.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert free == [], "log lines that are not key=value: " + ", ".join(free)


@pytest.mark.parametrize("value", ["", "a b", 'q"', "k=v", "tab\there", "naïve é"])
def test_values_that_need_quoting_are_json_strings(value: str) -> None:
    text = logfmt.line("event", "x", {"v": value})
    assert logfmt.parse(text)["v"] == value
    assert text.split("=", 2)[2].startswith('"')
