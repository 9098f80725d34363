"""targetcli-ext against a running daemon: commands, golden `ls`, exit codes, completion.

configshell-fb binds stdout when it is imported, so output is read with `capfd`; its
Prefs/Log/Console are Borgs, so each test starts from empty preferences in a fresh
directory.  Golden files are in tests/fixtures/shell/: every line is matched whole,
runs of the tree's padding dots count as one, and `*` stands for volatile text (P2P
reasons worded by the policy, sizes).
"""

from __future__ import annotations

import builtins
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from configshell_fb import ConfigShell
from configshell_fb import prefs as cs_prefs
from configshell_fb import shell as cs_shell

from nvmet_p2p.control.shell import main, make_shell, run_command
from tests.support.loop_env import SUBNQN, LoopEnv
from tests.support.rpc import InProcess, RpcDaemon

FIXTURES = Path(__file__).parents[1] / "fixtures" / "shell"
NQN = "nqn.2026-11.io.nvmet-p2p:shell"
HOST = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
NS = f"/subsystems/{NQN}/namespaces/1"


@pytest.fixture
def sh(daemon: RpcDaemon, tmp_path: Path,
       capfd: pytest.CaptureFixture[str]) -> Iterator[ConfigShell]:
    cs_prefs.Prefs._Prefs__borg_state.clear()  # type: ignore[attr-defined]
    cs_prefs.Prefs._prefs = {}
    with daemon.client() as c:
        c.call("clear_config")
    shell = make_shell(daemon.socket, str(tmp_path / "prefs"))
    capfd.readouterr()
    yield shell
    shell._root_node.rpc.close()


def run(shell: ConfigShell, capfd: pytest.CaptureFixture[str], line: str) -> tuple[int, str,
                                                                                    str]:
    rc = run_command(shell, line)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def ok(shell: ConfigShell, capfd: pytest.CaptureFixture[str], line: str) -> str:
    rc, out, err = run(shell, capfd, line)
    assert rc == 0, f"{line!r} failed: {err}"
    return out


def build(shell: ConfigShell, capfd: pytest.CaptureFixture[str]) -> None:
    for line in (f"/subsystems create {NQN}",
                 f"/subsystems/{NQN}/namespaces create path=mem0 backend=memory size=1M",
                 f"{NS} enable",
                 "/ports create 1 trtype=loop",
                 "/ports/1 set attr allow_p2pmem=1",
                 f"/ports/1/subsystems create {NQN}",
                 f"/hosts create {HOST}",
                 f"/subsystems/{NQN}/allowed_hosts create {HOST}",
                 "/ports create 2 trtype=rdma adrfam=ipv4 traddr=192.0.2.1 trsvcid=4420",
                 ("/ports/2/referrals create r1 trtype=rdma adrfam=ipv4 traddr=192.0.2.9 "
                  "portid=9")):
        ok(shell, capfd, line)


def matches(golden: str, actual: str) -> None:
    def norm(text: str) -> list[str]:
        # the padding between name and summary depends on the terminal width
        return [re.sub(r" \.*\s?\[", " [", line.rstrip()) for line in text.strip().splitlines()]

    want, got = norm(golden), norm(actual)
    assert len(want) == len(got), "\n".join(got)
    for w, g in zip(want, got, strict=True):
        pattern = ".*".join(re.escape(part) for part in w.split("*"))
        assert re.fullmatch(pattern, g), f"\nwant: {w}\ngot:  {g}\nall:\n" + "\n".join(got)


def test_golden_ls(sh: ConfigShell, capfd: pytest.CaptureFixture[str]) -> None:
    build(sh, capfd)
    matches((FIXTURES / "ls_full.txt").read_text(), ok(sh, capfd, "ls"))
    matches((FIXTURES / "ls_port.txt").read_text(), ok(sh, capfd, "ls /ports/1"))


def test_golden_ls_empty(sh: ConfigShell, capfd: pytest.CaptureFixture[str]) -> None:
    matches((FIXTURES / "ls_empty.txt").read_text(), ok(sh, capfd, "ls"))


