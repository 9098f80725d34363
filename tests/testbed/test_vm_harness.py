"""Host-side tests of the VM harness, guest helpers and kernel target config: no VM boots.

A fake `vng` (a small script that runs the --exec command on the host) exercises the
real launch, output relay, exit-code and hard-timeout paths of VM.run().
"""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nvmet_p2p.errors import VMError
from nvmet_p2p.testbed import guest, vm
from nvmet_p2p.testbed.kernel_target import KernelTarget


def qemu_opts_of(args: list[str]) -> list[str]:
    [opt] = [a for a in args if a.startswith("--qemu-opts=")]
    return shlex.split(opt.removeprefix("--qemu-opts="))


def values_of(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


# -- command line -------------------------------------------------------------------------

def test_find_kernel_picks_newest_version(tmp_path: Path) -> None:
    for v in ("6.1.0-56-amd64", "6.9.0-1-amd64", "6.10.0-2-amd64"):
        (tmp_path / f"vmlinuz-{v}").touch()
    (tmp_path / "config-6.11.0-1-amd64").touch()
    assert vm.find_kernel(tmp_path).name == "vmlinuz-6.10.0-2-amd64"


def test_find_kernel_none(tmp_path: Path) -> None:
    with pytest.raises(VMError, match="linux-image-amd64"):
        vm.find_kernel(tmp_path)


def make_kernels(tmp_path: Path, p2pdma: bool = True) -> tuple[Path, Path]:
    """A /boot with Debian 12's 6.1 and a /lib/modules with 7.x images as tools/vm-kernel.sh
    installs them (vmlinuz and config inside the release directory)."""
    boot, modules = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    (boot / "vmlinuz-6.1.0-57-amd64").touch()
    (boot / "config-6.1.0-57-amd64").write_text("# CONFIG_PCI_P2PDMA is not set\n")
    (modules / "6.1.0-57-amd64/kernel").mkdir(parents=True)  # /boot's modules: no vmlinuz
    on = "CONFIG_PCI_P2PDMA=y\n" if p2pdma else "# CONFIG_PCI_P2PDMA is not set\n"
    for rel, config in (("7.2.11+deb13-amd64", on), ("7.3.4+deb13-amd64", on),
                        ("7.10.1+deb13-amd64", "# CONFIG_PCI_P2PDMA is not set\n")):
        (modules / rel).mkdir(parents=True)
        (modules / rel / "vmlinuz").touch()
        (modules / rel / "config").write_text("CONFIG_ZONE_DEVICE=y\n" + config)
    # half installed (tools/vm-kernel.sh writes vmlinuz last): not bootable
    (modules / "7.11.0+deb13-amd64").mkdir()
    (modules / "7.11.0+deb13-amd64/config").write_text("CONFIG_PCI_P2PDMA=y\n")
    return boot, modules


def test_installed_kernels_both_layouts(tmp_path: Path) -> None:
    boot, modules = make_kernels(tmp_path)
    ks = vm.installed_kernels(modules, boot)
    assert [(k.release, k.p2pdma) for k in ks] == [
        ("6.1.0-57-amd64", False), ("7.2.11+deb13-amd64", True),
        ("7.3.4+deb13-amd64", True), ("7.10.1+deb13-amd64", False)]
    assert ks[0].image == boot / "vmlinuz-6.1.0-57-amd64"
    assert ks[0].config == boot / "config-6.1.0-57-amd64"
    assert ks[2].image == modules / "7.3.4+deb13-amd64/vmlinuz"
    assert "PCI P2PDMA" in ks[2].describe() and "no PCI P2PDMA" in ks[0].describe()


def test_select_kernel_default_newest_with_p2pdma(tmp_path: Path) -> None:
    boot, modules = make_kernels(tmp_path)
    log = io.StringIO()
    k = vm.select_kernel(None, modules, boot, environ={}, log=log)
    assert k.image == modules / "7.3.4+deb13-amd64/vmlinuz"  # 7.10 is newer but lacks it
    assert log.getvalue() == ""


def test_select_kernel_falls_back_to_boot_and_says_so(tmp_path: Path) -> None:
    boot, modules = make_kernels(tmp_path, p2pdma=False)
    log = io.StringIO()
    k = vm.select_kernel(None, modules, boot, environ={}, log=log)
    assert k.image == boot / "vmlinuz-6.1.0-57-amd64"
    assert "CONFIG_PCI_P2PDMA" in log.getvalue() and str(k.image) in log.getvalue()
    with pytest.raises(VMError, match="linux-image-amd64"):
        vm.select_kernel(None, tmp_path / "none", tmp_path / "none", environ={})


@pytest.mark.parametrize("spec, want", [
    ("6.1", "boot/vmlinuz-6.1.0-57-amd64"),
    ("6.1.0-57-amd64", "boot/vmlinuz-6.1.0-57-amd64"),
    ("7", "modules/7.10.1+deb13-amd64/vmlinuz"),  # a spec is obeyed, P2PDMA or not
    ("7.2", "modules/7.2.11+deb13-amd64/vmlinuz"),
    ("7.3.4+deb13-amd64", "modules/7.3.4+deb13-amd64/vmlinuz"),
])
def test_select_kernel_by_release(tmp_path: Path, spec: str, want: str) -> None:
    boot, modules = make_kernels(tmp_path)
    assert vm.select_kernel(spec, modules, boot, environ={}).image == tmp_path / want


def test_select_kernel_prefix_ends_at_a_boundary(tmp_path: Path) -> None:
    boot, modules = make_kernels(tmp_path)
    for spec in ("6.10", "7.1", "7.3.4+deb", "7.11"):
        with pytest.raises(VMError, match="installed: 6.1.0-57-amd64, 7.2.11"):
            vm.select_kernel(spec, modules, boot, environ={})


def test_select_kernel_by_path_and_environment(tmp_path: Path) -> None:
    boot, modules = make_kernels(tmp_path)
    img = modules / "7.2.11+deb13-amd64/vmlinuz"
    k = vm.select_kernel(str(img), modules, boot, environ={})
    assert (k.image, k.release, k.p2pdma) == (img, "7.2.11+deb13-amd64", True)
    other = tmp_path / "my-bzImage"
    other.touch()
    assert vm.select_kernel(str(other), modules, boot, environ={}).config is None
    with pytest.raises(VMError, match="no such file"):
        vm.select_kernel(str(tmp_path / "nope/vmlinuz"), modules, boot, environ={})
    env = {vm.KERNEL_ENV: "6.1"}
    assert vm.select_kernel(None, modules, boot, environ=env).release == "6.1.0-57-amd64"
    assert vm.select_kernel("7.2", modules, boot, environ=env).release == "7.2.11+deb13-amd64"
    assert vm.select_kernel(None, modules, boot, environ={vm.KERNEL_ENV: ""}).p2pdma


def test_vm_kernel_path_or_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    boot, modules = make_kernels(tmp_path)
    real = vm.select_kernel
    monkeypatch.setattr(vm, "select_kernel",
                        lambda spec: real(spec, modules, boot, environ={}))
    assert vm.VM(kernel="7.2").boot_kernel().release == "7.2.11+deb13-amd64"
    assert vm.VM().boot_kernel().release == "7.3.4+deb13-amd64"
    assert vm.VM(kernel=Path("/k")).boot_kernel().image == Path("/k")  # a Path is taken as is
    assert values_of(vm.VM(kernel="6.1", cached_root=False).vng_args(tmp_path, "x"),
                     "--run") == [str(boot / "vmlinuz-6.1.0-57-amd64")]


def test_plain_vm_args_tcg_9p(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NVMET_P2P_VM_KVM", raising=False)
    args = vm.VM(kernel=Path("/k"), cached_root=False).vng_args(tmp_path, "bash /x/wrapper.sh")
    assert values_of(args, "--run") == ["/k"]
    assert "--disable-kvm" in args and "--force-9p" in args
    assert values_of(args, "--memory") == ["2G"] and values_of(args, "--cpus") == ["2"]
    assert f"--rwdir={tmp_path / 'rw'}" in args
    assert values_of(args, "--cwd") == [str(vm.REPO_ROOT)]
    assert args[-2:] == ["--exec", "bash /x/wrapper.sh"]
    assert not any(a.startswith("--qemu-opts") for a in args)
    assert values_of(args, "--append") == []


def test_kvm_only_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NVMET_P2P_VM_KVM", "1")
    assert "--disable-kvm" not in vm.VM(kernel=Path("/k")).vng_args(tmp_path, "x")
    assert "--disable-kvm" in vm.VM(kernel=Path("/k"), kvm=False).vng_args(tmp_path, "x")
    monkeypatch.setenv("NVMET_P2P_VM_KVM", "0")
    assert "--disable-kvm" in vm.VM(kernel=Path("/k")).vng_args(tmp_path, "x")


def test_cmb_nvme_device(tmp_path: Path) -> None:
    m = vm.VM(kernel=Path("/k"), nvme_cmb=True, nvme_size=2 << 30, cached_root=False)
    opts = qemu_opts_of(m.vng_args(tmp_path, "x"))
    img = tmp_path / "nvme-cmb.img"
    assert opts == ["-drive", f"file={img},if=none,id=nvm0,format=raw",
                    "-device", f"nvme,serial={vm.CMB_NVME_SERIAL},drive=nvm0,cmb_size_mb=64"]
    assert m.images(tmp_path) == {img: 2 << 30}


def test_iommu_first_and_on_cmdline(tmp_path: Path) -> None:
    m = vm.VM(kernel=Path("/k"), nvme_cmb=True, iommu=True, append=["foo=1"],
              qemu_opts=["-device", "bar"], cached_root=False)
    args = m.vng_args(tmp_path, "x")
    opts = qemu_opts_of(args)
    assert opts[:2] == ["-device", "intel-iommu,caching-mode=on"]
    assert opts[-2:] == ["-device", "bar"]
    assert values_of(args, "--append") == ["intel_iommu=on", "iommu=pt", "foo=1"]


def test_switch_topology(tmp_path: Path) -> None:
    m = vm.VM(kernel=Path("/k"), pcie_switch=True, cached_root=False)
    devices = values_of(m.device_opts(tmp_path), "-device")
    assert devices[0] == "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1"
    assert devices[1] == "x3130-upstream,id=swup0,bus=rp0"
    down = [d for d in devices if d.startswith("xio3130-downstream")]
    nvme = [d for d in devices if d.startswith("nvme,")]
    assert down == ["xio3130-downstream,id=swdn0,bus=swup0,chassis=2,slot=0",
                    "xio3130-downstream,id=swdn1,bus=swup0,chassis=2,slot=1"]
    assert "cmb_size_mb=64" in nvme[0] and nvme[0].endswith("bus=swdn0")
    assert "cmb_size_mb" not in nvme[1] and nvme[1].endswith("bus=swdn1")
    assert len(m.images(tmp_path)) == 2


def test_wrapper_sets_env_and_captures(tmp_path: Path) -> None:
    repo = Path("/tmp/some clone")
    text = vm.VM(repo=repo).wrapper_script(tmp_path)
    assert "export NVMET_P2P_IN_VM=1" in text
    assert f"export PATH='{repo}/.venv/bin':" in text
    assert f"cd '{repo}'" in text
    assert f">> {tmp_path / 'output.log'} 2>&1" in text
    assert str(tmp_path / "rc") in text


def test_cached_root(tmp_path: Path) -> None:
    m = vm.VM(kernel=Path("/k"), repo=Path("/r"))
    opts = qemu_opts_of(m.vng_args(tmp_path, "x"))
    assert opts[:4] == [
        "-fsdev", "local,id=nvmetp2proot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=nvmetp2proot,mount_tag=nvmetp2p_root"]
    text = m.wrapper_script(tmp_path / "rw")
    assert "cache=loose" in text and "nvmetp2p_root /run/nvmetp2p-root" in text
    binds = text[text.index("mount --bind"):text.index(" ||")]
    # the repo is bound over before the rw dir is put back on top of it
    assert binds.index("/run/nvmetp2p-root/r /r") < binds.index(f"/run/nvmetp2p-rw {tmp_path}/rw")
    assert "cache=loose" not in vm.VM(cached_root=False).wrapper_script(tmp_path)


def test_pytest_script_adds_tests_dir_only_without_paths() -> None:
    base = "python -m pytest -m vm -p no:cacheprovider"
    assert vm.pytest_script([]) == f"{base} tests\n"
    assert vm.pytest_script(["-k", "rxe", "-x"]) == f"{base} -k rxe -x tests\n"
    assert vm.pytest_script(["tests/test_vm_smoke.py"]) == f"{base} tests/test_vm_smoke.py\n"
    assert vm.pytest_script(["tests/x.py::test_a"]) == f"{base} tests/x.py::test_a\n"


def test_pytest_cli_split() -> None:
    opts, rest = vm._split_pytest_cli(["--allow-empty", "--vm-timeout=60", "-k", "x"])
    assert (opts.allow_empty, opts.vm_timeout, rest) == (True, 60.0, ["-k", "x"])
    opts, rest = vm._split_pytest_cli(["--vm-timeout", "7", "--", "--allow-empty"])
    assert (opts.allow_empty, opts.vm_timeout, rest) == (False, 7.0, ["--allow-empty"])
    opts, rest = vm._split_pytest_cli(["-x", "--allow-empty"])
    assert (opts.allow_empty, rest) == (False, ["-x", "--allow-empty"])


# -- run() against a fake vng -------------------------------------------------------------

FAKE_VNG = """\
#!{python}
import subprocess, sys, time
args = sys.argv[1:]
mode = {mode!r}
if mode == "noboot":
    print("kernel panic"); sys.exit(1)
if mode == "hang":
    time.sleep(300)
cmd = args[args.index("--exec") + 1]
subprocess.run(["bash", "-c", cmd])
"""


def fake_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str = "ok") -> vm.VM:
    fake = tmp_path / "bin" / "vng"
    fake.parent.mkdir()
    fake.write_text(FAKE_VNG.format(python=sys.executable, mode=mode))
    fake.chmod(0o755)
    monkeypatch.setattr(vm, "find_vng", lambda: fake)
    # cached_root=False: its mount commands would run on this host.
    return vm.VM(kernel=Path("/k"), scratch_parent=tmp_path / "scratch", cached_root=False)


def test_run_relays_output_and_exit_code(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    m = fake_vm(tmp_path, monkeypatch)
    stream = io.StringIO()
    res = m.run('echo "in=$NVMET_P2P_IN_VM"; echo err >&2; pwd; exit 7\n', timeout=60,
                stream=stream)
    assert res.returncode == 7 and not res.timed_out
    assert res.output == f"in=1\nerr\n{vm.REPO_ROOT}\n"
    assert stream.getvalue() == res.output
    assert res.boot_seconds is not None and res.boot_seconds <= res.total_seconds
    assert list((tmp_path / "scratch").iterdir()) == []  # scratch removed


def test_run_brings_out_files_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = fake_vm(tmp_path, monkeypatch)
    res = m.run('mkdir "$NVMET_P2P_VM_OUT/sub"; echo 42 > "$NVMET_P2P_VM_OUT/sub/r.json"\n',
                timeout=60, out_dir=tmp_path / "results")
    assert res.returncode == 0
    assert (tmp_path / "results/sub/r.json").read_text() == "42\n"


def test_run_creates_sparse_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = fake_vm(tmp_path, monkeypatch)
    m.nvme_cmb = True
    m.keep_scratch = True
    res = m.run('test -f "$NVMET_P2P_VM_RWDIR/../nvme-cmb.img"\n', timeout=60)
    assert res.returncode == 0
    [scratch] = (tmp_path / "scratch").iterdir()
    img = scratch / "nvme-cmb.img"
    assert img.stat().st_size == 1 << 30
    assert img.stat().st_blocks == 0  # sparse


def test_run_hard_timeout_kills_everything(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    m = fake_vm(tmp_path, monkeypatch)
    marker = tmp_path / "pid"
    t0 = time.monotonic()
    res = m.run(f"echo $$ > {marker}; echo started; sleep 300\n", timeout=3)
    assert time.monotonic() - t0 < 30
    assert res.timed_out and res.returncode == vm.TIMEOUT_EXIT
    assert res.output.startswith("started\n") and "hard timeout" in res.output
    pid = int(marker.read_text())
    # Killed orphans are reaped by init asynchronously; a zombie is dead enough.
    assert guest.wait_for(lambda: process_gone(pid), 10, f"pid {pid} to die")


def process_gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_run_hang_before_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = fake_vm(tmp_path, monkeypatch, mode="hang").run("echo hi\n", timeout=1)
    assert res.timed_out and res.boot_seconds is None


def test_run_boot_failure_raises_with_log(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(VMError, match="(?s)before starting.*kernel panic"):
        fake_vm(tmp_path, monkeypatch, mode="noboot").run("echo hi\n", timeout=30)


def test_cli_pytest_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    seen = []

    def fake_run(self: vm.VM, script: str, timeout: float, stream=None,
                 out_dir=None) -> vm.Result:
        seen.append((self.nvme_cmb, self.iommu and self.pcie_switch, script, timeout))
        return vm.Result(vm.PYTEST_NO_TESTS, "no tests ran\n")
    monkeypatch.setattr(vm.VM, "run", fake_run)
    assert vm.main(["pytest", "--vm-timeout=99", "-k", "nothing"]) == vm.PYTEST_NO_TESTS
    assert vm.main(["pytest", "--allow-empty"]) == 0
    assert vm.main(["run", "--", "true"]) == vm.PYTEST_NO_TESTS  # not pytest: passed through
    assert seen[0] == (True, True, "python -m pytest -m vm -p no:cacheprovider -k nothing tests\n",
                       99.0)
    assert seen[2][:3] == (False, False, "true\n")
    assert "collected no tests" in capsys.readouterr().err


def test_cli_kernel_option(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake_run(self: vm.VM, script: str, timeout: float, stream=None,
                 out_dir=None) -> vm.Result:
        seen.append((self.kernel, script))
        return vm.Result(0, "")
    monkeypatch.setattr(vm.VM, "run", fake_run)
    assert vm.main(["run", "--kernel", "6.1", "--", "true"]) == 0
    assert vm.main(["pytest", "--kernel=/x/vmlinuz", "-x"]) == 0
    assert vm.main(["pytest", "--allow-empty", "--kernel", "7", "--", "--kernel", "y"]) == 0
    assert vm.main(["run", "--", "true"]) == 0
    assert [k for k, _ in seen] == ["6.1", "/x/vmlinuz", "7", None]
    assert seen[1][1].endswith(" -x tests\n")
    assert " -- " not in seen[2][1] and "--kernel y tests" in seen[2][1]  # pytest's own


def test_run_prints_the_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    res = fake_vm(tmp_path, monkeypatch).run("true\n", timeout=60)
    assert res.returncode == 0
    assert capsys.readouterr().err.startswith("[vm] kernel k (/k, no config found)\n")


def test_cli_bad_kernel_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert vm.main(["run", "--kernel", "0.0.0-none", "--", "true"]) == 125
    assert "no installed kernel matches '0.0.0-none'" in capsys.readouterr().err


def test_cli_module_runs() -> None:
    cp = subprocess.run([sys.executable, "-m", "nvmet_p2p.testbed.vm", "run", "--help"],
                        check=False, capture_output=True, text=True, timeout=60,
                        cwd=vm.REPO_ROOT)
    assert cp.returncode == 0 and "--cmb" in cp.stdout and "--switch" in cp.stdout


# -- guest helpers on synthetic sysfs -------------------------------------------------------

def make_pci(sysfs: Path, bdf: str, vendor: str, device: str, bar2_size: int) -> None:
    d = sysfs / "bus/pci/devices" / bdf
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")
    zero = "0x0000000000000000 0x0000000000000000 0x0000000000000000"
    lines = [zero] * 7
    lines[0] = "0x00000000fea00000 0x00000000fea03fff 0x0000000000140204"
    if bar2_size:
        lines[2] = f"0x00000000f8000000 {0xf8000000 + bar2_size - 1:#018x} 0x000000000014220c"
    (d / "resource").write_text("\n".join(lines) + "\n")


def test_cmb_nvme_lookup(tmp_path: Path) -> None:
    make_pci(tmp_path, "0000:00:04.0", "0x1af4", "0x1003", 0)
    make_pci(tmp_path, "0000:00:0a.0", "0x1b36", "0x0010", 64 << 20)
    make_pci(tmp_path, "0000:00:0b.0", "0x1b36", "0x0010", 0)
    make_pci(tmp_path, "0000:03:00.0", "0x1b36", "0x0010", 64 << 20)
    assert guest.cmb_nvme_bdfs(tmp_path) == ["0000:00:0a.0", "0000:03:00.0"]
    assert guest.cmb_nvme_bdf(tmp_path) == "0000:00:0a.0"
    assert guest.pci_bar("0000:00:0a.0", 2, tmp_path)[:2] == (0xf8000000, 64 << 20)
    assert guest.pci_bar("0000:00:0b.0", 2, tmp_path)[1] == 0


def test_no_cmb_nvme(tmp_path: Path) -> None:
    make_pci(tmp_path, "0000:00:0b.0", "0x1b36", "0x0010", 0)
    with pytest.raises(VMError, match="--cmb"):
        guest.cmb_nvme_bdf(tmp_path)


@pytest.mark.parametrize("multipath", [True, False])
def test_namespace_block_device(tmp_path: Path, multipath: bool) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    dev.mkdir()
    nqn = "nqn.2014-08.org.example:a"
    for ctrl, subnqn in (("nvme0", "nqn.other"), ("nvme2", nqn)):
        c = sysfs / "class/nvme" / ctrl
        c.mkdir(parents=True)
        (c / "subsysnqn").write_text(subnqn + "\n")
    if multipath:
        parent = sysfs / "class/nvme-subsystem/nvme-subsys1"
        parent.mkdir(parents=True)
        (parent / "subsysnqn").write_text(nqn + "\n")
        (sysfs / "class/nvme/nvme2/nvme1c2n1").mkdir()  # hidden path disk
        disks = {"nvme1n1": "1", "nvme1n2": "2"}
    else:
        parent = sysfs / "class/nvme/nvme2"
        disks = {"nvme2n1": "1", "nvme2n2": "2"}
    for name, nsid in disks.items():
        (parent / name).mkdir()
        (parent / name / "nsid").write_text(nsid + "\n")
        (dev / name).touch()
    want = "nvme1n2" if multipath else "nvme2n2"
    assert guest.namespace_block_device(nqn, 2, timeout=1, sysfs=sysfs, dev=dev) == str(dev / want)
    assert guest.nvme_ctrls(nqn, sysfs) == ["nvme2"]
    with pytest.raises(VMError, match="timed out"):
        guest.namespace_block_device(nqn, 3, timeout=0.2, sysfs=sysfs, dev=dev)


def test_wait_for_deadline() -> None:
    t0 = time.monotonic()
    with pytest.raises(VMError, match="the thing"):
        guest.wait_for(lambda: None, 0.3, "the thing", interval=0.05)
    assert 0.3 <= time.monotonic() - t0 < 5
    assert guest.wait_for(lambda: [1], 1, "x") == [1]


def test_sh_reports_failure() -> None:
    with pytest.raises(VMError, match="exit 3: boom"):
        guest.sh("bash", "-c", "echo boom >&2; exit 3")
    with pytest.raises(VMError, match="not installed"):
        guest.sh("/nonexistent/tool")


def test_run_fio_parses_and_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = '{"jobs": [{"error": 0, "read": {"iops": 10.5, "bw_bytes": 100}},' \
          ' {"error": 0, "read": {"iops": 4.5, "bw_bytes": 50}}]}'
    fake = tmp_path / "fio"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        echo "note: something"
        echo '{doc}'
        """))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    res = guest.run_fio(["--name=x"])
    assert guest.fio_iops(res) == 15.0 and guest.fio_bw_bytes(res) == 150.0
    fake.write_text("#!/bin/bash\necho 'verify: bad magic' >&2\nexit 1\n")
    with pytest.raises(VMError, match="bad magic"):
        guest.run_fio(["--name=x"])


def test_in_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NVMET_P2P_IN_VM", "1")
    assert guest.in_vm()
    monkeypatch.delenv("NVMET_P2P_IN_VM")
    assert not guest.in_vm()


# -- kernel target configfs tree (plain directory standing in for configfs) ----------------

def test_kernel_target_tree(tmp_path: Path) -> None:
    nqn = "nqn.2014-08.org.example:kt"
    kt = KernelTarget(nqn, "/dev/shm/ns.img", trsvcid=4421, port_id=3, buffered_io=True,
                      allowed_hosts=["nqn.host1"], root=tmp_path)
    kt.setup()
    sub = tmp_path / "subsystems" / nqn
    assert (sub / "attr_allow_any_host").read_text() == "0"
    assert (sub / "allowed_hosts/nqn.host1").resolve() == tmp_path / "hosts/nqn.host1"
    ns = sub / "namespaces/1"
    assert [(ns / a).read_text() for a in ("device_path", "buffered_io", "enable")] == \
        ["/dev/shm/ns.img", "1", "1"]
    port = tmp_path / "ports/3"
    assert {a: (port / a).read_text() for a in
            ("addr_trtype", "addr_adrfam", "addr_traddr", "addr_trsvcid")} == \
        {"addr_trtype": "rdma", "addr_adrfam": "ipv4", "addr_traddr": "192.0.2.1",
         "addr_trsvcid": "4421"}
    assert (port / "subsystems" / nqn).resolve() == sub
    kt.setup()  # idempotent on an existing tree
    assert (port / "subsystems" / nqn).is_symlink()


def test_kernel_target_any_host_and_teardown_of_nothing(tmp_path: Path) -> None:
    kt = KernelTarget("nqn.x", "/dev/null", root=tmp_path)
    kt.teardown()  # nothing built yet: no error
    kt.setup()
    assert (tmp_path / "subsystems/nqn.x/attr_allow_any_host").read_text() == "1"
    assert not (tmp_path / "subsystems/nqn.x/namespaces/1/buffered_io").exists()
