"""Host-side tests of `nvmet-p2p bench`: parsing, schema, summary, ratios, table, plot.

No VM: the fio, perftest and /proc documents are canned, shaped as the real tools print
them (fio 3.33 JSON, perftest 4.5 text).
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest

from nvmet_p2p.cli import build_parser
from nvmet_p2p.testbed import bench
from nvmet_p2p.testbed.progress import PROGRESS_LINE, Progress


def _ddir(iops: float, bw: float, mean_ns: float, n: int, p50_ns: float, p99_ns: float) -> dict:
    return {"iops": iops, "bw_bytes": bw,
            "clat_ns": {"mean": mean_ns, "N": n,
                        "percentile": {"50.000000": p50_ns, "99.000000": p99_ns}}}


def _fio(read: dict | None = None, write: dict | None = None) -> dict:
    zero = _ddir(0, 0, 0, 0, 0, 0)
    return {"fio version": "fio-3.33",
            "jobs": [{"jobname": "x", "error": 0, "read": read or zero, "write": write or zero}]}


def _run(job: str, target: str, repeat: int, iops: float, lat: float,
         cpu: float | None = None, error: str | None = None) -> dict:
    return {"job": job, "target": target, "repeat": repeat, "runtime_s": 5, "error": error,
            "iops": iops, "bw_bytes": iops * 4096, "lat_mean_us": lat, "lat_p50_us": lat,
            "lat_p99_us": 2 * lat, "target_cpu_pct": cpu, "guest_cpu_pct": 150.0,
            "p2p": {"p2p_reqs": 0, "p2p_bytes": 0, "sysmem_reqs": 10} if target == "ours"
            else None}


@pytest.fixture
def results() -> dict:
    runs = []
    for r, (k, o) in enumerate([(2000, 1000), (2400, 1400), (1800, 1200)]):
        runs.append(_run("randread-4k-qd32", "kernel", r, k, 16000))
        runs.append(_run("randread-4k-qd32", "ours", r, o, 26000, cpu=95.0 + r))
    runs.append(_run("randread-4k-qd1", "kernel", 0, 600, 1600))
    runs.append(_run("randread-4k-qd1", "ours", 0, 300, 3300, cpu=50.0))
    runs.append(_run("randread-4k-qd1", "ours", 1, 0, 0, error="VMError: fio exit 1"))
    return {"schema": bench.SCHEMA,
            "meta": {"mode": "vm", "runtime_s": 5, "repeat": 3},
            "fabric": {"write_bw_MBps": 49.3, "read_lat": {"typical_us": 91.0, "avg_us": 95.0,
                                                           "p99_us": 379.0}, "error": None},
            "runs": runs,
            "rss": {"io_queues": 16, "controllers": 8, "vmrss_kib": 120 * 1024,
                    "idle_vmrss_kib": 90 * 1024, "error": None}}


# -- parsing --------------------------------------------------------------------------------

def test_parse_fio_single_direction_in_us():
    res = _fio(read=_ddir(1000.0, 4096000.0, 32000.0, 5000, 30000.0, 90000.0))
    assert bench.parse_fio(res, ("read",)) == {
        "iops": 1000.0, "bw_bytes": 4096000.0, "lat_mean_us": 32.0, "lat_p50_us": 30.0,
        "lat_p99_us": 90.0}


def test_parse_fio_mixed_sums_and_weights_by_count():
    res = _fio(read=_ddir(700, 700 * 8192, 10000, 700, 9000, 40000),
               write=_ddir(300, 300 * 8192, 20000, 300, 19000, 30000))
    got = bench.parse_fio(res, ("read", "write"))
    assert got["iops"] == 1000
    assert got["bw_bytes"] == 1000 * 8192
    assert got["lat_mean_us"] == pytest.approx((10 * 700 + 20 * 300) / 1000)
    assert got["lat_p50_us"] == 19.0  # the worse direction
    assert got["lat_p99_us"] == 40.0


def test_parse_fio_no_completions_has_zero_latency():
    assert bench.parse_fio(_fio(), ("read",))["lat_mean_us"] == 0.0


IB_WRITE_BW = """\
---------------------------------------------------------------------------------------
                    RDMA_Write BW Test
 Dual-port       : OFF		Device         : rxe0
 #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]
 131072     1880             0.00               47.00		   0.000376