def test_the_shell_keeps_no_state(sh: ConfigShell, daemon: RpcDaemon,
                                  capfd: pytest.CaptureFixture[str]) -> None:
    build(sh, capfd)
    assert "192.0.2.9" in ok(sh, capfd, "ls /ports/2")
    with daemon.client() as c:  # another client changes the target behind the shell's back
        c.call("delete", path="/ports/2")
        c.call("create", path="/ports", name=3, attrs={"addr": {"trtype": "loop"}})
    out = ok(sh, capfd, "ls /ports")
    assert "o- 3 " in out and "o- 2 " not in out
    rc, _, err = run(sh, capfd, "cd /ports/2")
    assert rc == 1 and "No such path /ports/2" in err


def test_get_set(sh: ConfigShell, capfd: pytest.CaptureFixture[str]) -> None:
    build(sh, capfd)
    assert ok(sh, capfd, "/ports/1 get attr") == "allow_p2pmem=1\n"
    assert ok(sh, capfd, "/ports/1 get addr trtype") == "trtype=loop\n"
    assert ok(sh, capfd, f"{NS} get attr") == "enable=1\nbuffered_io=0\np2pmem=1\n"
    assert ok(sh, capfd, f"{NS} set attr enable=0 p2pmem=0") == (
        "Parameter enable is now '0'.\nParameter p2pmem is now '0'.\n")
    groups = ok(sh, capfd, f"{NS} get")
    assert "global" in groups and "device" in groups and "attr" in groups
    rc, _, err = run(sh, capfd, f"{NS} set bogus x=1")
    assert rc == 1 and "no group 'bogus'" in err and "device" in err
    rc, _, err = run(sh, capfd, f"{NS} get device nothing")
    assert rc == 1 and "no attribute 'nothing' in group device" in err
    # the daemon's refusal, as one line
    rc, out, err = run(sh, capfd, "/ports/1 set addr trtype=rdma")
    assert rc == 1 and not out
    assert err.strip() == (f"port 1 is enabled (subsystems linked: {NQN}), so addr_trtype "
                           "cannot change; unlink its subsystems first")
    # all or nothing: the first value is not left behind
    rc, _, err = run(sh, capfd, "/ports/2 set addr trsvcid=4421 adrfam=bogus")
    assert rc == 1 and "bogus" in err
    assert ok(sh, capfd, "/ports/2 get addr trsvcid") == "trsvcid=4420\n"
    # the shell's own preferences group still works
    assert "tree_round_nodes" in ok(sh, capfd, "set global tree_round_nodes=false")
    assert ok(sh, capfd, "get global tree_round_nodes").startswith("tree_round_nodes=false")


LOOP_STOP_TIMEOUT_S = 5.0


def test_identified_subsystem_refusal(target_env: LoopEnv, tmp_path: Path,
                                      capfd: pytest.CaptureFixture[str]) -> None:
    """A refusal that needs a host: the daemon is the in-process target of a loop host,
    its event loop run in a thread while the shell's blocking client talks to it."""
    server = InProcess(target_env)
    target_env.connect().identify_ctrl()
    loop = target_env.loop
    thread = threading.Thread(target=loop.run_forever, name="target-loop")
    thread.start()
    cs_prefs.Prefs._Prefs__borg_state.clear()  # type: ignore[attr-defined]
    cs_prefs.Prefs._prefs = {}
    shell = make_shell(server.path, str(tmp_path / "prefs"))
    try:
        capfd.readouterr()
        path = f"/subsystems/{SUBNQN}"
        serial = ok(shell, capfd, f"{path} get attr serial")
        rc, out, err = run(shell, capfd, f"{path} set attr serial=SN-NEW")
        assert rc == 1 and not out
        assert err.strip() == (f"subsystem {SUBNQN} has been identified by a host, so "
                               f"attr_serial cannot change (hosts know it as "
                               f"'{serial.strip().split('=', 1)[1]}'); delete and re-create "
                               "the subsystem to change it")
        assert ok(shell, capfd, f"{path} get attr serial") == serial
        assert ok(shell, capfd, f"{path} set attr qid_max=4") == (
            "Parameter qid_max is now '4'.\n")
    finally:
        shell._root_node.rpc.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(LOOP_STOP_TIMEOUT_S)
        server.close()


