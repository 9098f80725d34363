"""libnvme_host on this machine (no NVMe here): host IDs, the connect options, and the
bindings' topology scan; the connects themselves are in tests/system/test_libnvme_host_vm.py."""

from __future__ import annotations

import uuid

import pytest

from nvmet_p2p.testbed import libnvme_host
from nvmet_p2p.testbed.libnvme_host import fabrics_config, hostid_of


def test_a_uuid_nqn_gives_its_uuid() -> None:
    nqn = "nqn.2014-08.org.nvmexpress:uuid:77777777-6666-5555-4444-333333333333"
    assert hostid_of(nqn) == "77777777-6666-5555-4444-333333333333"
    assert hostid_of(nqn.upper().replace("NQN.2014-08.ORG.NVMEXPRESS:UUID:",
                                         libnvme_host.UUID_NQN_PREFIX)) == hostid_of(nqn)


@pytest.mark.parametrize("nqn", ["nqn.2026-11.io.example:host-a",
                                 "nqn.2014-08.org.nvmexpress:uuid:not-a-uuid"])
def test_other_nqns_get_a_stable_id_of_their_own(nqn: str) -> None:
    hostid = hostid_of(nqn)
    assert uuid.UUID(hostid) and hostid == hostid_of(nqn)  # the same NQN, the same ID
    assert hostid != hostid_of(nqn + "-b")  # two NQNs never share one (the kernel refuses)


def test_the_default_host_is_nvme_clis(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hostnqn").write_text("nqn.2014-08.org.nvmexpress:uuid:"
                                      "8bf4aeda-c73f-46dc-9599-c4dbd62a66e8\n")
    (tmp_path / "hostid").write_text("e395aaf1-ecd7-467a-a28e-465e9f5cbbb1\n")
    monkeypatch.setattr(libnvme_host, "HOSTNQN_FILE", tmp_path / "hostnqn")
    monkeypatch.setattr(libnvme_host, "HOSTID_FILE", tmp_path / "hostid")
    assert libnvme_host.default_host() == (
        "nqn.2014-08.org.nvmexpress:uuid:8bf4aeda-c73f-46dc-9599-c4dbd62a66e8",
        "e395aaf1-ecd7-467a-a28e-465e9f5cbbb1")
    (tmp_path / "hostid").unlink()
    assert libnvme_host.default_host()[1] == "8bf4aeda-c73f-46dc-9599-c4dbd62a66e8"
    (tmp_path / "hostnqn").unlink()
    nqn, hostid = libnvme_host.default_host()
    assert nqn.startswith(libnvme_host.UUID_NQN_PREFIX) and hostid == hostid_of(nqn)


def test_fabrics_config_is_nvme_clis_options() -> None:
    assert fabrics_config() == {}  # the kernel's defaults
    assert fabrics_config(nr_io_queues=1, queue_size=32, ctrl_loss_tmo=5, digests=True,
                          disable_sqflow=True) == {
        "nr_io_queues": 1, "queue_size": 32, "ctrl_loss_tmo": 5, "hdr_digest": True,
        "data_digest": True, "disable_sqflow": True}


needs_libnvme = pytest.mark.skipif(libnvme_host.nvme is None,
                                   reason=libnvme_host.IMPORT_ERROR or "-")


@needs_libnvme
def test_the_venv_sees_debians_bindings() -> None:
    assert libnvme_host.nvme.__file__.startswith("/usr/lib/python3/dist-packages/")


@needs_libnvme
def test_no_nvme_here_means_no_controllers_and_no_namespaces() -> None:
    assert libnvme_host.controllers("nqn.2026-11.io.nvmet-p2p:none") == []
    assert libnvme_host.namespaces("nqn.2026-11.io.nvmet-p2p:none") == {}
    assert libnvme_host.disconnect("nqn.2026-11.io.nvmet-p2p:none") == 0


@needs_libnvme
def test_a_connect_without_the_fabrics_device_is_a_clear_error() -> None:
    try:
        open("/dev/nvme-fabrics").close()
    except OSError:
        pass
    else:
        pytest.skip("this machine has /dev/nvme-fabrics: a connect would be real")
    with pytest.raises(libnvme_host.VMError, match="libnvme connect nqn.x at rdma "
                                                   "192.0.2.1:4420: .*nvme-fabrics"):
        libnvme_host.connect("nqn.x", "192.0.2.1", 4420, hostnqn="nqn.2026-11.io.example:h")
