"""Our target as a subprocess inside the test VM, for tests that drive it from outside.

`VmTarget` writes an nvmetcli-format config into a scratch directory, starts
`nvmet-p2p serve --config FILE --rpc-socket SOCK` in its own process (pyverbs holds the
GIL while it blocks, so the target must never share the test's interpreter), waits
until the status RPC says every configured port listens, answers status through the
RPC socket, counts the process's open fds, and stops it with SIGTERM.  The target's
stderr goes to a log file; `stop()` and the context manager write its tail to stderr so
pytest shows it with a failing test.

`rdma_port()`, `tcp_port()`, `subsystem()` and `file_ns()` / `bdev_ns()` build the config pieces
with the keys README.md documents; `disconnect_all()` is the teardown that leaves no
Linux-host controller behind.  Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from nvmet_p2p.control.rpc import RpcClient, RpcError, RpcUnreachable
from nvmet_p2p.errors import VMError
from nvmet_p2p.testbed import guest, libnvme_host

# Importing pyverbs + asyncio takes ~5 s under TCG; a busy 2-vCPU guest needs more.
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
RPC_TIMEOUT = 30.0
LOG_TAIL = 12000  # characters of the target's log shown with a failure


# -- config pieces -------------------------------------------------------------------------

def rdma_port(portid: int, trsvcid: int, subsystems: list[str],
              traddr: str = guest.TRADDR) -> dict[str, Any]:
    return {"portid": portid,
            "addr": {"trtype": "rdma", "adrfam": "ipv4", "traddr": traddr,
                     "trsvcid": str(trsvcid)},
            "subsystems": subsystems}


def tcp_port(portid: int, trsvcid: int, subsystems: list[str], traddr: str = guest.TRADDR,
             adrfam: str = "ipv4", **param: str) -> dict[str, Any]:
    return {"portid": portid,
            "addr": {"trtype": "tcp", "adrfam": adrfam, "traddr": traddr,
                     "trsvcid": str(trsvcid)},
            "param": dict(param), "subsystems": subsystems}


def file_ns(nsid: int, path: str | os.PathLike[str], size: int,
            block_size: int = 512) -> dict[str, Any]:
    """A file namespace the target creates (sparse) if missing; buffered, for tmpfs."""
    return {"nsid": nsid, "enable": 1, "buffered_io": 1,
            "device": {"path": str(path), "backend": "file", "size": str(size),
                       "block_size": str(block_size), "create": "1"}}


def bdev_ns(nsid: int, path: str, block_size: int = 512) -> dict[str, Any]:
    return {"nsid": nsid, "enable": 1,
            "device": {"path": path, "backend": "bdev", "block_size": str(block_size)}}


def subsystem(nqn: str, namespaces: list[dict[str, Any]], *, allowed_hosts: Sequence[str] = (),
              **attr: str) -> dict[str, Any]:
    """A subsystem; with no `allowed_hosts` any host may connect."""
    hosts = list(allowed_hosts)
    return {"nqn": nqn, "attr": {"allow_any_host": "0" if hosts else "1", **attr},
            "allowed_hosts": hosts, "namespaces": namespaces}


def config(ports: list[dict[str, Any]], subsystems: list[dict[str, Any]]) -> dict[str, Any]:
    hosts = sorted({h for s in subsystems for h in s["allowed_hosts"]})
    return {"hosts": [{"nqn": h} for h in hosts], "ports": ports, "subsystems": subsystems}


# -- Linux host teardown ---------------------------------------------------------------------

def disconnect_all(subnqns: list[str], timeout: float = 60.0) -> list[str]:
    """Disconnect every Linux-host controller of these subsystems (libnvme: teardown is
    plumbing, not what the tests show of nvme-cli); returns what failed."""
    problems = []
    for nqn in subnqns:
        try:
            libnvme_host.disconnect(nqn, timeout=timeout)
        except VMError as e:
            problems.append(str(e))
    return problems


# -- the target process ----------------------------------------------------------------------

class VmTarget:
    """One `nvmet-p2p serve` process with `cfg`, its files under `workdir`."""

    def __init__(self, cfg: dict[str, Any], workdir: Path, log_level: str = "info") -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.config_path = workdir / "config.json"
        self.rpc_path = workdir / "rpc.sock"
        self.log_path = workdir / "target.log"
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "target not started"
        return self.proc.pid

    @property
    def subnqns(self) -> list[str]:
        return [s["nqn"] for s in self.cfg["subsystems"]]

    def start(self, timeout: float = START_TIMEOUT, *, wait: bool = True) -> Self:
        """Start the target; with `wait`, return once every port listens."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.cfg, indent=1))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nvmet_p2p.cli", "--log-level", self.log_level,
                 "serve", "--config", str(self.config_path),
                 "--rpc-socket", str(self.rpc_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            if wait:
                self.wait_listening(timeout)
            else:
                self.wait_answering(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _check_alive(self) -> None:
        if not self.alive():
            rc = self.proc.returncode if self.proc is not None else None
            raise VMError(f"target exited with {rc}:\n{self.log_tail()}")

    def wait_answering(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """The status once the control socket answers, whether or not ports listen."""
        def probe() -> dict[str, Any] | None:
            self._check_alive()
            if not self.rpc_path.exists():
                return None
            try:
                return self.status(timeout=10.0)
            except (RpcUnreachable, RpcError):
                return None
        return guest.wait_for(probe, timeout, "our target's control socket", interval=0.5)

    def wait_listening(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """The status once every configured port listens (the target died: VMError)."""
        want = {str(p["portid"]) for p in self.cfg["ports"]}

        def probe() -> dict[str, Any] | None:
            self._check_alive()
            if not self.rpc_path.exists():
                return None
            try:
                st = self.status(timeout=10.0)
            except (RpcUnreachable, RpcError):
                return None  # the socket exists before the server answers
            listening = {str(k) for k, v in st.get("ports", {}).items() if v.get("listening")}
            return st if want <= listening else None
        return guest.wait_for(probe, timeout, "our target's ports to listen", interval=0.5)

    def rpc(self, method: str, *, timeout: float = RPC_TIMEOUT, **params: Any) -> Any:
        """One JSON-RPC call on the target's control socket."""
        with RpcClient(str(self.rpc_path), timeout=timeout) as client:
            return client.call(method, **params)

    def status(self, timeout: float = RPC_TIMEOUT) -> dict[str, Any]:
        """The `status` RPC (controllers, namespaces with stats, ports, transports)."""
        return dict(self.rpc("status", timeout=timeout))

    def rdma_resources(self) -> dict[str, int]:
        return dict(self.status()["transports"].get("rdma", {}))

    def controllers(self) -> list[dict[str, Any]]:
        return list(self.status()["controllers"])

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no target log)"

    def log_tail(self, chars: int = LOG_TAIL) -> str:
        return self.log_text()[-chars:]

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait (SIGKILL after `timeout`); returns the exit code, logs the tail."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                sys.stderr.write(f"target pid {self.proc.pid} ignored SIGTERM for "
                                 f"{timeout:.0f} s: SIGKILL\n")
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.returncode = self.proc.returncode
        sys.stderr.write(f"--- target log (exit {self.returncode}) {self.log_path} ---\n"
                         f"{self.log_tail()}\n--- end of target log ---\n")
        return self.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        disconnect_all(self.subnqns)
        self.stop()


def wait_until(probe: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.5) -> Any:
    """guest.wait_for with a longer default interval (each probe may be an RPC)."""
    return guest.wait_for(probe, timeout, what, interval=interval)


def elapsed(t0: float) -> float:
    return time.monotonic() - t0