---------------------------------------------------------------------------------------
"""

IB_READ_LAT = """\
 #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec]
 4096       1000          60.12          2114.30      91.40            97.55        40.20            379.10               1500.00
---------------------------------------------------------------------------------------
"""


def test_parse_perftest():
    assert bench.parse_ib_write_bw(IB_WRITE_BW) == pytest.approx(47.0 * 1.048576)
    assert bench.parse_ib_read_lat(IB_READ_LAT) == {"typical_us": 91.4, "avg_us": 97.55,
                                                    "p99_us": 379.1}
    with pytest.raises(ValueError):
        bench.parse_ib_write_bw("Couldn't connect to 192.0.2.1:18515\n")
    with pytest.raises(ValueError):
        bench.parse_ib_read_lat("")


def test_proc_cpu_ticks_survives_odd_comm():
    # comm "(a) b)" contains a space and a parenthesis; utime=700, stime=300
    fields = ["S", "1", "1", "1", "0", "-1", "4194560", "10", "0", "0", "0", "700", "300"]
    text = "1234 ((a) b)) " + " ".join(fields + ["0"] * 30) + "\n"
    assert bench.proc_cpu_ticks(text) == 1000
    assert bench.cpu_percent(1000, 1500, 5.0, clk_tck=100) == pytest.approx(100.0)
    assert bench.cpu_percent(0, 10, 0.0) == 0.0


def test_system_busy_and_vmrss():
    stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n"
    assert bench.system_busy_ticks(stat) == (150, 1000)
    assert bench.vmrss_kib("Name:\tpython3\nVmRSS:\t  123456 kB\nThreads:\t5\n") == 123456
    with pytest.raises(ValueError):
        bench.vmrss_kib("Name: x\n")


def test_p2p_counters_sum_namespaces_of_the_subsystem():
    status = {"subsystems": {
        bench.SUBNQN: {"namespaces": [
            {"nsid": 1, "stats": {"p2p_reqs": 3, "p2p_bytes": 12288, "sysmem_reqs": 7}},
            {"nsid": 2, "stats": {"p2p_reqs": 1, "p2p_bytes": 4096, "sysmem_reqs": 0}}]},
        "nqn.other": {"namespaces": [{"nsid": 1, "stats": {"p2p_reqs": 100}}]}}}
    assert bench.p2p_counters(status) == {"p2p_reqs": 4, "p2p_bytes": 16384, "sysmem_reqs": 7}


# -- schedule, summary, ratios --------------------------------------------------------------

def test_schedule_interleaves_targets_and_alternates_who_goes_first():
    jobs = bench.JOBS[:2]
    plan = bench.schedule(jobs, bench.TARGETS, repeat=2)
    assert len(plan) == 2 * 2 * 2
    assert [t for _, _, t in plan] == ["ours", "kernel", "kernel", "ours"] * 2
    assert [(r, j.name) for r, j, _ in plan[:2]] == [(0, jobs[0].name)] * 2
    assert {r for r, _, _ in plan} == {0, 1}


def test_summarize_median_spread_skips_failed_runs(results):
    s = bench.summarize(results["runs"])
    ours = s["randread-4k-qd32"]["ours"]
    assert ours["iops"] == {"median": 1200.0, "min": 1000.0, "max": 1400.0, "n": 3}
    assert ours["target_cpu_pct"]["median"] == 96.0
    assert s["randread-4k-qd32"]["kernel"]["target_cpu_pct"] is None
    assert s["randread-4k-qd1"]["ours"]["iops"]["n"] == 1  # the failed repeat is left out
    assert bench.ratio(s, "randread-4k-qd32", "iops") == pytest.approx(1200 / 2000)
    assert bench.ratio(s, "randread-4k-qd1", "lat_mean_us") == pytest.approx(3300 / 1600)
    assert bench.ratio(s, "seqread-128k-qd16", "iops") is None


def test_markdown_table(results):
    md = bench.markdown_table(results)
    lines = md.splitlines()
    header, sep = lines[0], lines[1]
    assert header.count("|") == sep.count("|")
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| rand")}
    assert list(rows) == ["randread-4k-qd1", "randread-4k-qd32"]  # bench.JOBS order
    qd32 = [c.strip() for c in rows["randread-4k-qd32"].split("|")[1:-1]]
    assert qd32[1] == "2,000 ±15%"  # kernel: median 2000, range 1800..2400
    assert qd32[2] == "1,200 ±17%"
    assert qd32[3] == "0.60"
    assert qd32[8] == "1.62"  # 26000 / 16000
    assert qd32[10].startswith("96")
    assert "49.3 MB/s" in md and "typical 91.4" not in md and "typical 91.0 µs" in md
    assert "VmRSS with 16 I/O queues connected (8 controllers): 120.0 MiB" in md
    assert "1 run(s) failed: ours randread-4k-qd1 #1: VMError: fio exit 1" in md
    assert re.search(r"Kernel CPU: n/a", md)


def test_report_files_and_plot_is_a_png(results, tmp_path: Path):
    (tmp_path / "results.json").write_text(json.dumps(results))
    md, png = bench.write_report(results, tmp_path)
    assert md.read_text() == bench.markdown_table(results)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_markdown_reports_missing_fabric_and_rss():
    res = {"meta": {}, "fabric": {"error": "ib_write_bw: not installed"},
           "runs": [], "rss": {"error": "no target process to read (--no-vm)"}}
    md = bench.markdown_table(res)
    assert "Fabric limit: not measured (ib_write_bw: not installed)." in md
    assert "RSS: not measured (no target process to read (--no-vm))." in md


# -- job files and the command line ----------------------------------------------------------

@pytest.mark.parametrize("job", bench.JOBS, ids=lambda j: j.name)
def test_job_files_exist_and_match_the_matrix(job):
    text = job.path.read_text()
    assert f"[{job.name}]" in text
    for var in ("${BENCH_DEV}", "${BENCH_RUNTIME}", "${BENCH_RAMP}"):
        assert var in text
    assert "direct=1" in text
    rw = re.search(r"^rw=(\S+)", text, re.MULTILINE).group(1)
    assert ("write" in rw) == ("write" in job.ddirs) or rw == "randrw"


def test_no_extra_job_files():
    assert sorted(p.stem for p in bench.JOBS_DIR.glob("*.fio")) == sorted(bench.JOB_NAMES)


def test_cli_parses_quick_and_no_vm():
    args = build_parser().parse_args(["bench", "--quick", "--out", "/tmp/x", "--repeat", "2"])
    t = bench._timing(args)
    assert (t.runtime_s, t.ramp_s, t.repeat) == (5, 1, 2)
    args = build_parser().parse_args(["bench", "--no-vm", "--traddr", "10.0.0.2",
                                      "--kernel-traddr", "10.0.0.3", "--job",
                                      "randread-4k-qd1"])
    assert args.no_vm and args.traddr == "10.0.0.2" and args.kernel_trsvcid == 4420
    assert [j.name for j in bench._jobs(args.job)] == ["randread-4k-qd1"]
    assert bench._timing(args) == bench.FULL
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--job", "nope"])


def test_no_vm_without_addresses_refuses(tmp_path: Path, capsys):
    args = build_parser().parse_args(["bench", "--no-vm", "--out", str(tmp_path)])
    assert args.func(args) == 2
    assert "--traddr" in capsys.readouterr().err


def test_no_vm_without_libnvme_refuses_before_running(tmp_path: Path, capsys, monkeypatch):
    from nvmet_p2p.testbed import libnvme_host

    monkeypatch.setattr(libnvme_host, "nvme", None)
    monkeypatch.setattr(libnvme_host, "IMPORT_ERROR", "no libnvme (test)")
    monkeypatch.setattr(bench, "run_matrix", lambda *a, **k: pytest.fail("the matrix ran"))
    args = build_parser().parse_args(["bench", "--no-vm", "--traddr", "192.0.2.1",
                                      "--out", str(tmp_path)])
    assert args.func(args) == 2
    assert "connects through libnvme: no libnvme (test)" in capsys.readouterr().err


def test_quick_vm_ceiling_stays_under_twenty_minutes():
    # The hard VM timeout is a ceiling, not an estimate; it must still leave room.
    # Quick: the timed jobs, both targets, both transports, on the file only.
    jobs = bench._jobs(None, quick=True)
    assert not any(j.sized for j in jobs)
    assert bench._vm_timeout(bench.QUICK, jobs, 2, 2) <= 1200


def test_verify_job_file_is_blktests_fio_verify():
    job = bench.VERIFY_JOB
    text = job.path.read_text()
    settings = dict(re.findall(r"^(\w+)=(\S+)$", text, re.MULTILINE))
    assert job.sized and "${BENCH_RUNTIME}" not in text and "time_based" not in settings
    assert {k: settings[k] for k in ("rw", "bs", "iodepth", "ioengine", "direct", "size",
                                     "verify", "do_verify", "verify_fatal")} == {
        "rw": "randwrite", "bs": "4k", "iodepth": "16", "ioengine": "libaio", "direct": "1",
        "size": "512m", "verify": "crc32c", "do_verify": "1", "verify_fatal": "1"}
    assert bench.BDEV_NS_SIZE == 512 << 20  # the whole device is written
    assert bench.VERIFY_JOB in bench._jobs(None) and bench._jobs(["verify-512m"]) == [job]


def test_sized_job_runs_in_the_first_repeat_only():
    plan = bench.schedule([bench.JOBS[0], bench.VERIFY_JOB], ["ours", "kernel"], 3)
    sized = [(r, t) for r, j, t in plan if j.sized]
    assert sized == [(0, "kernel"), (0, "ours")]
    assert sum(not j.sized for _, j, _ in plan) == 6


def test_cli_backing_defaults():
    assert build_parser().parse_args(["bench"]).backing is None
    assert build_parser().parse_args(["bench", "--backing", "bdev"]).backing == ["bdev"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--backing", "nfs"])


# -- the block-device series ---------------------------------------------------------------------

def _qd32_series(iops: list[tuple[int, int]], kernel_lat: float, ours_lat: float,
                 **series: str) -> list[dict]:
    """randread-4k-qd32 repeats of both targets, (kernel, ours) IOPS each, in one series
    (`transport=`, `backing=`)."""
    runs = []
    for r, (k, o) in enumerate(iops):
        runs.append({**_run("randread-4k-qd32", "kernel", r, k, kernel_lat), **series})
        runs.append({**_run("randread-4k-qd32", "ours", r, o, ours_lat, cpu=90.0), **series})
    return runs


@pytest.fixture
def with_bdev(results) -> dict:
    """`results` plus the QD32 job and the verify run on a block device over RDMA."""
    bdev = _qd32_series([(1500, 600), (1600, 800), (1400, 700)], 20000, 40000,
                        backing="bdev")
    bdev.append({**_run("verify-512m", "kernel", 0, 1700, 9000), "backing": "bdev",
                 "runtime_s": None, "wall_s": 81.0})
    bdev.append({**_run("verify-512m", "ours", 0, 500, 30000), "backing": "bdev",
                 "runtime_s": None, "wall_s": 243.0})
    return {**results, "runs": results["runs"] + bdev}


def test_bdev_series_is_summarized_apart(with_bdev):
    files = bench.summarize(with_bdev["runs"])
    bdevs = bench.summarize(with_bdev["runs"], "rdma", "bdev")
    assert files["randread-4k-qd32"]["ours"]["iops"]["median"] == 1200
    assert bdevs["randread-4k-qd32"]["ours"]["iops"]["median"] == 700
    assert bdevs["verify-512m"]["kernel"]["wall_s"]["median"] == 81.0
    assert "verify-512m" not in files
    assert bench.series_of(with_bdev) == [("rdma", "file"), ("rdma", "bdev")]


def test_markdown_bdev_table_compares_with_the_file_and_times_the_verify(with_bdev):
    md = bench.markdown_table(with_bdev)
    before, after = md.split("RDMA: ours vs the kernel's nvmet-rdma, block-device namespace "
                             "(a loop device on a /dev/shm file, O_DIRECT in both targets):")
    assert "| verify-512m |" in after and "| verify-512m |" not in before
    assert "IOPS bdev/file, ours: randread-4k-qd32 0.58." in after  # 700 / 1200
    assert "IOPS bdev/file, kernel: randread-4k-qd32 0.75." in after  # 1500 / 2000
    assert ("verify-512m (blktests-style: 512 MiB of 4 KiB random writes at QD16, then "
            "crc32c verify): ours 243 s, kernel 81 s, time ours/kernel 3.00.") in after


def test_our_config_serves_the_bdev_on_a_port_of_its_own(tmp_path: Path):
    cfg = bench._our_config(tmp_path / "f.img", ("rdma",), bdev="/dev/loop7")
    by_nqn = {s["nqn"]: s for s in cfg["subsystems"]}
    ns = by_nqn[bench.BDEV_SUBNQN]["namespaces"][0]
    assert ns["device"] == {"path": "/dev/loop7", "backend": "bdev"} and ns["buffered_io"] == 0
    [port] = [p for p in cfg["ports"] if p["subsystems"] == [bench.BDEV_SUBNQN]]
    assert port["addr"]["trtype"] == "rdma"
    assert port["addr"]["trsvcid"] == str(bench.OURS_BDEV_TRSVCID)


# -- TCP jobs ------------------------------------------------------------------------------------

@pytest.fixture
def both(results) -> dict:
    """`results` plus the same jobs over TCP (records without a transport are RDMA)."""
    tcp = _qd32_series([(3000, 1500), (3300, 1650), (2700, 1350)], 10000, 20000,
                       transport="tcp")
    return {**results, "runs": results["runs"] + tcp}


def test_summaries_are_per_transport(both):
    rdma, tcp = bench.summarize(both["runs"]), bench.summarize(both["runs"], "tcp")
    assert bench.ratio(rdma, "randread-4k-qd32", "iops") == pytest.approx(1200 / 2000)
    assert bench.ratio(tcp, "randread-4k-qd32", "iops") == pytest.approx(1500 / 3000)
    assert "randread-4k-qd1" not in tcp
    assert bench.series_of(both) == [("rdma", "file"), ("tcp", "file")]


def test_markdown_has_a_tcp_table_after_the_rdma_one(both):
    md = bench.markdown_table(both)
    before, after = md.split("NVMe/TCP: ours (tcp.py) vs the kernel's nvmet-tcp:")
    assert "| randread-4k-qd1 |" in before and "| randread-4k-qd1 |" not in after
    [row] = [ln for ln in after.splitlines() if ln.startswith("| randread-4k-qd32")]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1] == "3,000 ±10%" and cells[3] == "0.50" and cells[8] == "2.00"
    assert md.splitlines()[0].startswith("| job |")  # RDMA first, bare, as before


def test_tcp_only_results_and_plot(both, tmp_path: Path):
    tcp_only = {**both, "runs": [r for r in both["runs"] if r.get("transport") == "tcp"]}
    md = bench.markdown_table(tcp_only)
    assert md.startswith("NVMe/TCP: ours (tcp.py)")
    _, png = bench.write_report(both, tmp_path)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_our_config_has_a_port_per_transport(tmp_path: Path):
    cfg = bench._our_config(tmp_path / "f.img", ("rdma", "tcp"))
    ports = {p["addr"]["trtype"]: p for p in cfg["ports"]}
    assert ports["rdma"]["addr"]["trsvcid"] == str(bench.OURS_TRSVCID)
    assert ports["tcp"]["addr"]["trsvcid"] == str(bench.OURS_TCP_TRSVCID)
    assert all(p["subsystems"] == [bench.SUBNQN] for p in cfg["ports"])


def test_cli_transport_choice():
    args = build_parser().parse_args(["bench", "--transport", "tcp"])
    assert args.transport == ["tcp"]
    assert build_parser().parse_args(["bench"]).transport is None  # both
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--transport", "fc"])


def test_report_with_a_bdev_series_plots(with_bdev, tmp_path: Path):
    md, png = bench.write_report(with_bdev, tmp_path)
    assert "verify-512m" in md.read_text() and png.read_bytes()[:4] == b"\x89PNG"


# -- progress: plain lines always, a tqdm bar on a terminal -----------------------------------

class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _fake_matrix(monkeypatch, n_jobs: int = 2) -> tuple[list, bench.Timing]:
    jobs = [j for j in bench.JOBS if j.name in bench.JOB_NAMES[:n_jobs]]
    calls = iter(range(100))

    def fake_run_job(job, ep, timing, r, nr_io_queues=None):
        i = next(calls)
        if i == 1:
            return {"error": "fio failed"}
        return {"error": None, "iops": 1000.0 + i, "bw_bytes": 4.096e6, "lat_mean_us": 900.0,
                "lat_p99_us": 2000.0, "target_cpu_pct": None}
    monkeypatch.setattr(bench, "run_job", fake_run_job)
    return jobs, bench.Timing(runtime_s=1, ramp_s=0, repeat=2)


def _endpoints() -> dict:
    return {t: bench.Endpoint(t, "192.0.2.1", 4420, "nqn.x") for t in (bench.OURS, bench.KERNEL)}


def test_progress_without_a_terminal_is_the_plain_lines(monkeypatch):
    jobs, timing = _fake_matrix(monkeypatch)
    out = io.StringIO()
    with Progress(out) as p:
        runs = bench.run_matrix(_endpoints(), timing, jobs, p.line)
    lines = out.getvalue().splitlines()
    assert len(runs) == len(lines) == 8
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()  # no bar, no escapes
    assert [PROGRESS_LINE.match(ln).groups() for ln in lines] == [
        (f"{i:2d}".strip(), "8") for i in range(1, 9)]
    assert "FAILED fio failed" in lines[1] and "IOPS" in lines[0] and "(eta " in lines[-1]


def test_progress_on_a_terminal_adds_a_tqdm_bar(monkeypatch):
    pytest.importorskip("tqdm")
    jobs, timing = _fake_matrix(monkeypatch)
    out = _Tty()
    with Progress(out) as p:
        assert p.bar is not None
        bench.run_matrix(_endpoints(), timing, jobs, p.line)
        assert (p.bar.n, p.bar.total) == (8, 8)
    text = out.getvalue()
    assert "bench: 100%" in text and "8/8" in text  # the bar, finished
    assert sum(1 for ln in text.replace("\r", "\n").splitlines()
               if PROGRESS_LINE.match(ln)) == 8  # every line is still there, whole


def test_progress_relays_the_vms_chunks_as_lines():
    pytest.importorskip("tqdm")
    out = _Tty()
    with Progress(out) as p:
        for chunk in ["bench: booting", " the VM\n[ 1/3] rdma ours", " j #1: ok\n[ 2/",
                      "3] rdma kernel j #1: ok\n", "no newline at the end"]:
            p.write(chunk)
        assert (p.bar.n, p.bar.total) == (2, 3)
        p.write("\n[ 1/3] tcp  ours j #1: ok\n")  # the next transport: the bar starts again
        assert (p.bar.n, p.bar.total) == (1, 3)
    lines = [ln for ln in out.getvalue().replace("\r", "\n").splitlines() if ln.strip()]
    for want in ["bench: booting the VM", "[ 1/3] rdma ours j #1: ok",
                 "[ 2/3] rdma kernel j #1: ok", "no newline at the end"]:
        assert want in lines
    plain = io.StringIO()
    with Progress(plain) as p:  # not a terminal: exactly what was written
        p.write("a\nb")
    assert plain.getvalue() == "a\nb\n"


def test_progress_without_tqdm_is_the_plain_lines(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `pip install .` without [bench]
    out = _Tty()
    with Progress(out) as p:
        assert p.bar is None
        p.line("[ 1/1] x")
    assert out.getvalue() == "[ 1/1] x\n"
