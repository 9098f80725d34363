"""The target process: event loop, transports, configuration, signals, control socket.

`nvmet-p2p serve --config FILE` restores the configuration (nvmetcli JSON plus our
attributes) into a live `Target`, all or nothing, runs until SIGTERM/SIGINT, and then
tears every controller down so hosts see a disconnect rather than a hang.  SIGHUP
reloads the file the same way load_config does (nothing changes unless all of it
loads).  SIGUSR1 logs the status (controllers, queues, namespaces, resource counts).
Under systemd (Type=notify, tools/nvmet-p2p.service) it reports READY=1 once the
configuration is live and the control socket answers, RELOADING=1 around a reload and
STOPPING=1 at shutdown (sd_notify's datagram protocol, no library needed).

Ports that could not start listening are retried every PORT_RETRY_S and as soon as
an RDMA device appears in /sys/class/infiniband (at boot the NIC often comes up after
the target).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from typing import Any

from nvmet_p2p import logfmt
from nvmet_p2p.backends import open_backend
from nvmet_p2p.config import jsonfile
from nvmet_p2p.core.target import Target
from nvmet_p2p.core.transport import TransportOps
from nvmet_p2p.errors import NvmetError
from nvmet_p2p.p2p.policy import P2PPolicy
from nvmet_p2p.tcp import TcpTransport
from nvmet_p2p.transports.loop import LoopTransport

log = logging.getLogger("nvmet_p2p.daemon")

TICK_S = 1.0  # keep-alive granularity (KAS is 1 s)
PORT_RETRY_S = 5.0  # how often a port that cannot listen is tried again
RDMA_DEVICES_DIR = "/sys/class/infiniband"


def rdma_devices() -> frozenset[str]:
    try:
        return frozenset(os.listdir(RDMA_DEVICES_DIR))
    except OSError:
        return frozenset()


def _rdma_transport(target: Target) -> TransportOps | None:
    """The RDMA transport, if this machine has pyverbs; None (and why) otherwise."""
    try:
        from nvmet_p2p.rdma import RdmaTransport
    except ImportError as e:
        logfmt.info(log, "rdma_unavailable", reason=e)
        return None
    return RdmaTransport(target)


def sd_notify(state: str) -> None:
    """Tell systemd (when it started us with NOTIFY_SOCKET) how the service is doing."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), path)
    except OSError as e:
        logfmt.warning(log, "sd_notify_failed", state=state.split("=", 1)[0], reason=e)


def status_lines(status: dict) -> list[tuple[str, dict[str, Any]]]:
    """The status (Target.status()) as (event, fields) lines: one summary, then one per
    port, namespace, controller, P2P decision, provider and transport."""
    subsystems = status.get("subsystems", {})
    out: list[tuple[str, dict[str, Any]]] = [("status", {
        "ports": len(status.get("ports", {})), "subsystems": len(subsystems),
        "controllers": len(status.get("controllers", [])),
        "disc_genctr": status.get("disc_genctr")})]
    out += [("status_port", {"portid": portid, **port})
            for portid, port in status.get("ports", {}).items()]
    for nqn, subsys in subsystems.items():
        out += [("status_ns", {"subnqn": nqn, **ns}) for ns in subsys.get("namespaces", [])]
    out += [("status_ctrl", dict(ctrl)) for ctrl in status.get("controllers", [])]
    p2p = status.get("p2p") or {}
    out += [("status_p2p_decision", dict(d)) for d in p2p.get("decisions", [])]
    out += [("status_p2p_provider", dict(p)) for p in p2p.get("providers", [])]
    out += [("status_transport", {"transport": name, **t})
            for name, t in status.get("transports", {}).items()]
    return out


