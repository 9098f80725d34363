"""The control socket from a test: a real `nvmet-p2p serve` subprocess, or `RpcServer`
in-process on a `LoopEnv`'s loop (for live effects on loop hosts in the same thread)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nvmet_p2p.control.rpc import RpcClient, RpcError, RpcServer, RpcUnreachable
from tests.support.loop_env import LoopEnv

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
IO_TIMEOUT_S = 5.0


class RpcDaemon:
    """`nvmet-p2p serve` in a subprocess with a control socket in a short tmp dir."""

    def __init__(self) -> None:
        # Unix socket paths are limited to 108 bytes: pytest's tmp_path can be longer.
        self.dir = Path(tempfile.mkdtemp(prefix="nvmet-rpc-"))
        self.socket = str(self.dir / "ctl.sock")
        self.config = self.dir / "config.json"
        self.config.write_text('{"hosts": [], "ports": [], "subsystems": []}\n')
        self.log = open(self.dir / "daemon.log", "w+b")  # noqa: SIM115 closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nvmet_p2p.cli", "serve", "--config", str(self.config),
             "--rpc-socket", self.socket], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"nvmet-p2p serve did not come up:\n{self.output()}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with RpcClient(self.socket, timeout=1.0) as c:
                c.call("list", path="/")
            return True
        except RpcUnreachable:
            return False

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def client(self) -> RpcClient:
        return RpcClient(self.socket, timeout=IO_TIMEOUT_S)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class InProcess:
    """RpcServer on the LoopEnv's loop; calls go through the socket on that loop."""

    def __init__(self, env: LoopEnv) -> None:
        self.env = env
        self.dir = Path(tempfile.mkdtemp(prefix="nvmet-rpc-"))
        self.path = str(self.dir / "ctl.sock")
        self.server = RpcServer(SimpleNamespace(target=env.target, p2p=env.p2p,
                                                config_path=None), self.path)
        env.loop.run_until_complete(self.server.start())
        self._ids = 0

    def call(self, method: str, **params: Any) -> Any:
        async def go() -> Any:
            reader, writer = await asyncio.open_unix_connection(self.path)
            self._ids += 1
            writer.write(json.dumps({"jsonrpc": "2.0", "id": self._ids, "method": method,
                                     "params": params}).encode() + b"\n")
            line = await reader.readline()
            writer.close()
            await writer.wait_closed()
            return json.loads(line)

        reply = self.env.loop.run_until_complete(asyncio.wait_for(go(), IO_TIMEOUT_S))
        if "error" in reply:
            raise RpcError(reply["error"]["code"], reply["error"]["message"])
        return reply["result"]

    def close(self) -> None:
        self.env.loop.run_until_complete(self.server.close())
        shutil.rmtree(self.dir, ignore_errors=True)
