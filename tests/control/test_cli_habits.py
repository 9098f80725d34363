"""What nvmetcli / targetcli / SPDK users expect of the commands (issue #15): defaults,
global options anywhere, --version, the rpc CLI, systemd readiness and reload, the
console scripts of a fresh `pip install .`, the bench's exit status."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

import nvmet_p2p
from nvmet_p2p import cli
from nvmet_p2p.backends import open_backend
from nvmet_p2p.control import daemon as daemon_mod
from nvmet_p2p.control.defaults import DEFAULT_CONFIG, DEFAULT_RPC_SOCKET
from nvmet_p2p.control.rpc import METHODS, RpcClient, RpcServer
from nvmet_p2p.control.rpc.cli import parse_params
from nvmet_p2p.p2p.policy import P2PPolicy
from nvmet_p2p.testbed import bench
from tests.support.rpc import IO_TIMEOUT_S, RpcDaemon

REPO = Path(__file__).parents[2]
NQN = "nqn.2026-11.io.nvmet-p2p:habits"


def subcommands() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


# -- defaults and global options -------------------------------------------------------

def test_serve_defaults_to_the_control_socket_and_the_config_file() -> None:
    args = cli.build_parser().parse_args(["serve"])
    assert args.rpc_socket == DEFAULT_RPC_SOCKET == "/run/nvmet-p2p.sock"
    assert args.config is None and DEFAULT_CONFIG == "/etc/nvmet-p2p/config.json"
    assert cli.build_parser().parse_args(["serve", "--no-rpc-socket"]).no_rpc_socket


def test_a_missing_default_config_starts_empty(tmp_path: Path) -> None:
    d = daemon_mod.Daemon(str(tmp_path / "absent.json"), None, optional_config=True)
    try:
        d.load()
        assert d.target.root.is_empty()
    finally:
        d.close()


@pytest.mark.parametrize("argv", [
    ["serve", "--config", "F", "--log-level", "debug"],  # the README's own line
    ["--log-level", "debug", "serve", "--config", "F"],
    ["rpc", "status", "--log-level", "debug"],
    ["p2p", "--log-level", "debug", "distance", "--provider", "0000:01:00.0", "--client",
     "x"],
])
def test_global_options_before_or_after_the_subcommand(argv: list[str]) -> None:
    assert cli.build_parser().parse_args(argv).log_level == "debug"


@pytest.mark.parametrize("command", [[], *([c] for c in subcommands())])
def test_version_on_every_command(command: list[str], capsys: pytest.CaptureFixture[str]
                                  ) -> None:
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args([*command, "--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"nvmet-p2p {nvmet_p2p.__version__}"


def test_version_rpc(daemon: RpcDaemon) -> None:
    with daemon.client() as c:
        assert c.call("version") == {"version": nvmet_p2p.__version__,
                                     "methods": list(METHODS)}


# -- the rpc CLI ---------------------------------------------------------------------------

def test_rpc_help_lists_every_method_and_each_method_has_help(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["rpc", "--help"])
    out = capsys.readouterr().out
    assert all(f"  {m} " in out for m in METHODS)
    assert cli.main(["rpc", "help", "create"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("create: ") and "attrs (optional):" in out
    assert cli.main(["rpc", "help", "nope"]) == 1


def test_rpc_params_as_json_or_name_value() -> None:
    assert parse_params(['{"path": "/"}']) == {"path": "/"}
    assert parse_params(["path=/ports", "name=1", 'attrs={"addr": {"trtype": "loop"}}']) == {
        "path": "/ports", "name": 1, "attrs": {"addr": {"trtype": "loop"}}}
    with pytest.raises(ValueError, match="is not name=value"):
        parse_params(["oops"])


def test_rpc_cli_against_the_daemon(daemon: RpcDaemon, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    sock = ["--rpc-socket", daemon.socket]
    assert cli.main(["rpc", *sock, "clear_config"]) == 0
    assert cli.main(["rpc", *sock, "create", "path=/subsystems", f"name={NQN}"]) == 0
    capsys.readouterr()
    assert cli.main(["rpc", *sock, "list", "path=/subsystems"]) == 0
    assert json.loads(capsys.readouterr().out)["children"][0]["name"] == NQN
    assert cli.main(["rpc", *sock, "delete", "path=/nope"]) == 1
    assert "not a path of the nvmet tree" in capsys.readouterr().err
    cli.main(["rpc", *sock, "clear_config"])


def test_rpc_wait_for_a_daemon_started_a_moment_later(tmp_path: Path) -> None:
    import asyncio

    from nvmet_p2p.core.target import Target

    path = str(Path(tempfile.mkdtemp(prefix="nvmet-wait-")) / "ctl.sock")
    loop = asyncio.new_event_loop()
    policy = P2PPolicy()
    target = Target(loop=loop, open_backend=open_backend, p2p=policy)
    server = RpcServer(SimpleNamespace(target=target, p2p=policy, config_path=None), path)

    def late_start() -> None:
        time.sleep(0.5)
        loop.run_until_complete(server.start())
        loop.run_forever()
    thread = threading.Thread(target=late_start, daemon=True)
    thread.start()
    try:
        assert cli.main(["rpc", "--rpc-socket", path, "version"]) == 1  # not up yet
        assert cli.main(["rpc", "--rpc-socket", path, "--wait", "10", "version"]) == 0
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(IO_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(IO_TIMEOUT_S)


# -- systemd: readiness, reload, stop --------------------------------------------------------

@pytest.fixture
def notified(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    d = tempfile.mkdtemp(prefix="nvmet-notify-")
    path = os.path.join(d, "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(30.0)
    yield s, path
    s.close()
    os.unlink(path)
    os.rmdir(d)


def _config(nqn: str) -> str:
    return json.dumps({"hosts": [], "ports": [], "subsystems": [
        {"nqn": nqn, "attr": {"allow_any_host": "1"}, "namespaces": []}]})


@pytest.mark.timeout(60)
def test_systemd_notify_ready_and_sighup_reloads_all_or_nothing(
        notified: tuple[socket.socket, str]) -> None:
    box, notify_path = notified
    d = Path(tempfile.mkdtemp(prefix="nvmet-sd-"))
    config, sock = d / "config.json", str(d / "ctl.sock")
    config.write_text(_config(NQN))
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    proc = subprocess.Popen([sys.executable, "-m", "nvmet_p2p.cli", "serve", "--config",
                             str(config), "--rpc-socket", sock], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert box.recv(4096) == b"READY=1"
        with RpcClient(sock, timeout=IO_TIMEOUT_S) as c:  # ready means ready
            assert [x["name"] for x in c.call("list", path="/subsystems")["children"]] == [NQN]
        config.write_text(_config(NQN + "-2"))
        proc.send_signal(signal.SIGHUP)
        assert box.recv(4096).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        assert box.recv(4096) == b"READY=1"
        with RpcClient(sock, timeout=IO_TIMEOUT_S) as c:
            assert [x["name"] for x in c.call("list", path="/subsystems")["children"]] == [
                NQN + "-2"]
        config.write_text('{"subsystems": [{"nqn": "bad/nqn"}]}')
        proc.send_signal(signal.SIGHUP)
        box.recv(4096)
        assert box.recv(4096) == b"READY=1"
        with RpcClient(sock, timeout=IO_TIMEOUT_S) as c:  # unchanged, still serving
            assert [x["name"] for x in c.call("list", path="/subsystems")["children"]] == [
                NQN + "-2"]
        proc.send_signal(signal.SIGTERM)
        assert box.recv(4096) == b"STOPPING=1"
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    assert "was not reloaded; the configuration is unchanged" in err
    assert "Traceback" not in err
    assert not os.path.exists(sock)  # the socket is not left behind


def test_the_systemd_unit_uses_notify_and_reload() -> None:
    unit = (REPO / "tools" / "nvmet-p2p.service").read_text()
    lines = {ln.split("=", 1)[0]: ln.split("=", 1)[1] for ln in unit.splitlines()
             if "=" in ln and not ln.startswith("#")}
    assert lines["Type"] == "notify"
    assert lines["ExecStart"].endswith("nvmet-p2p serve")
    assert lines["ExecReload"] == "/bin/kill -HUP $MAINPID"


# -- the bench -----------------------------------------------------------------------------

def _bench_args(tmp_path: Path) -> argparse.Namespace:
    return cli.build_parser().parse_args(["bench", "--quick", "--out", str(tmp_path)])


def test_bench_without_matplotlib_says_so_before_running(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name: None if name == "matplotlib" else real(name))
    monkeypatch.setattr(bench, "_run_vm", lambda *a: pytest.fail("the matrix ran"))
    assert bench._run(_bench_args(tmp_path)) == 2
    assert "needs matplotlib" in capsys.readouterr().err


def test_bench_fails_when_runs_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_vm(args: object, out: Path, *rest: object) -> int:
        (out / "results.json").write_text(json.dumps({"meta": {}, "runs": [
            {"target": "ours", "job": "j", "repeat": 0, "error": "fio failed"}]}))
        return 0
    monkeypatch.setattr(bench, "_run_vm", fake_vm)
    monkeypatch.setattr(bench, "write_report", lambda results, out: (
        out / "results.md", out / "results.png"))
    (tmp_path / "results.md").write_text("")
    assert bench._run(_bench_args(tmp_path)) == 1


def test_bench_job_files_are_package_data() -> None:
    assert bench.JOBS_DIR.parent == Path(bench.__file__).parent
    assert sorted(p.stem for p in bench.JOBS_DIR.glob("*.fio")) == sorted(bench.JOB_NAMES)


# -- a fresh venv ----------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_pip_install_into_a_fresh_venv_gives_working_scripts(tmp_path: Path) -> None:
    """`pip install .` (no extras): both console scripts run, the job files are there."""
    src = tmp_path / "src"  # setuptools builds in the source tree: not in the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".vm", "build", "*.egg-info", "tests", "__pycache__", "results"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(src)],
                         capture_output=True, text=True, timeout=240, check=False)
    if pip.returncode != 0 and "No matching distribution" in pip.stderr:
        pytest.skip(f"no package index reachable for the dependencies: {pip.stderr[-300:]}")
    assert pip.returncode == 0, pip.stderr
    out = subprocess.run([str(venv / "bin" / "nvmet-p2p"), "--version"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=60, check=True)
    assert out.stdout.strip() == f"nvmet-p2p {nvmet_p2p.__version__}"
    shell = subprocess.run([str(venv / "bin" / "targetcli-ext"), "--help"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60,
                           check=False)
    assert shell.returncode == 1 and "pip install 'nvmet-p2p[shell]'" in shell.stderr
    assert "Traceback" not in shell.stderr
    jobs = subprocess.run([str(venv / "bin" / "python"), "-c",
                           ("from nvmet_p2p.testbed import bench; "
                            "print(len(list(bench.JOBS_DIR.glob('*.fio'))), "
                            "bench.DEFAULT_RESULTS_DIR)")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          check=True).stdout.split()
    assert int(jobs[0]) == len(bench.JOB_NAMES)
    assert jobs[1] == str(tmp_path / "nvmet-p2p-bench")  # not inside site-packages


# -- examples ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "examples").glob("*.json")))
def test_example_configurations_load(name: str) -> None:
    from nvmet_p2p.config import jsonfile
    from nvmet_p2p.configfs import Root

    root = Root()
    root.restore(jsonfile.read_doc(REPO / "examples" / name), source=name)
    assert root.subsystems and root.ports and not root.warnings()


def test_quickstart_example_runs() -> None:
    out = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart_loop.py")],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "namespaces: [1]" in out and "read back: b'hello, nvmet-p2p'" in out