def test_ls_and_p2p_show_where_the_payload_went(target_env: LoopEnv, tmp_path: Path,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    server = InProcess(target_env)
    host = target_env.connect()
    host.write(1, 0, bytes(range(256)) * 16)
    host.read(1, 0, 8)
    loop = target_env.loop
    thread = threading.Thread(target=loop.run_forever, name="target-loop")
    thread.start()
    cs_prefs.Prefs._Prefs__borg_state.clear()  # type: ignore[attr-defined]
    cs_prefs.Prefs._prefs = {}
    shell = make_shell(server.path, str(tmp_path / "prefs"))
    try:
        capfd.readouterr()
        ns = f"/subsystems/{SUBNQN}/namespaces/1"
        listed = ok(shell, capfd, f"ls {ns}")
        assert listed.rstrip().endswith(
            "system memory: port 1: allow_p2pmem is off, 0 P2P, 8K system memory]")
        assert ok(shell, capfd, f"{ns} p2p").rstrip().endswith(
            "payload so far: 0 bytes P2P, 8192 in system memory (port 1: allow_p2pmem is "
            "off: 8192)")
    finally:
        shell._root_node.rpc.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(LOOP_STOP_TIMEOUT_S)
        server.close()


def test_enable_disable_delete(sh: ConfigShell, daemon: RpcDaemon,
                               capfd: pytest.CaptureFixture[str]) -> None:
    build(sh, capfd)
    assert ok(sh, capfd, f"{NS} disable") == f"Disabled {NS}.\n"
    with daemon.client() as c:
        assert c.call("status")["subsystems"][NQN]["namespaces"] == []
    assert "disabled" in ok(sh, capfd, f"ls {NS}")
    assert ok(sh, capfd, f"{NS} enable") == f"Enabled {NS}.\n"
    assert ok(sh, capfd, "/ports/2/referrals/r1 enable") == "Enabled /ports/2/referrals/r1.\n"
    assert ok(sh, capfd, f"/ports/1/subsystems delete {NQN}") == (
        f"Deleted /ports/1/subsystems/{NQN}.\n")
    assert ok(sh, capfd, f"/subsystems/{NQN}/allowed_hosts delete {HOST}") == (
        f"Deleted /subsystems/{NQN}/allowed_hosts/{HOST}.\n")
    ok(sh, capfd, f"/subsystems delete {NQN}")
    rc, _, err = run(sh, capfd, f"/subsystems delete {NQN}")
    assert rc == 1 and "does not exist" in err
    assert ok(sh, capfd, "/subsystems/ ls").count("o-") == 1


def test_namespace_create_picks_the_lowest_free_nsid(sh: ConfigShell,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    ok(sh, capfd, f"/subsystems create {NQN}")
    ns_dir = f"/subsystems/{NQN}/namespaces"
    ok(sh, capfd, f"{ns_dir} create 2")
    assert ok(sh, capfd, f"{ns_dir} create") == f"Created {ns_dir}/1.\n"
    assert ok(sh, capfd, f"{ns_dir} create") == f"Created {ns_dir}/3.\n"


def test_saveconfig_restoreconfig_clear(sh: ConfigShell, capfd: pytest.CaptureFixture[str],
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    build(sh, capfd)
    monkeypatch.chdir(tmp_path)  # a relative file is the shell's, not the daemon's cwd
    assert ok(sh, capfd, "/ports/1 saveconfig saved.json") == (
        f"Configuration saved to {tmp_path / 'saved.json'}.\n")
    doc = json.loads((tmp_path / "saved.json").read_text())
    assert doc["ports"][0]["attr"] == {"allow_p2pmem": "1"}
    rc, _, err = run(sh, capfd, "restoreconfig saved.json")
    assert rc == 1 and "replace" in err
    assert ok(sh, capfd, "/ clear confirm=true") == "All configuration cleared.\n"
    assert "[Ports: 0]" in ok(sh, capfd, "ls /ports")
    assert ok(sh, capfd, "restoreconfig saved.json") == (
        "Configuration restored from saved.json: 1 hosts, 1 subsystems, 2 ports.\n")
    assert "P2P allowed" in ok(sh, capfd, "ls /ports/1")
    ok(sh, capfd, "restoreconfig saved.json clear_existing=true")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hosts": [{"nqn": "bad/1"}], "ports": [{"portid": "x"}]}))
    rc, _, err = run(sh, capfd, f"restoreconfig {bad} clear_existing=true")
    assert rc == 1 and "2 error(s)" in err and "nothing was loaded" in err
    assert "P2P allowed" in ok(sh, capfd, "ls /ports/1")  # the previous one is still there


def test_status_and_p2p(sh: ConfigShell, capfd: pytest.CaptureFixture[str]) -> None:
    build(sh, capfd)
    ns_status = json.loads(ok(sh, capfd, f"{NS} status"))
    assert ns_status["nsid"] == 1 and "read_cmds" in ns_status["stats"]
    assert json.loads(ok(sh, capfd, "/ports/1 status")) == {"listening": True}
    everything = json.loads(ok(sh, capfd, "status"))
    assert NQN in everything["subsystems"]
    out = ok(sh, capfd, f"{NS} p2p")
    assert out.startswith(f"port 1 {NQN} ns 1: ") or "No P2P decision" in out


def test_one_shot_exit_codes(daemon: RpcDaemon, tmp_path: Path,
                             capfd: pytest.CaptureFixture[str]) -> None:
    cs_prefs.Prefs._Prefs__borg_state.clear()  # type: ignore[attr-defined]
    cs_prefs.Prefs._prefs = {}
    with daemon.client() as c:
        c.call("clear_config")
    base = ["--rpc-socket", daemon.socket, "--prefs-dir", str(tmp_path / "p")]
    assert main([*base, "/ports", "create", "1", "trtype=loop"]) == 0
    assert main([*base, "/ports/1", "set", "attr", "allow_p2pmem=1"]) == 0
    out, _ = capfd.readouterr()
    assert "Parameter allow_p2pmem is now '1'." in out
    assert main([*base, "/ports/1", "set", "attr", "allow_p2pmem=maybe"]) == 1
    assert main([*base, "/ports/9", "ls"]) == 1
    assert main([*base, "/ports/1", "frobnicate"]) == 1
    _, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in err
    assert "boolean" in lines[0] and "No such path /ports/9" in lines[1]
    assert "frobnicate" in lines[2]


def test_no_daemon_message(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    sock = str(tmp_path / "none.sock")
    assert main(["--rpc-socket", sock, "--prefs-dir", str(tmp_path / "p"), "ls"]) == 1
    _, err = capfd.readouterr()
    assert err.strip() == (f"cannot reach nvmet-p2p at {sock}: No such file or directory "
                           f"(is `nvmet-p2p serve --rpc-socket {sock}` running?)")
    assert main(["--rpc-socket", sock, "--prefs-dir", str(tmp_path / "p")]) == 1  # interactive
    _, err = capfd.readouterr()
    assert "cannot reach nvmet-p2p" in err


def typed(monkeypatch: pytest.MonkeyPatch, *lines: str) -> None:
    """The interactive shell reads `lines`, then end of input (Ctrl-D)."""
    it = iter(lines)

    def fake_input(prompt: str = "") -> str:
        print(prompt, end="")
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)


def test_interactive_session(sh: ConfigShell, daemon: RpcDaemon,
                             tmp_path: Path, capfd: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    typed(monkeypatch, "cd /ports", "create 4 trtype=loop", "cd 4", "set attr allow_p2pmem=1",
          "set addr trtype=carrier", "ls", "exit")
    assert main(["--rpc-socket", daemon.socket, "--prefs-dir", str(tmp_path / "p")]) == 0
    out, err = capfd.readouterr()
    assert "/ports> " in out and "/ports/4> " in out
    assert "Parameter allow_p2pmem is now '1'." in out
    assert "carrier" in err  # the error was shown and the session went on to `ls`
    assert "loop, P2P allowed" in out


# -- completion -----------------------------------------------------------------------

def complete(shell: ConfigShell, monkeypatch: pytest.MonkeyPatch, line: str) -> list[str]:
    """What TAB offers at the end of `line`, through configshell's own dispatcher."""
    begidx = len(line) - len(re.split(r"[\s]", line)[-1])
    monkeypatch.setattr(cs_shell.readline, "get_line_buffer", lambda: line)
    monkeypatch.setattr(cs_shell.readline, "get_begidx", lambda: begidx)
    monkeypatch.setattr(cs_shell.readline, "get_endidx", lambda: len(line))
    out = []
    text = line[begidx:]
    while (c := shell._complete(text, len(out))) is not None:
        out.append(c)
    return out


def test_complete_paths(sh: ConfigShell, capfd: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    build(sh, capfd)
    assert complete(sh, monkeypatch, "ls /po") == ["/ports/"]
    assert set(complete(sh, monkeypatch, "ls /ports/")) >= {"/ports/1/", "/ports/2/"}
    assert complete(sh, monkeypatch, f"cd /subsystems/{NQN}/na") == [
        f"/subsystems/{NQN}/namespaces/"]
    sh.run_cmdline(f"cd /subsystems/{NQN}/namespaces/1")
    assert "enable " in complete(sh, monkeypatch, "en")
    assert complete(sh, monkeypatch, "p2") == ["p2p "]


def test_complete_groups_names_values(sh: ConfigShell, capfd: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    build(sh, capfd)
    sh.run_cmdline("cd /ports/2")
    assert set(complete(sh, monkeypatch, "set ")) >= {"global", "addr", "param", "attr"}
    assert complete(sh, monkeypatch, "set pa") == ["param "]
    assert complete(sh, monkeypatch, "set addr trt") == ["trtype="]
    assert complete(sh, monkeypatch, "set addr trtype=") == [
        "trtype=rdma", "trtype=tcp", "trtype=loop"]
    assert complete(sh, monkeypatch, "set addr adrfam=ip") == ["adrfam=ipv4", "adrfam=ipv6"]
    assert complete(sh, monkeypatch, "get addr trs") == ["trsvcid "]
    sh.run_cmdline(f"cd {NS}")
    assert complete(sh, monkeypatch, "set attr p2") == ["p2pmem="]
    assert complete(sh, monkeypatch, "set attr enable=") == ["enable=0", "enable=1"]
    assert complete(sh, monkeypatch, "set device block_size=") == [
        "block_size=512", "block_size=4096"]


def test_complete_create_and_delete(sh: ConfigShell, capfd: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    build(sh, capfd)
    ok(sh, capfd, "/subsystems create nqn.2026-11.io.nvmet-p2p:other")
    sh.run_cmdline("cd /ports/1/subsystems")
    # only subsystems not linked yet
    assert complete(sh, monkeypatch, "create nqn") == ["nqn.2026-11.io.nvmet-p2p:other "]
    assert complete(sh, monkeypatch, "delete nqn") == [f"{NQN} "]


def test_launcher_script(daemon: RpcDaemon, tmp_path: Path) -> None:
    launcher = Path(__file__).parents[2] / "targetcli-ext"
    r = subprocess.run([sys.executable, str(launcher), "--rpc-socket", daemon.socket,
                        "--prefs-dir", str(tmp_path / "p"), "ls", "/", "1"],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert "o- hosts" in r.stdout


# -- the habits of targetcli users (issue #15) ---------------------------------------------

def test_complete_create_parameters(sh: ConfigShell, capfd: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    sh.run_cmdline("cd /ports")
    assert complete(sh, monkeypatch, "create 3 trt") == ["trtype="]
    assert complete(sh, monkeypatch, "create 3 trtype=") == [
        "trtype=rdma", "trtype=tcp", "trtype=loop"]
    ok(sh, capfd, f"/subsystems create {NQN}")
    sh.run_cmdline(f"cd /subsystems/{NQN}/namespaces")
    assert complete(sh, monkeypatch, "create 1 backend=v") == ["backend=vfio-nvme "]
    assert "block_size=" in complete(sh, monkeypatch, "create 1 bl")


def test_clear_asks_for_confirmation(sh: ConfigShell, capfd: pytest.CaptureFixture[str]
                                     ) -> None:
    build(sh, capfd)
    rc, _, err = run(sh, capfd, "/ clear")
    assert rc == 1 and "run `clear confirm=true`" in err
    assert "[Ports: 2]" in ok(sh, capfd, "ls /ports")
    assert ok(sh, capfd, "/ clear confirm=true") == "All configuration cleared.\n"


def test_restoreconfig_speaks_the_shells_parameter_names(
        sh: ConfigShell, daemon: RpcDaemon, capfd: pytest.CaptureFixture[str]) -> None:
    build(sh, capfd)
    ok(sh, capfd, "saveconfig")  # bare: the daemon's file
    rc, _, err = run(sh, capfd, "restoreconfig")  # bare: the same file
    assert rc == 1 and "clear_existing=true" in err and "replace: true" not in err
    assert "1 subsystems, 2 ports" in ok(sh, capfd, "restoreconfig clear_existing=true")


def test_quoted_values(sh: ConfigShell, capfd: pytest.CaptureFixture[str]) -> None:
    build(sh, capfd)
    assert ok(sh, capfd, '/ports/2 set addr treq="not required"') == (
        "Parameter treq is now 'not required'.\n")
    assert ok(sh, capfd, "/ports/2 set addr treq='not specified'") == (
        "Parameter treq is now 'not specified'.\n")


def test_ls_rounds_sizes_and_info_has_the_details(sh: ConfigShell,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    build(sh, capfd)
    assert "(memory 1M)" in ok(sh, capfd, f"ls {NS}")
    info = ok(sh, capfd, f"{NS} info")
    assert "device_size: 1048576\n" in info and "attr_enable: 1\n" in info
    assert '"nsid": 1' in info  # the run-time part
    summaries = [line[line.index("[") + 1:-1] for line in ok(sh, capfd, "ls").splitlines()
                 if "[" in line]
    assert max(len(x) for x in summaries) <= 100  # long P2P reasons are cut; info has them


@pytest.mark.parametrize("width", [80, 100, 200])
def test_ls_fits_the_terminal(sh: ConfigShell, capfd: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    """The P2P reason of a namespace is cut to what its ls line has left, so the tree
    does not wrap at 80 columns (names longer than the terminal still do)."""
    build(sh, capfd)
    monkeypatch.setattr(type(sh.con), "get_width", lambda self: width)
    [line] = [ln for ln in ok(sh, capfd, "ls /subsystems").splitlines()
              if ln.strip().startswith("o- 1 ")]
    assert len(line) <= width, line
    assert "mem0 (memory 1M), enabled, system memory: " in line
    assert line.endswith("(info)]")  # the whole reason is in `info`
    assert "is not a PCI device" in ok(sh, capfd, f"{NS} p2p")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert "targetcli-ext (nvmet-p2p)" in capsys.readouterr().out


def _saved_ports(daemon: RpcDaemon) -> list[int]:
    return [p["portid"] for p in json.loads(daemon.config.read_text())["ports"]]


@pytest.mark.parametrize("leave", ["exit", None])  # None: end of input, Ctrl-D
def test_auto_save_on_exit_saves_to_the_daemons_file(
        sh: ConfigShell, daemon: RpcDaemon, tmp_path: Path, leave: str | None,
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    ok(sh, capfd, "saveconfig")
    assert _saved_ports(daemon) == []
    typed(monkeypatch, "/ports create 5 trtype=loop", "get global auto_save_on_exit",
          *([leave] if leave else []))
    assert main(["--rpc-socket", daemon.socket, "--prefs-dir", str(tmp_path / "p")]) == 0
    out, err = capfd.readouterr()
    assert "auto_save_on_exit=true" in out  # targetcli's default
    assert f"Configuration saved to {daemon.config}." in out, out + err
    assert _saved_ports(daemon) == [5]


def test_auto_save_on_exit_off_and_one_shot_commands_leave_the_file(
        sh: ConfigShell, daemon: RpcDaemon, tmp_path: Path,
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    ok(sh, capfd, "saveconfig")
    prefs = ["--rpc-socket", daemon.socket, "--prefs-dir", str(tmp_path / "p")]
    assert main([*prefs, "/ports", "create", "6", "trtype=loop"]) == 0  # one command: no save
    assert _saved_ports(daemon) == []
    typed(monkeypatch, "set global auto_save_on_exit=false", "/ports create 7 trtype=loop",
          "exit")
    assert main(prefs) == 0
    out, _ = capfd.readouterr()
    assert "Configuration saved" not in out
    assert _saved_ports(daemon) == []
    typed(monkeypatch, "exit")  # the preference is kept in the preferences directory
    cs_prefs.Prefs._Prefs__borg_state.clear()  # type: ignore[attr-defined]
    cs_prefs.Prefs._prefs = {}
    assert main(prefs) == 0
    assert "Configuration saved" not in capfd.readouterr().out
    assert _saved_ports(daemon) == []


def test_auto_save_on_exit_without_a_daemon_file_fails_clearly(
        target_env: LoopEnv, tmp_path: Path, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cs_prefs.Prefs._Prefs__borg_state.clear()  # type: ignore[attr-defined]
    cs_prefs.Prefs._prefs = {}
    server = InProcess(target_env)  # a daemon with no configuration file
    loop = target_env.loop
    thread = threading.Thread(target=loop.run_forever, name="target-loop")
    thread.start()
    try:
        typed(monkeypatch, "exit")
        result = [main(["--rpc-socket", server.path, "--prefs-dir", str(tmp_path / "p")])]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(LOOP_STOP_TIMEOUT_S)
        server.close()
    _, err = capfd.readouterr()
    assert result == [1]
    assert "started without --config" in err and "not saved on exit" in err
    assert "Traceback" not in err
