"""`make demo`: the main job, end to end, on this machine.

Boots the soft-RoCE VM, starts nvmet-p2p in it, configures it through `targetcli-ext`
one-shot commands (printed as they run), connects the Linux kernel host over RDMA
(through libnvme's Python bindings, what `nvme discover` / `nvme connect` do; `nvme list`
then shows the same controller as nvme-cli sees it),
runs fio for 20 seconds with visible progress, and prints IOPS, bandwidth, latency,
the connection summary and the P2P decision; then tears everything down.

    python -m nvmet_p2p.testbed.demo            # on the host: boots the VM and runs `guest` in it
    python -m nvmet_p2p.testbed.demo guest      # inside the VM
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

SUBNQN = "nqn.2026-11.io.nvmet-p2p:demo"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:5c0e6d2a-6f2b-4f5e-9a51-000000000d0e"
RPC_SOCKET = "/tmp/nvmet-p2p-demo.sock"
NS_SIZE = 256 << 20
FIO_SECONDS = 20
VM_TIMEOUT_S = 420.0


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say(f"\n==> {text}")


def run(*cmd: str, check: bool = True, quiet: bool = False,
        timeout: float = 120.0) -> subprocess.CompletedProcess:
    if not quiet:
        say(f"$ {shlex.join(cmd)}")
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    out = (cp.stdout + cp.stderr).rstrip()
    if out and not quiet:
        say(out)
    if check and cp.returncode != 0:
        raise SystemExit(f"demo: `{shlex.join(cmd)}` failed with exit {cp.returncode}")
    return cp


def _bin(name: str) -> str:
    """A console script of this checkout's venv (the guest sees the host's filesystem)."""
    return str(Path(sys.executable).with_name(name))


def _targetcli(*args: str) -> None:
    run(_bin("targetcli-ext"), "--rpc-socket", RPC_SOCKET, *args)


def _wait_socket(path: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise SystemExit(f"demo: the target exited early (exit {proc.returncode})")
        if time.monotonic() > deadline:
            raise SystemExit("demo: the target did not open its control socket in time")
        time.sleep(0.2)


def _rpc(method: str, **params: object) -> object:
    from nvmet_p2p.control.rpc import RpcClient

    return RpcClient(RPC_SOCKET).call(method, **params)


def _fio(dev: str) -> dict:
    step(f"fio: 4k random 70/30 read/write, iodepth 16, {FIO_SECONDS} s on {dev}")
    out = "/tmp/demo-fio.json"
    args = ["fio", "--name=demo", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
            "--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=16", "--numjobs=1",
            f"--runtime={FIO_SECONDS}", "--time_based", "--eta=always", "--eta-newline=2",
            "--output-format=json", f"--output={out}"]
    say(f"$ {shlex.join(args)}")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # fio's ETA lines: the progress
        line = line.strip().replace("\r", "")
        if line:
            say(f"  {line}")
    if proc.wait() != 0:
        raise SystemExit(f"demo: fio failed (exit {proc.returncode})")
    with open(out) as f:
        return json.load(f)


def guest() -> int:
    from nvmet_p2p.testbed import guest as g
    from nvmet_p2p.testbed import libnvme_host

    step("soft-RoCE: rxe0 on dummy0 (192.0.2.1)")
    rxe = g.setup_rxe()
    say(f"RDMA device {rxe} is up")
    backing = g.shm_file("demo-ns1.img", NS_SIZE)
    step("start nvmet-p2p")
    cmd = [_bin("nvmet-p2p"), "serve", "--rpc-socket", RPC_SOCKET]
    say(f"$ {shlex.join(cmd)} &")
    with open("/tmp/nvmet-p2p-demo.log", "w") as log:  # the target keeps its own descriptor
        target = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_socket(RPC_SOCKET, target)
        step("configure it with targetcli-ext one-shot commands")
        _targetcli("/subsystems", "create", SUBNQN, "allow_any_host=1")
        _targetcli(f"/subsystems/{SUBNQN}/namespaces", "create", "1", f"path={backing}")
        _targetcli(f"/subsystems/{SUBNQN}/namespaces/1", "enable")
        _targetcli("/ports", "create", "1", "trtype=rdma", "adrfam=ipv4", f"traddr={g.TRADDR}",
                   "trsvcid=4420")
        _targetcli("/ports/1", "set", "attr", "allow_p2pmem=1")
        _targetcli("/ports/1/subsystems", "create", SUBNQN)
        _targetcli("ls")

        step("the Linux host discovers and connects (libnvme's Python bindings, nvme-rdma)")
        g.modprobe("nvme-rdma")
        say(f">>> libnvme_host.discover({g.TRADDR!r}, 4420, hostnqn={HOSTNQN!r})")
        for e in libnvme_host.discover(g.TRADDR, 4420, hostnqn=HOSTNQN):
            say(f"    {e.get('subtype', '?'):>13} {e.get('subnqn')} "
                f"{e.get('trtype')} {e.get('traddr')}:{e.get('trsvcid')}")
        say(f">>> libnvme_host.connect({SUBNQN!r}, {g.TRADDR!r}, 4420, hostnqn={HOSTNQN!r}, "
            "nr_io_queues=2)")
        ctrl = libnvme_host.connect(SUBNQN, g.TRADDR, 4420, hostnqn=HOSTNQN, nr_io_queues=2)
        dev = g.namespace_block_device(SUBNQN)
        say(f"connected: {ctrl}, namespace {dev} "
            f"(libnvme sees {libnvme_host.namespaces(SUBNQN)})")
        run("nvme", "list")
        result = _fio(dev)

        step("results")
        job = result["jobs"][0]
        for ddir in ("read", "write"):
            d = job[ddir]
            lat = d.get("clat_ns", {})
            say(f"{ddir:5}: {d['iops']:9.0f} IOPS  {d['bw_bytes'] / 1e6:7.2f} MB/s  "
                f"mean latency {lat.get('mean', 0) / 1000:8.0f} us  "
                f"p99 {lat.get('percentile', {}).get('99.000000', 0) / 1000:8.0f} us")
        say(f"errors: {job.get('error', 0)}")

        step("what the target saw (status RPC)")
        status = _rpc("status")
        for c in status["controllers"]:
            say(f"controller {c['cntlid']}: {c['hostnqn']} -> {c['subsys']} on port "
                f"{c['portid']}, queues {c['queues']}")
        for nqn, sub in status["subsystems"].items():
            for ns in sub["namespaces"]:
                st = ns["stats"]
                say(f"{nqn} ns {ns['nsid']} ({ns['kind']} {ns.get('path')}): "
                    f"{st['read_cmds']} reads, {st['write_cmds']} writes, P2P requests "
                    f"{st['p2p_reqs']}, system-memory requests {st['sysmem_reqs']} "
                    f"{st.get('sysmem_by_reason', {})}")
        say(f"transport resources: {status['transports']}")
        step("the P2P decision")
        for d in status["p2p"]["decisions"]:
            say(d["text"])

        step("tear down")
        libnvme_host.disconnect(SUBNQN)
        say("host disconnected")
    finally:
        target.terminate()
        try:
            rc = target.wait(30)
        except subprocess.TimeoutExpired:
            target.kill()
            rc = target.wait()
        say(f"target stopped (exit {rc}); its log: /tmp/nvmet-p2p-demo.log")
    return 0 if rc == 0 else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["guest"]:
        return guest()
    from nvmet_p2p.testbed.vm import VM

    say("nvmet-p2p demo: booting the soft-RoCE VM (TCG; this takes a minute)")
    start = time.monotonic()
    vm = VM(nvme_cmb=False, iommu=False)
    result = vm.run(f"{shlex.quote(sys.executable)} -m nvmet_p2p.testbed.demo guest\n", VM_TIMEOUT_S,
                    stream=sys.stdout)
    say(f"\n[demo] done in {time.monotonic() - start:.0f} s (exit {result.returncode})")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
