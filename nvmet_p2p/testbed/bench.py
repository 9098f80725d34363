"""`nvmet-p2p bench`: our target against the kernel's nvmet-rdma and nvmet-tcp, same VM
boot, same fio jobs.

Owns the benchmark matrix (the fio job files in nvmet_p2p/testbed/jobs/, run over each
transport), the measuring loop that runs inside the soft-RoCE VM (or on a real Linux host
with --no-vm), the results schema (bench/README.md), and the report: per transport a
Markdown table with the ratio ours/kernel per job, and a PNG plot.

Measuring, in one VM boot: rxe0 on a dummy netdev (its address also carries NVMe/TCP);
one sparse file on the guest's /dev/shm that both targets serve (buffered: tmpfs
refuses O_DIRECT) and, for the block-device series (`--backing bdev`, over RDMA), a
loop device on another such file that both serve with O_DIRECT, where the blktests-style
512 MiB crc32c verify (`verify-512m`, sized, not timed) runs once per target; our target (`nvmet-p2p serve`, rdma port 4420, tcp port 4430) and
the kernel target (configfs, rdma 4421, tcp 4431) all up the whole time, but the Linux
host is connected to only one of them while fio runs (our reactor stops polling once
no queue is left, so an idle target costs nothing).  Targets alternate and each job is
repeated, since the machine is noisy; the report gives the median and the spread.  The
fabric limit is ib_write_bw / ib_read_lat over rxe0.  At the end the host connects 16
RDMA I/O queues to our target and its VmRSS is read.

Progress (testbed/progress.py): one `[ i/n] ...` line per run, always; on a terminal a
tqdm bar under them, driven on the host from the lines the VM relays.

The pure parts (fio/perftest parsing, CPU from /proc/<pid>/stat, summary, ratios,
table, plot) take values and return values; tests/testbed/test_bench.py drives them with
canned documents.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

from nvmet_p2p.errors import NvmetError
from nvmet_p2p.testbed.progress import Progress, progress_line

REPO_ROOT = Path(__file__).resolve().parents[2]
JOBS_DIR = Path(__file__).resolve().parent / "jobs"  # package data: installed with the code
# bench/results in a source checkout; installed, the current directory's nvmet-p2p-bench/
DEFAULT_RESULTS_DIR = (REPO_ROOT / "bench" / "results" if (REPO_ROOT / "bench").is_dir()
                       else Path.cwd() / "nvmet-p2p-bench")
SCHEMA = 1

OURS, KERNEL = "ours", "kernel"
TARGETS = (OURS, KERNEL)
RDMA, TCP = "rdma", "tcp"
TRANSPORTS = (RDMA, TCP)
FILE, BDEV = "file", "bdev"  # what the namespace sits on: a tmpfs file, a block device
BACKINGS = (FILE, BDEV)
BACKING_TEXT = {FILE: "a sparse file on the guest's /dev/shm, buffered I/O in both targets",
                BDEV: "a loop device on a /dev/shm file, O_DIRECT in both targets"}
SUBNQN = "nqn.2026-11.io.nvmet-p2p:bench"
OURS_TRSVCID, KERNEL_TRSVCID = 4420, 4421  # both listen on the same address at once
OURS_TCP_TRSVCID, KERNEL_TCP_TRSVCID = 4430, 4431
KERNEL_TCP_SUBNQN = SUBNQN + "-tcp"  # the kernel's tcp port serves the file as its own subsystem
BDEV_SUBNQN = SUBNQN + "-bdev"  # the block-device series: its own subsystem and ports
OURS_BDEV_TRSVCID, KERNEL_BDEV_TRSVCID = 4422, 4423
KERNEL_NAMES = {RDMA: "nvmet-rdma", TCP: "nvmet-tcp"}
NS_SIZE = 256 << 20
BDEV_NS_SIZE = 512 << 20  # the size blktests' nvme verify writes
SIZED_JOB_TIMEOUT_S = 1800  # a sized job against a slow target: 128 Ki writes, then reads
RSS_IO_QUEUES = 16
# nvme-rdma gives a controller at most one I/O queue per online CPU, so the 16 queues of
# the RSS figure are spread over several controllers (distinct host NQNs).
# What one failed step can raise (nvme-cli/fio/RPC failures, a missing file, bad output);
# it becomes an "error" field of the record and the rest of the matrix goes on.
RUN_ERRORS = (NvmetError, OSError, RuntimeError, ValueError, KeyError,
              subprocess.SubprocessError)
# one host NQN per RSS controller; its host ID is the NQN's UUID (libnvme_host.hostid_of)
HOSTNQN_FMT = "nqn.2014-08.org.nvmexpress:uuid:5be0c000-0000-4000-8000-{:012d}"


@dataclass(frozen=True)
class Job:
    """One fio job file of nvmet_p2p/testbed/jobs/ and how to read its result."""

    name: str
    ddirs: tuple[str, ...]  # fio result sections that carry this job's I/O
    # Runs to a size (its wall time is the figure), once per target, block devices only.
    sized: bool = False

    @property
    def path(self) -> Path:
        return JOBS_DIR / f"{self.name}.fio"


JOBS = (
    Job("randread-4k-qd1", ("read",)),
    Job("randread-4k-qd32", ("read",)),
    Job("randwrite-4k-qd32", ("write",)),
    Job("seqread-128k-qd16", ("read",)),
    Job("seqwrite-128k-qd16", ("write",)),
    Job("randrw-8k-qd16", ("read", "write")),
)
# blktests' _run_fio_verify_io on a 512 MiB block-device namespace
VERIFY_JOB = Job("verify-512m", ("write",), sized=True)
JOB_NAMES = tuple(j.name for j in (*JOBS, VERIFY_JOB))


@dataclass(frozen=True)
class Timing:
    runtime_s: int
    ramp_s: int
    repeat: int


FULL = Timing(runtime_s=10, ramp_s=2, repeat=3)
QUICK = Timing(runtime_s=5, ramp_s=1, repeat=1)


# -- parsing (pure) ---------------------------------------------------------------------------

def parse_fio(result: dict[str, Any], ddirs: Sequence[str]) -> dict[str, float]:
    """IOPS, bandwidth and completion latency of one fio run over the given directions.

    IOPS and bandwidth are sums; the mean latency is weighted by each direction's I/O
    count; p50/p99 are the worse of the directions (fio keeps no merged histogram).
    """
    iops = bw = 0.0
    weighted, count, p50, p99 = 0.0, 0, 0.0, 0.0
    for job in result["jobs"]:
        for ddir in ddirs:
            d = job[ddir]
            iops += float(d["iops"])
            bw += float(d["bw_bytes"])
            clat = d.get("clat_ns", {})
            n = int(clat.get("N", 0))
            weighted += float(clat.get("mean", 0.0)) * n
            count += n
            pct = clat.get("percentile", {})
            p50 = max(p50, float(pct.get("50.000000", 0.0)))
            p99 = max(p99, float(pct.get("99.000000", 0.0)))
    return {"iops": iops, "bw_bytes": bw,
            "lat_mean_us": (weighted / count / 1000) if count else 0.0,
            "lat_p50_us": p50 / 1000, "lat_p99_us": p99 / 1000}


def parse_ib_write_bw(text: str) -> float:
    """Average MB/s (perftest's MB = 2^20 bytes, converted to 10^6) of the result line."""
    for line in text.splitlines():
        fields = line.split()
        # "#bytes #iterations BW peak[MB/sec] BW average[MB/sec] MsgRate[Mpps]"
        if len(fields) == 5 and fields[0].isdigit() and fields[1].isdigit():
            return float(fields[3]) * (1 << 20) / 1e6
    raise ValueError("no result line in ib_write_bw output")


def parse_ib_read_lat(text: str) -> dict[str, float]:
    """t_typical, t_avg and the 99th percentile in µs of the result line."""
    for line in text.splitlines():
        fields = line.split()
        # "#bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9%"
        if len(fields) >= 9 and fields[0].isdigit() and fields[1].isdigit():
            return {"typical_us": float(fields[4]), "avg_us": float(fields[5]),
                    "p99_us": float(fields[7])}
    raise ValueError("no result line in ib_read_lat output")


def proc_cpu_ticks(stat_text: str) -> int:
    """utime + stime (clock ticks, all threads) from the text of /proc/<pid>/stat."""
    # comm may contain spaces and parentheses: the fields start after the last ")".
    fields = stat_text[stat_text.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def cpu_percent(ticks_before: int, ticks_after: int, wall_s: float,
                clk_tck: int = 100) -> float:
    """CPU time as a percentage of one CPU over `wall_s` (200% = both vCPUs busy)."""
    if wall_s <= 0:
        return 0.0
    return 100.0 * (ticks_after - ticks_before) / clk_tck / wall_s


def system_busy_ticks(stat_text: str) -> tuple[int, int]:
    """(busy, total) jiffies of the "cpu" line of /proc/stat (idle + iowait are idle)."""
    for line in stat_text.splitlines():
        if line.startswith("cpu "):
            vals = [int(v) for v in line.split()[1:]]
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
            return sum(vals) - idle, sum(vals)
    raise ValueError("no cpu line in /proc/stat")


def vmrss_kib(status_text: str) -> int:
    """VmRSS in KiB from the text of /proc/<pid>/status."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError("no VmRSS line")


def p2p_counters(status: dict[str, Any], subnqn: str = SUBNQN) -> dict[str, int]:
    """p2p_reqs, p2p_bytes, sysmem_reqs summed over the subsystem's namespaces."""
    keys = ("p2p_reqs", "p2p_bytes", "sysmem_reqs")
    out = dict.fromkeys(keys, 0)
    for ns in status["subsystems"].get(subnqn, {}).get("namespaces", []):
        for k in keys:
            out[k] += int(ns.get("stats", {}).get(k, 0))
    return out


# -- summary, table, plot (pure) ----------------------------------------------------------------

METRICS = ("iops", "bw_bytes", "lat_mean_us", "lat_p50_us", "lat_p99_us", "target_cpu_pct",
           "wall_s")


def run_transport(run: dict[str, Any]) -> str:
    """The transport of a run record (records from before TCP jobs existed are RDMA)."""
    return str(run.get("transport", RDMA))


def run_backing(run: dict[str, Any]) -> str:
    """What a run's namespace sat on (records from before the bdev series: a file)."""
    return str(run.get("backing", FILE))


def summarize(runs: Iterable[dict[str, Any]], transport: str = RDMA,
              backing: str = FILE) -> dict[str, dict[str, dict[str, Any]]]:
    """summary[job][target][metric] = {"median", "min", "max", "n"} over the successful
    repeats over `transport` with namespaces on `backing`.

    A metric that is null in every repeat (the kernel target's CPU) stays null.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        if r.get("error") or run_transport(r) != transport or run_backing(r) != backing:
            continue
        groups.setdefault((r["job"], r["target"]), []).append(r)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (job, target), rs in groups.items():
        entry: dict[str, Any] = {}
        for m in METRICS:
            vals = [float(r[m]) for r in rs if r.get(m) is not None]
            entry[m] = ({"median": statistics.median(vals), "min": min(vals),
                         "max": max(vals), "n": len(vals)} if vals else None)
        out.setdefault(job, {})[target] = entry
    return out


def ratio(summary: dict[str, Any], job: str, metric: str) -> float | None:
    """median(ours) / median(kernel) for one job and metric; None if either is missing."""
    try:
        ours = summary[job][OURS][metric]["median"]
        kern = summary[job][KERNEL][metric]["median"]
    except (KeyError, TypeError):
        return None
    return ours / kern if kern else None


def _fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _med(summary: dict[str, Any], job: str, target: str, metric: str) -> float | None:
    cell = summary.get(job, {}).get(target, {}).get(metric)
    return None if cell is None else cell["median"]


def _spread(summary: dict[str, Any], job: str, target: str, metric: str) -> str:
    cell = summary.get(job, {}).get(target, {}).get(metric)
    if cell is None or cell["n"] < 2 or not cell["median"]:
        return ""
    pct = 100.0 * (cell["max"] - cell["min"]) / cell["median"]
    return f" ±{pct / 2:.0f}%"


def series_of(results: dict[str, Any]) -> list[tuple[str, str]]:
    """The (transport, backing) series of `results`, RDMA first, files before bdevs."""
    seen = {(run_transport(r), run_backing(r)) for r in results["runs"]}
    return [(t, b) for t in TRANSPORTS for b in BACKINGS if (t, b) in seen]


def _bdev_lines(results: dict[str, Any], transport: str) -> list[str]:
    """The block-device series against the file one (same transport, same boot), and the
    verify run's wall time, ours against the kernel's."""
    files = summarize(results["runs"], transport, FILE)
    bdevs = summarize(results["runs"], transport, BDEV)
    lines = []
    for target in TARGETS:
        pairs = [f"{job} {_fmt(b / f, 2)}" for job in JOB_NAMES
                 if (f := _med(files, job, target, "iops")) and
                 (b := _med(bdevs, job, target, "iops")) is not None]
        if pairs:
            lines.append(f"IOPS bdev/file, {target}: " + ", ".join(pairs) + ".")
    ours = _med(bdevs, VERIFY_JOB.name, OURS, "wall_s")
    kern = _med(bdevs, VERIFY_JOB.name, KERNEL, "wall_s")
    if ours is not None or kern is not None:
        r = ours / kern if ours is not None and kern else None
        lines.append(f"{VERIFY_JOB.name} (blktests-style: 512 MiB of 4 KiB random writes at "
                     f"QD16, then crc32c verify): ours {_fmt(ours, 0)} s, kernel "
                     f"{_fmt(kern, 0)} s, time ours/kernel {_fmt(r, 2)}.")
    return lines


def _job_table(summary: dict[str, Any]) -> list[str]:
    head = ("| job | kernel IOPS | ours IOPS | IOPS ours/kernel | kernel MB/s | ours MB/s "
            "| kernel mean lat µs | ours mean lat µs | lat ours/kernel | ours p99 µs "
            "| ours CPU % |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for job in JOB_NAMES:
        if job not in summary:
            continue

        def cell(target: str, metric: str, scale: float = 1.0, digits: int = 0,
                 job: str = job) -> str:
            v = _med(summary, job, target, metric)
            return _fmt(None if v is None else v / scale, digits) + _spread(
                summary, job, target, metric)

        r_iops, r_lat = ratio(summary, job, "iops"), ratio(summary, job, "lat_mean_us")
        lines.append(
            f"| {job} | {cell(KERNEL, 'iops')} | {cell(OURS, 'iops')} | {_fmt(r_iops, 2)} "
            f"| {cell(KERNEL, 'bw_bytes', 1e6, 1)} | {cell(OURS, 'bw_bytes', 1e6, 1)} "
            f"| {cell(KERNEL, 'lat_mean_us')} | {cell(OURS, 'lat_mean_us')} | {_fmt(r_lat, 2)} "
            f"| {cell(OURS, 'lat_p99_us')} | {cell(OURS, 'target_cpu_pct', 1.0, 0)} |")
    return lines


def markdown_table(results: dict[str, Any]) -> str:
    """The report: per series (transport, backing) and job, both targets' medians (spread
    = half the min-max range) and the ratio ours/kernel; then the fabric limit and our RSS.
    The RDMA file table comes first and bare (as before other series existed); the others
    follow under their titles, a block-device table with its IOPS against the file one's
    and the verify run's time."""
    lines: list[str] = []
    for transport, backing in series_of(results) or [(RDMA, FILE)]:
        if (transport, backing) != (RDMA, FILE):
            if lines:
                lines.append("")
            title = (f"NVMe/TCP: ours (tcp.py) vs the kernel's {KERNEL_NAMES[TCP]}"
                     if transport == TCP else f"RDMA: ours vs the kernel's {KERNEL_NAMES[RDMA]}")
            if backing == BDEV:
                title += f", block-device namespace ({BACKING_TEXT[BDEV]})"
            lines += [title + ":", ""]
        lines += _job_table(summarize(results["runs"], transport, backing))
        if backing == BDEV:
            lines += ["", *_bdev_lines(results, transport)]
    meta = results.get("meta", {})
    lines.append("")
    lines.append(f"Medians of {meta.get('repeat', '?')} repeat(s) of "
                 f"{meta.get('runtime_s', '?')} s each; ± is half the min-max spread. "
                 "Kernel CPU: n/a (its work runs in kworkers and softirq, not in one process).")
    fabric = results.get("fabric") or {}
    if fabric.get("write_bw_MBps") is not None or fabric.get("read_lat") is not None:
        lat = fabric.get("read_lat") or {}
        lines.append(f"Fabric limit (rxe0): ib_write_bw 128 KiB {_fmt(fabric.get('write_bw_MBps'), 1)}"
                     f" MB/s; ib_read_lat 4 KiB typical {_fmt(lat.get('typical_us'), 1)} µs, "
                     f"p99 {_fmt(lat.get('p99_us'), 1)} µs.")
    elif fabric.get("error"):
        lines.append(f"Fabric limit: not measured ({fabric['error']}).")
    rss = results.get("rss") or {}
    if rss.get("vmrss_kib") is not None:
        lines.append(f"Our target's VmRSS with {rss.get('io_queues')} I/O queues connected "
                     f"({rss.get('controllers')} controllers): "
                     f"{rss['vmrss_kib'] / 1024:.1f} MiB (idle: "
                     f"{_fmt((rss.get('idle_vmrss_kib') or 0) / 1024, 1)} MiB).")
    elif rss.get("error"):
        lines.append(f"RSS: not measured ({rss['error']}).")
    failed = [r for r in results["runs"] if r.get("error")]
    if failed:
        lines.append(f"{len(failed)} run(s) failed: " + "; ".join(
            f"{r['target']} {r['job']} #{r['repeat']}: {r['error']}" for r in failed[:5]))
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    """IOPS and mean latency per job, both targets, median bars with min-max whiskers; a
    row per series (transport, backing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = series_of(results) or [(RDMA, FILE)]
    transports = list(dict.fromkeys(t for t, _ in series))
    fig, grid = plt.subplots(len(series), 2, figsize=(13, 4.8 * len(series)), squeeze=False)
    width = 0.38
    for row, (transport, backing) in zip(grid, series, strict=True):
        summary = summarize(results["runs"], transport, backing)
        jobs = [j for j in JOB_NAMES if j in summary]
        for ax, metric, label in ((row[0], "iops", "IOPS (median)"),
                                  (row[1], "lat_mean_us", "mean completion latency, µs")):
            for i, target in enumerate((KERNEL, OURS)):
                meds, lo, hi = [], [], []
                for job in jobs:
                    cell = summary[job].get(target, {}).get(metric)
                    m = cell["median"] if cell else 0.0
                    meds.append(m)
                    lo.append(m - cell["min"] if cell else 0.0)
                    hi.append(cell["max"] - m if cell else 0.0)
                xs = [x + (i - 0.5) * width for x in range(len(jobs))]
                ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3,
                       label=f"kernel {KERNEL_NAMES[transport]}" if target == KERNEL
                       else "nvmet-p2p")
            ax.set_xticks(range(len(jobs)))
            ax.set_xticklabels(jobs, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(f"{label} ({transport}{', bdev' if backing == BDEV else ''})")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
    meta = results.get("meta", {})
    fig.suptitle(f"nvmet-p2p vs the kernel target over {' and '.join(transports)} "
                 f"({meta.get('mode', '?')}, {meta.get('repeat', '?')} x "
                 f"{meta.get('runtime_s', '?')} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """results.md and results.png next to results.json; returns their paths."""
    md = out / "results.md"
    md.write_text(markdown_table(results))
    return md, plot(results, out / "results.png")


# -- measuring (inside the VM, or on a real Linux host) -----------------------------------------

@dataclass
class Endpoint:
    """Where the Linux host connects for one target, and what we can observe of it."""

    target: str
    traddr: str
    trsvcid: int
    subnqn: str
    pid: int | None = None  # our target's process: CPU and RSS
    rpc_socket: str | None = None  # our target's status RPC: P2P counters
    transport: str = RDMA
    backing: str = FILE


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _status(ep: Endpoint) -> dict[str, Any] | None:
    if ep.rpc_socket is None:
        return None
    from nvmet_p2p.control.rpc import RpcClient

    with RpcClient(ep.rpc_socket) as c:
        return c.call("status")


def run_job(job: Job, ep: Endpoint, timing: Timing, repeat: int,
            nr_io_queues: int | None = None) -> dict[str, Any]:
    """Connect the Linux host to `ep` (libnvme), run one fio job, disconnect; one run
    record."""
    from nvmet_p2p.testbed import guest, libnvme_host

    rec: dict[str, Any] = {"job": job.name, "target": ep.target, "transport": ep.transport,
                           "backing": ep.backing, "repeat": repeat,
                           "runtime_s": None if job.sized else timing.runtime_s,
                           "error": None, "target_cpu_pct": None, "p2p": None}
    try:
        guest.modprobe(guest.host_module(ep.transport))
        libnvme_host.connect(ep.subnqn, ep.traddr, ep.trsvcid, transport=ep.transport,
                             nr_io_queues=nr_io_queues)
        try:
            dev = guest.namespace_block_device(ep.subnqn)
            env = dict(os.environ, BENCH_DEV=dev, BENCH_RUNTIME=str(timing.runtime_s),
                       BENCH_RAMP=str(timing.ramp_s))
            before = _status(ep)
            sys0 = system_busy_ticks(_read("/proc/stat"))
            cpu0 = proc_cpu_ticks(_read(f"/proc/{ep.pid}/stat")) if ep.pid else None
            t0 = time.monotonic()
            cp = subprocess.run(["fio", "--output-format=json", str(job.path)], check=False,
                                env=env,
                                capture_output=True, text=True,
                                timeout=SIZED_JOB_TIMEOUT_S if job.sized else
                                timing.runtime_s + timing.ramp_s + 120)
            wall = time.monotonic() - t0
            rec["wall_s"] = round(wall, 1)
            sys1 = system_busy_ticks(_read("/proc/stat"))
            if ep.pid:
                cpu1 = proc_cpu_ticks(_read(f"/proc/{ep.pid}/stat"))
                rec["target_cpu_pct"] = cpu_percent(cpu0, cpu1, wall,
                                                    os.sysconf("SC_CLK_TCK"))
            rec["guest_cpu_pct"] = 100.0 * os.cpu_count() * (sys1[0] - sys0[0]) / max(
                1, sys1[1] - sys0[1])
            after = _status(ep)
            if before is not None and after is not None:
                b, a = p2p_counters(before, ep.subnqn), p2p_counters(after, ep.subnqn)
                rec["p2p"] = {k: a[k] - b[k] for k in a}
            start = cp.stdout.find("{")
            if cp.returncode != 0 or start < 0:
                raise RuntimeError(f"fio exit {cp.returncode}: {cp.stderr.strip()[-500:]}")
            res = json.loads(cp.stdout[start:])
            errors = [j.get("error", 0) for j in res["jobs"]]
            if any(errors):
                raise RuntimeError(f"fio job errors {errors}: {cp.stderr.strip()[-500:]}")
            rec.update(parse_fio(res, job.ddirs))
        finally:
            libnvme_host.disconnect(ep.subnqn)
    except RUN_ERRORS as err:
        rec["error"] = f"{type(err).__name__}: {err}"[:600]
    return rec


def schedule(jobs: Sequence[Job], targets: Sequence[str], repeat: int) -> list[tuple[int, Job, str]]:
    """(repeat, job, target) in run order: targets alternate, and which one goes first
    alternates from job to job, so drift on a noisy machine hits both alike.  A sized
    job runs in the first repeat only (it is long, and its figure is one wall time)."""
    order = []
    flip = 0
    for r in range(repeat):
        for job in jobs:
            if job.sized and r:
                continue
            ts = list(targets) if flip % 2 == 0 else list(reversed(targets))
            flip += 1
            order += [(r, job, t) for t in ts]
    return order


def run_matrix(endpoints: dict[str, Endpoint], timing: Timing, jobs: Sequence[Job],
               say: Callable[[str], None], nr_io_queues: int | None = None) -> list[dict]:
    plan = schedule(jobs, [t for t in TARGETS if t in endpoints], timing.repeat)
    runs = []
    t_start = time.monotonic()
    for i, (r, job, target) in enumerate(plan, 1):
        rec = run_job(job, endpoints[target], timing, r, nr_io_queues)
        runs.append(rec)
        elapsed = time.monotonic() - t_start
        eta = elapsed / i * (len(plan) - i)
        if rec["error"]:
            text = f"FAILED {rec['error']}"
        else:
            text = (f"{rec['iops']:9,.0f} IOPS {rec['bw_bytes'] / 1e6:7.1f} MB/s "
                    f"mean {rec['lat_mean_us']:9,.0f} µs p99 {rec['lat_p99_us']:9,.0f} µs"
                    + (f" cpu {rec['target_cpu_pct']:4.0f}%"
                       if rec["target_cpu_pct"] is not None else ""))
        if job.sized and not rec["error"]:
            text += f" in {rec['wall_s']:.0f} s"
        ep = endpoints[target]
        say(progress_line(i, len(plan), f"{ep.transport:4} {ep.backing:4} {target:6} "
                                        f"{job.name:19} #{r + 1}: {text}  (eta {eta:.0f} s)"))
    return runs


def fabric_limit(dev: str, addr: str, seconds: int) -> dict[str, Any]:
    """ib_write_bw (128 KiB) and ib_read_lat (4 KiB) over `dev`, loopback through rdma_cm."""
    from nvmet_p2p.testbed import guest

    out: dict[str, Any] = {"write_bw_MBps": None, "read_lat": None, "error": None}

    def pair(tool: str, extra: list[str], port: int) -> str:
        base = [tool, "-d", dev, "-R", "-p", str(port), *extra]
        server = subprocess.Popen(base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        try:
            time.sleep(1.5)  # the server has no readiness signal; the client retries briefly
            client = guest.sh(*base, addr, timeout=seconds + 60)
            return client.stdout
        finally:
            try:
                server.wait(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    try:
        text = pair("ib_write_bw", ["-s", "131072", "-D", str(seconds)], 18515)
        out["write_bw_MBps"] = parse_ib_write_bw(text)
        out["raw"] = text[-1500:]
        text = pair("ib_read_lat", ["-s", "4096", "-n", "1000"], 18516)
        out["read_lat"] = parse_ib_read_lat(text)
        out["raw"] += text[-1500:]
    except RUN_ERRORS as err:
        out["error"] = f"{type(err).__name__}: {err}"[:600]
    return out


def measure_rss(ep: Endpoint, io_queues: int, cpus: int) -> dict[str, Any]:
    """Connect `io_queues` I/O queues to our target (over as many controllers as needed)
    and read its VmRSS; then disconnect."""
    from nvmet_p2p.testbed import guest, libnvme_host

    rss: dict[str, Any] = {"io_queues": io_queues, "controllers": 0, "vmrss_kib": None,
                           "idle_vmrss_kib": None, "error": None}
    if ep.pid is None:
        rss["error"] = "no target process to read (--no-vm)"
        return rss
    per_ctrl = max(1, cpus)
    nctrl = -(-io_queues // per_ctrl)
    try:
        rss["idle_vmrss_kib"] = vmrss_kib(_read(f"/proc/{ep.pid}/status"))
        guest.modprobe("nvme-rdma")
        for i in range(nctrl):
            n = min(per_ctrl, io_queues - i * per_ctrl)
            # libnvme, not nvme-cli: nvme-cli 2.3 calls a second controller to the same
            # address "already connected" whatever the host NQN/ID and -D say
            libnvme_host.connect(ep.subnqn, ep.traddr, ep.trsvcid,
                                 hostnqn=HOSTNQN_FMT.format(i), nr_io_queues=n)
            rss["controllers"] += 1
        guest.wait_for(lambda: len(guest.nvme_ctrls(ep.subnqn)) >= nctrl, 30,
                       f"{nctrl} controllers of {ep.subnqn}")
        status = _status(ep)
        if status is not None:
            rss["queues_seen"] = status["transports"].get("rdma", {})
        rss["vmrss_kib"] = vmrss_kib(_read(f"/proc/{ep.pid}/status"))
    except RUN_ERRORS as err:
        rss["error"] = f"{type(err).__name__}: {err}"[:600]
    finally:
        try:
            libnvme_host.disconnect(ep.subnqn)
        except RUN_ERRORS as err:
            rss["error"] = rss["error"] or f"disconnect: {err}"
    return rss


def _our_config(backing: Path, transports: Sequence[str] = (RDMA,),
                bdev: str | None = None) -> dict[str, Any]:
    """The file namespace on a port per transport; with `bdev`, that block device as the
    namespace of BDEV_SUBNQN on an RDMA port of its own (O_DIRECT: buffered_io 0)."""
    from nvmet_p2p.testbed import guest

    def port(portid: int, trtype: str, trsvcid: int, nqn: str) -> dict[str, Any]:
        return {"portid": portid,
                "addr": {"trtype": trtype, "adrfam": "ipv4", "traddr": guest.TRADDR,
                         "trsvcid": str(trsvcid)},
                "attr": {"allow_p2pmem": "1"}, "subsystems": [nqn]}

    def subsystem(nqn: str, path: str, kind: str, buffered: int) -> dict[str, Any]:
        return {"nqn": nqn, "attr": {"allow_any_host": "1"}, "allowed_hosts": [],
                "namespaces": [{"nsid": 1, "enable": 1, "buffered_io": buffered,
                                "device": {"path": path, "backend": kind}}]}

    ports = {RDMA: (1, OURS_TRSVCID), TCP: (3, OURS_TCP_TRSVCID)}
    cfg: dict[str, Any] = {
        "hosts": [],
        "ports": [port(ports[t][0], t, ports[t][1], SUBNQN) for t in transports],
        "subsystems": [subsystem(SUBNQN, str(backing), "file", 1)]}
    if bdev is not None:
        cfg["ports"].append(port(5, RDMA, OURS_BDEV_TRSVCID, BDEV_SUBNQN))
        cfg["subsystems"].append(subsystem(BDEV_SUBNQN, bdev, "bdev", 0))
    return cfg


def _loop_device(backing: Path) -> str:
    """A loop device on `backing` (a tmpfs file: the loop driver does buffered I/O to it,
    the targets do O_DIRECT to the device)."""
    from nvmet_p2p.testbed import guest

    guest.modprobe("loop")  # Debian builds it as a module; the VM's init loads none
    cp = subprocess.run(["losetup", "--find", "--show", str(backing)], check=False,
                        capture_output=True, text=True, timeout=60)
    if cp.returncode:
        raise RuntimeError(f"losetup {backing}: {cp.stderr.strip()}")
    return cp.stdout.strip()


def _start_ours(config: Path, sock: str, log_path: Path) -> subprocess.Popen:
    from nvmet_p2p.control.rpc import RpcClient

    exe = Path(sys.executable).with_name("nvmet-p2p")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else
           ["-m", "nvmet_p2p.cli"]), "serve", "--config", str(config), "--rpc-socket", sock]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"our target exited (rc {proc.returncode}): "
                               f"{log_path.read_text()[-2000:]}")
        if os.path.exists(sock):
            try:
                st = RpcClient(sock, timeout=30).call("status")
                if all(p["listening"] for p in st["ports"].values()):
                    return proc
            except RUN_ERRORS:
                pass  # still starting: the socket exists before the ports listen
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("our target did not listen within 180 s")
        time.sleep(0.5)


def _start_profiler(pid: int, out: Path) -> subprocess.Popen | None:
    """py-spy sampling our target for the whole matrix (SIGINT makes it write the file).

    Switched on by NVMET_P2P_BENCH_PROFILE=<format> (flamegraph, speedscope or raw),
    which `nvmet-p2p bench --profile FORMAT` sets in the VM.
    """
    fmt = os.environ.get("NVMET_P2P_BENCH_PROFILE")
    exe = Path(sys.executable).with_name("py-spy")
    if not fmt or not exe.exists():
        return None
    suffix = {"flamegraph": "svg", "speedscope": "json", "raw": "txt"}.get(fmt, "txt")
    return subprocess.Popen([str(exe), "record", "--pid", str(pid), "--format", fmt,
                             "--rate", "50", "--nonblocking", "-o", str(out / f"profile.{suffix}")],
                            stdout=subprocess.DEVNULL, stderr=open(out / "py-spy.log", "w"))


def _stop(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def guest_main(out: Path, timing: Timing, jobs: Sequence[Job], targets: Sequence[str],
               measure_fabric: bool = True, rss_queues: int = RSS_IO_QUEUES,
               transports: Sequence[str] = TRANSPORTS,
               backings: Sequence[str] = (FILE,)) -> int:
    """The whole measurement inside the VM; writes out/results.json.

    The timed jobs run over every transport on the file; with BDEV in `backings`, the
    timed jobs and the sized ones of `jobs` run over RDMA on the block device too."""
    from nvmet_p2p.testbed import guest
    from nvmet_p2p.testbed.kernel_target import KernelTarget

    def say(text: str) -> None:
        print(text, flush=True)

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "meta": {"started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                 "mode": "vm", "runtime_s": timing.runtime_s, "ramp_s": timing.ramp_s,
                 "repeat": timing.repeat, "kernel": os.uname().release,
                 "cpus": os.cpu_count(), "ns_size": NS_SIZE,
                 "backing": BACKING_TEXT[FILE],
                 "jobs": [j.name for j in jobs], "transports": list(transports),
                 "backings": list(backings)},
        "fabric": None, "runs": [], "rss": None}
    if BDEV in backings:
        results["meta"].update(bdev_ns_size=BDEV_NS_SIZE, bdev_backing=BACKING_TEXT[BDEV])
    timed = [j for j in jobs if not j.sized]
    rxe = guest.setup_rxe()
    backing = guest.shm_file("bench-ns1.img", NS_SIZE)
    bdev = (_loop_device(guest.shm_file("bench-bdev.img", BDEV_NS_SIZE))
            if BDEV in backings and RDMA in transports else None)
    if measure_fabric:
        say("fabric limit: ib_write_bw 128 KiB, ib_read_lat 4 KiB over rxe0")
        # ib_write_bw -D 2 reported 0 MB/s once under TCG: give it a few seconds at least
        results["fabric"] = fabric_limit(rxe, guest.TRADDR, max(4, timing.runtime_s // 2))
        say(f"  {json.dumps(results['fabric'])}")
    # per transport, the endpoint of each target
    endpoints: dict[str, dict[str, Endpoint]] = {t: {} for t in transports}
    bdev_eps: dict[str, Endpoint] = {}  # the block-device series, over RDMA
    ours = None
    kts: list[KernelTarget] = []
    try:
        if OURS in targets:
            say("starting nvmet-p2p serve")
            cfg = Path("/dev/shm/bench-config.json")
            cfg.write_text(json.dumps(_our_config(backing, transports, bdev)))
            sock = "/tmp/nvmet-p2p-bench.sock"
            ours = _start_ours(cfg, sock, out / "target.log")
            for t, svc in ((RDMA, OURS_TRSVCID), (TCP, OURS_TCP_TRSVCID)):
                if t in endpoints:
                    endpoints[t][OURS] = Endpoint(OURS, guest.TRADDR, svc, SUBNQN, ours.pid,
                                                  sock, transport=t)
            if bdev is not None:
                bdev_eps[OURS] = Endpoint(OURS, guest.TRADDR, OURS_BDEV_TRSVCID, BDEV_SUBNQN,
                                          ours.pid, sock, backing=BDEV)
        if KERNEL in targets:
            for t, svc, nqn, portid in ((RDMA, KERNEL_TRSVCID, SUBNQN, 2),
                                        (TCP, KERNEL_TCP_TRSVCID, KERNEL_TCP_SUBNQN, 4)):
                if t not in endpoints:
                    continue
                say(f"configuring the kernel target ({KERNEL_NAMES[t]}, configfs, "
                    "buffered_io=1)")
                kts.append(KernelTarget(nqn, backing, trsvcid=svc, port_id=portid,
                                        trtype=t, buffered_io=True))
                kts[-1].setup()
                endpoints[t][KERNEL] = Endpoint(KERNEL, guest.TRADDR, svc, nqn, transport=t)
            if bdev is not None:
                say(f"configuring the kernel target ({KERNEL_NAMES[RDMA]}, configfs, "
                    f"{bdev}, buffered_io=0)")
                kts.append(KernelTarget(BDEV_SUBNQN, bdev, trsvcid=KERNEL_BDEV_TRSVCID,
                                        port_id=5, trtype=RDMA, buffered_io=False))
                kts[-1].setup()
                bdev_eps[KERNEL] = Endpoint(KERNEL, guest.TRADDR, KERNEL_BDEV_TRSVCID,
                                            BDEV_SUBNQN, backing=BDEV)
        say(f"setup done in {time.monotonic() - t0:.0f} s; "
            f"{timing.repeat} x {len(jobs)} jobs x {len(targets)} targets x "
            f"{len(transports)} transports, {timing.runtime_s} s each")
        prof = _start_profiler(ours.pid, out) if ours is not None else None
        for t in transports if FILE in backings else ():
            # all RDMA runs, then all TCP runs: ratios are within one
            results["runs"] += run_matrix(endpoints[t], timing, timed, say)
        if bdev_eps:
            results["runs"] += run_matrix(bdev_eps, timing, jobs, say)
        if prof is not None:
            prof.send_signal(signal.SIGINT)
            prof.wait(120)
        if ours is not None and rss_queues and RDMA in endpoints:
            say(f"RSS with {rss_queues} I/O queues connected")
            results["rss"] = measure_rss(endpoints[RDMA][OURS], rss_queues,
                                         os.cpu_count() or 1)
            say(f"  {json.dumps(results['rss'])}")
        if ours is not None:
            ep = next(iter(endpoints.values()))[OURS]
            results["target_status"] = _status(ep)
    finally:
        for kt in reversed(kts):
            kt.teardown()
        if ours is not None:
            results["meta"]["ours_exit"] = _stop(ours)
        if bdev is not None:
            subprocess.run(["losetup", "-d", bdev], check=False, capture_output=True,
                           timeout=60)
        results["meta"]["seconds"] = round(time.monotonic() - t0, 1)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


# -- the command ------------------------------------------------------------------------------

def _timing(args: argparse.Namespace) -> Timing:
    base = QUICK if args.quick else FULL
    return Timing(args.runtime or base.runtime_s,
                  base.ramp_s if args.ramp is None else args.ramp,
                  args.repeat or base.repeat)


def _jobs(names: Sequence[str] | None, quick: bool = False) -> list[Job]:
    """The jobs asked for; by default every timed job, and the verify run unless quick."""
    if not names:
        return [*JOBS, *(() if quick else (VERIFY_JOB,))]
    by_name = {j.name: j for j in (*JOBS, VERIFY_JOB)}
    return [by_name[n] for n in names]


def _vm_timeout(timing: Timing, jobs: Sequence[Job], ntargets: int, nseries: int) -> float:
    """Time for every run of the matrix to end by its own timeout, and the setup."""
    per_run = timing.runtime_s + timing.ramp_s + 25  # connect, fio start, disconnect
    timed = sum(not j.sized for j in jobs)
    sized = len(jobs) - timed
    return (300 + timing.repeat * timed * ntargets * nseries * per_run
            + sized * ntargets * SIZED_JOB_TIMEOUT_S)


def _run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("matplotlib") is None:  # say so before the matrix runs
        print("bench: the report's plot needs matplotlib, which is not installed: "
              "pip install 'nvmet-p2p[bench]'", file=sys.stderr)
        return 2
    timing = _timing(args)
    jobs = _jobs(args.job, args.quick)
    targets = args.target or list(TARGETS)
    transports = args.transport or list(TRANSPORTS)
    backings = args.backing or ([FILE] if args.quick else list(BACKINGS))
    out = Path(args.out) if args.out else DEFAULT_RESULTS_DIR / dt.datetime.now().strftime(
        "%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if args.no_vm:
        rc = _run_no_vm(args, out, timing, jobs)
    else:
        rc = _run_vm(args, out, timing, jobs, targets, transports, backings)
    results_file = out / "results.json"
    if not results_file.exists():
        print(f"bench: no results (exit {rc})", file=sys.stderr)
        return rc or 1
    results = json.loads(results_file.read_text())
    results["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)
    results_file.write_text(json.dumps(results, indent=1))
    md, png = write_report(results, out)
    print()
    print(md.read_text())
    print(f"bench: {results_file}, {md}, {png} ({results['meta']['wall_seconds']:.0f} s)")
    failed = [r for r in results["runs"] if r.get("error")]
    if failed or not results["runs"]:
        print(f"bench: {len(failed)} of {len(results['runs'])} run(s) failed",
              file=sys.stderr)
        return rc or 1
    return rc


def _run_vm(args: argparse.Namespace, out: Path, timing: Timing, jobs: list[Job],
            targets: list[str], transports: list[str], backings: list[str]) -> int:
    from nvmet_p2p.testbed.vm import VM

    inner = [sys.executable, "-m", "nvmet_p2p.testbed.bench", "guest", "--out", "$NVMET_P2P_VM_OUT",
             "--runtime", str(timing.runtime_s), "--ramp", str(timing.ramp_s),
             "--repeat", str(timing.repeat), "--rss-queues", str(args.rss_queues)]
    for j in jobs:
        inner += ["--job", j.name]
    for t in targets:
        inner += ["--target", t]
    for t in transports:
        inner += ["--transport", t]
    for b in backings:
        inner += ["--backing", b]
    if args.no_fabric:
        inner.append("--no-fabric")
    script = " ".join(a if a.startswith("$") else shlex.quote(a) for a in inner) + "\n"
    if args.profile:
        script = f"export NVMET_P2P_BENCH_PROFILE={shlex.quote(args.profile)}\n" + script
    print(f"bench: booting the soft-RoCE VM (TCG), results in {out}", flush=True)
    nseries = len(transports) + (BDEV in backings and RDMA in transports)
    timeout = _vm_timeout(timing, jobs, len(targets), nseries)
    with Progress(sys.stdout) as progress:  # the guest's lines; a bar on a terminal
        result = VM().run(script, timeout, stream=cast(TextIO, progress), out_dir=out)
    return result.returncode


def _run_no_vm(args: argparse.Namespace, out: Path, timing: Timing, jobs: list[Job]) -> int:
    from nvmet_p2p.testbed import libnvme_host

    if not (args.traddr or args.kernel_traddr):
        print("bench: --no-vm needs --traddr and/or --kernel-traddr", file=sys.stderr)
        return 2
    if libnvme_host.nvme is None:  # say so before the matrix, not once per run
        print(f"bench: --no-vm connects through libnvme: {libnvme_host.IMPORT_ERROR}",
              file=sys.stderr)
        return 2
    endpoints = {}
    transport = (args.transport or [RDMA])[0]
    if args.traddr:
        endpoints[OURS] = Endpoint(OURS, args.traddr, args.trsvcid, args.subnqn,
                                   rpc_socket=args.rpc_socket, transport=transport)
    if args.kernel_traddr:
        endpoints[KERNEL] = Endpoint(KERNEL, args.kernel_traddr, args.kernel_trsvcid,
                                     args.kernel_subnqn or args.subnqn, transport=transport)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "meta": {"started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                 "mode": "no-vm", "runtime_s": timing.runtime_s, "ramp_s": timing.ramp_s,
                 "repeat": timing.repeat, "kernel": os.uname().release,
                 "cpus": os.cpu_count(), "jobs": [j.name for j in jobs]},
        "fabric": {"write_bw_MBps": None, "read_lat": None,
                   "error": "perftest needs a server on the target machine; run it by hand"},
        "runs": [], "rss": None}
    with Progress(sys.stdout) as progress:
        results["runs"] = run_matrix(endpoints, timing, jobs, progress.line,
                                     nr_io_queues=args.nr_io_queues)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", type=int, help="seconds per fio job (default 10; quick: 5)")
    p.add_argument("--ramp", type=int, help="fio ramp_time seconds (default 2; quick: 1)")
    p.add_argument("--repeat", type=int, help="repeats per job and target (default 3; quick: 1)")
    p.add_argument("--job", action="append", choices=JOB_NAMES,
                   help="run only this job (repeatable; default: all of nvmet_p2p/testbed/jobs)")
    p.add_argument("--target", action="append", choices=TARGETS,
                   help="run only this target (repeatable; default: both)")
    p.add_argument("--transport", action="append", choices=TRANSPORTS,
                   help="run only over this transport (repeatable; default: rdma and tcp; "
                        "--no-vm: the first one given, default rdma)")
    p.add_argument("--backing", action="append", choices=BACKINGS,
                   help="namespaces on a tmpfs file (buffered) and/or a loop block device "
                        "(O_DIRECT, over RDMA, with the 512 MiB verify run unless --quick) "
                        "(repeatable; default: both, quick: file)")
    p.add_argument("--no-fabric", action="store_true", help="skip ib_write_bw / ib_read_lat")
    p.add_argument("--rss-queues", type=int, default=RSS_IO_QUEUES,
                   help="I/O queues connected for the RSS figure (0: skip; default 16)")


def add_subparsers(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench`` on a parent's subparsers (``nvmet-p2p bench``)."""
    p = subparsers.add_parser(
        "bench", help="fio matrix: nvmet-p2p vs the kernel's nvmet-rdma and nvmet-tcp "
                      "(bench/README.md)",
        description="Boot the soft-RoCE VM once, run the fio jobs of nvmet_p2p/testbed/jobs/ "
                    "over RDMA and TCP against nvmet-p2p and the kernel's nvmet-rdma and "
                    "nvmet-tcp serving the same file, measure "
                    "the fabric limit, and write results.json, results.md and results.png.")
    p.add_argument("--quick", action="store_true", help="5-second jobs, once each")
    p.add_argument("--out", metavar="DIR", help="results directory "
                   "(default: bench/results/<timestamp>)")
    p.add_argument("--profile", metavar="FORMAT", choices=("flamegraph", "speedscope", "raw"),
                   help="sample our target with py-spy during the matrix (profile.* in --out)")
    _add_common(p)
    nv = p.add_argument_group("--no-vm: run from this Linux host against running targets")
    nv.add_argument("--no-vm", action="store_true",
                    help="no VM: this machine is the NVMe-oF host")
    nv.add_argument("--traddr", help="our target's address")
    nv.add_argument("--trsvcid", type=int, default=OURS_TRSVCID, help="our target's port")
    nv.add_argument("--subnqn", default=SUBNQN, help="subsystem NQN on our target")
    nv.add_argument("--rpc-socket", help="our target's control socket, if reachable "
                    "(P2P counters)")
    nv.add_argument("--kernel-traddr", help="the kernel target's address")
    nv.add_argument("--kernel-trsvcid", type=int, default=4420, help="the kernel target's port")
    nv.add_argument("--kernel-subnqn", help="subsystem NQN on the kernel target "
                    "(default: --subnqn)")
    nv.add_argument("--nr-io-queues", type=int, help="nvme connect -i")
    p.set_defaults(func=_run)
    return p


def _guest_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nvmet_p2p.testbed.bench guest")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    _add_common(p)
    args = p.parse_args(argv)
    return guest_main(Path(args.out), _timing(args), _jobs(args.job, args.quick),
                      args.target or list(TARGETS), measure_fabric=not args.no_fabric,
                      rss_queues=args.rss_queues, transports=args.transport or list(TRANSPORTS),
                      backings=args.backing or ([FILE] if args.quick else list(BACKINGS)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["guest"]:
        sys.exit(_guest_cli(sys.argv[2:]))
    sys.exit("usage: python -m nvmet_p2p.testbed.bench guest ... (from the host: nvmet-p2p bench)")