class Daemon:
    def __init__(self, config_path: str | None, rpc_socket: str | None = None, *,
                 optional_config: bool = False, **target_opts: Any) -> None:
        """`target_opts`: Target's controller bounds (max_ctrls_per_host, enable_timeout)."""
        self.config_path = config_path
        self.optional_config = optional_config  # the default file: missing means empty
        self.rpc_socket = rpc_socket
        self.loop = asyncio.new_event_loop()
        self.p2p = P2PPolicy()
        self.target = Target(loop=self.loop, open_backend=open_backend, p2p=self.p2p,
                             **target_opts)
        self.transports: list[TransportOps] = [LoopTransport(self.target),
                                               TcpTransport(self.target)]
        rdma = _rdma_transport(self.target)
        if rdma is not None:
            self.transports.append(rdma)
        self.rpc: Any = None
        self._stopping = asyncio.Event()
        self._rdma_devices = rdma_devices()
        self._next_retry = 0.0

    def load(self) -> None:
        """Restore the configuration file; on any error nothing stays live."""
        if not self.config_path:
            return
        if self.optional_config and not os.path.exists(self.config_path):
            return
        doc = jsonfile.read_doc(self.config_path)
        with self.target.root.transaction():
            self.target.root.restore(doc, source=self.config_path)

    def reload(self) -> None:
        """SIGHUP: replace the configuration with the file's, all or nothing."""
        from nvmet_p2p.control.rpc import RpcError, replace_config

        if not self.config_path:
            logfmt.warning(log, "reload_skipped", signal="SIGHUP",
                           reason="no --config file to reload")
            return
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            doc = jsonfile.read_doc(self.config_path)
            replace_config(self.target.root, doc, self.config_path, replace=True)
        except (NvmetError, RpcError) as e:
            logfmt.error(log, "reload_failed", signal="SIGHUP", file=self.config_path,
                         reason=f"{self.config_path} was not reloaded; the configuration is "
                                f"unchanged: {e}")
        except Exception:
            log.exception("%s", logfmt.line("event", "reload_failed", {
                "signal": "SIGHUP", "file": self.config_path,
                "reason": "internal error; the configuration is unchanged"}))
        sd_notify("READY=1")

    def status(self) -> dict:
        return self.target.status()

    def _tick(self) -> None:
        self.target.tick()
        devices = rdma_devices()
        now = self.loop.time()
        if self.target.listen_errors and (devices - self._rdma_devices or
                                          now >= self._next_retry):
            self.target.retry_ports()
            self._next_retry = now + PORT_RETRY_S
        self._rdma_devices = devices
        self.loop.call_later(TICK_S, self._tick)

    def _dump_status(self) -> None:
        """SIGUSR1: the status as key=value lines, one per object (status_lines)."""
        for what, fields in status_lines(self.status()):
            logfmt.info(log, what, **fields)

    def stop(self) -> None:
        sd_notify("STOPPING=1")
        self._stopping.set()

    async def _main(self) -> None:
        self.load()
        if self.rpc_socket:
            from nvmet_p2p.control.rpc import RpcServer

            self.rpc = RpcServer(self, self.rpc_socket)
            await self.rpc.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stop)
        self.loop.add_signal_handler(signal.SIGUSR1, self._dump_status)
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.loop.call_later(TICK_S, self._tick)
        logfmt.info(log, "serving", ports_listening=len(self.target.listening),
                    config=self.config_path, socket=self.rpc_socket)
        for portid, why in self.target.listen_errors.items():
            logfmt.warning(log, "port_not_listening", portid=portid, reason=why)
        sd_notify("READY=1")
        await self._stopping.wait()
        logfmt.info(log, "shutting_down")

    def run(self) -> int:
        try:
            self.loop.run_until_complete(self._main())
        except NvmetError as e:
            logfmt.error(log, "start_failed", reason=e)
            return 1
        except Exception as e:  # a bug: one line here, the traceback only at debug level
            logfmt.error(log, "internal_error", type=type(e).__name__, reason=e,
                         hint="run with --log-level debug for the traceback")
            log.debug("traceback", exc_info=True)
            return 1
        finally:
            self.close()
        return 0

    def close(self) -> None:
        if self.rpc is not None:
            self.loop.run_until_complete(self.rpc.close())
            self.rpc = None
        self.target.shutdown()
        for t in self.transports:
            t.close()
        self.p2p.close()
        # let completions posted by backend threads during teardown run
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
