"""The transport conformance suite, written once and run against every transport.

`check_transport(make_pair)` runs every check; `CHECKS` lists them so a test file can
parametrize over them.  `make_pair()` returns `(side, connect)`:

* `side` (`TargetSide`) is the target-side handle: the `Target`, the subsystem the
  suite may use (namespaces `nsids`, all of `block_size`, `ns_size` bytes), the port
  it is linked to, the fake clock if the target runs on one (keep-alive checks skip
  without it), `pump(seconds)` to let the target make progress, `call(fn)` to run a
  configuration change where the target runs, and `queues()` for the leak check.
* `connect(subnqn=None, *, hostnqn=None, nr_io_queues=1, queue_size=32, kato_ms=0)`
  returns a connected, enabled `Host` (discovery: `nr_io_queues=0`).

Each check disconnects its hosts and then asserts the target holds no controller and
the transport no queue, so a leak shows up in the check that caused it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import pytest

from nvmet_p2p.core.clock import FakeClock
from nvmet_p2p.core.target import Target
from nvmet_p2p.host.base import Host, NvmeError
from nvmet_p2p.wire import log as lg
from nvmet_p2p.wire.command import AdminOpcode, IoOpcode, Sqe
from nvmet_p2p.wire.limits import NVME_DISC_SUBSYS_NAME

SETTLE_TIMEOUT = 5.0  # the longest a transport may take to tear a queue down
QUIET_TIMEOUT = 0.3  # default watch for "no completion arrives" (a network round trip)
AER_NS_CHANGED = 0x02 | 0x00 << 8 | 0x04 << 16  # notice, NS attribute changed, log 04h
AER_DISC_CHANGED = 0x02 | 0xF0 << 8 | 0x70 << 16  # notice, discovery changed, log 70h
SUBTYPE_CURRENT_DISC, SUBTYPE_NVME = 3, 2


@dataclass
class TargetSide:
    target: Target
    subnqn: str
    nsids: list[int]
    portid: int
    trtype: int  # discovery log trtype of the port (lg.Trtype)
    block_size: int = 512
    ns_size: int = 16 << 20
    clock: FakeClock | None = None
    quiet: float = QUIET_TIMEOUT  # how long "no completion arrives" is watched for
    pump: Callable[[float], None] = lambda seconds: None
    call: Callable[[Callable[[], Any]], Any] = field(default=lambda fn: fn())
    queues: Callable[[], int] = lambda: 0


class Connect(Protocol):
    def __call__(self, subnqn: str | None = None, *, hostnqn: str | None = None,
                 nr_io_queues: int = 1, queue_size: int = 32, kato_ms: int = 0) -> Host: ...


MakePair = Callable[[], tuple[TargetSide, Connect]]


# -- helpers ------------------------------------------------------------------------

def wait_for(cond: Callable[[], bool], side: TargetSide, what: str,
             timeout: float = SETTLE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        side.pump(0.01)


def ctrls_of(side: TargetSide, nqn: str) -> dict[int, Any]:
    subsys = side.target.get_subsys(nqn)
    return dict(subsys.ctrls) if subsys is not None else {}


def settle(side: TargetSide, hosts: list[Host]) -> None:
    """Disconnect `hosts`; the target must drop every controller and queue."""
    for h in hosts:
        h.disconnect()
    wait_for(lambda: not side.target.controllers() and side.queues() == 0, side,
             "controllers and queues to go away after disconnect")


def verify_io(side: TargetSide, host: Host, nsid: int | None = None, slba: int = 0) -> None:
    """One verified write and read: the association still moves data correctly."""
    nsid = nsid or side.nsids[0]
    data = random.randbytes(4 * side.block_size)
    host.write(nsid, slba, data, block_size=side.block_size)
    assert host.read(nsid, slba, 4, block_size=side.block_size) == data


def assert_dead(side: TargetSide, host: Host) -> None:
    """Commands on `host` no longer complete normally: its queues were torn down."""
    try:
        cqe, _ = host.admin.execute(Sqe(opcode=AdminOpcode.KEEP_ALIVE), timeout=side.quiet)
    except (ConnectionError, TimeoutError, OSError):
        return
    raise AssertionError(f"keep-alive completed on a torn-down controller: {cqe}")


def add_memory_ns(side: TargetSide, nsid: int, size: int = 1 << 20) -> None:
    def change() -> None:
        ns = side.target.root.subsystems[side.subnqn].create_namespace(nsid)
        ns.device_backend = "memory"
        ns.device_path = f"aer-{nsid}"
        ns.device_size = size
        ns.device_block_size = side.block_size
        ns.enable = True
    side.call(change)


def remove_ns(side: TargetSide, nsid: int) -> None:
    def change() -> None:
        subsys = side.target.root.subsystems[side.subnqn]
        subsys.namespaces[nsid].enable = False
        subsys.delete_namespace(nsid)
    side.call(change)


# -- the checks ---------------------------------------------------------------------

def check_connect_disconnect(make_pair: MakePair) -> None:
    side, connect = make_pair()
    host = connect()
    assert host.cntlid in ctrls_of(side, side.subnqn)
    ident = host.identify_ctrl()
    assert ident.cntlid == host.cntlid
    assert ident.subnqn == side.subnqn
    assert host.active_ns() == sorted(side.nsids)
    verify_io(side, host)
    old = host.cntlid
    settle(side, [host])
    assert old not in ctrls_of(side, side.subnqn)
    again = connect(nr_io_queues=2)  # the same subsystem takes a new association
    for qid in again.io:
        again.write(side.nsids[0], 100 + qid, bytes([qid]) * side.block_size,
                    block_size=side.block_size, qid=qid)
    for qid in again.io:
        assert again.read(side.nsids[0], 100 + qid, 1, block_size=side.block_size,
                          qid=qid) == bytes([qid]) * side.block_size
    settle(side, [again])


def check_many_hosts_and_ctrls(make_pair: MakePair) -> None:
    side, connect = make_pair()
    shared = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-0000000000aa"
    hosts = [connect(nr_io_queues=2) for _ in range(3)]
    hosts += [connect(hostnqn=shared, nr_io_queues=1) for _ in range(2)]  # one host, 2 ctrls
    cntlids = [h.cntlid for h in hosts]
    assert len(set(cntlids)) == len(hosts), f"cntlids not unique: {cntlids}"
    assert set(cntlids) <= set(ctrls_of(side, side.subnqn))
    bs, nsid = side.block_size, side.nsids[0]
    # every queue of every controller writes its own block; everyone reads everything
    expected = {}
    for i, h in enumerate(hosts):
        for qid in h.io:
            slba = 16 * i + qid
            expected[slba] = random.randbytes(bs)
            h.write(nsid, slba, expected[slba], block_size=bs, qid=qid)
    for h in hosts:
        for slba, data in expected.items():
            assert h.read(nsid, slba, 1, block_size=bs) == data
    # dropping one controller leaves the others alone
    gone = hosts.pop(0)
    gone.disconnect()
    wait_for(lambda: gone.cntlid not in ctrls_of(side, side.subnqn), side, "ctrl removal")
    for h in hosts:
        verify_io(side, h, slba=200)
    settle(side, hosts)


def _rw_batch(side: TargetSide, host: Host, shadow: bytearray, rng: random.Random,
              max_blocks: int, inline_max: int, count: int) -> None:
    """`count` writes submitted back to back (several in flight), then read back."""
    bs, nsid = side.block_size, side.nsids[0]
    nblocks = side.ns_size // bs
    q = host.io[min(host.io)]
    pending = []
    extents: list[tuple[int, int]] = []
    for _ in range(count):
        inline = inline_max >= bs and rng.random() < 0.3
        limit = inline_max // bs if inline else max_blocks
        nlb = min(limit, rng.choice([1, 2, limit, rng.randint(1, limit)]))
        slba = rng.randrange(0, nblocks - nlb + 1)
        if any(s < slba + nlb and slba < s + n for s, n in extents):
            continue  # overlapping writes in flight together have no defined order
        extents.append((slba, nlb))
        data = rng.randbytes(nlb * bs)
        shadow[slba * bs:(slba + nlb) * bs] = data
        sqe = Sqe(opcode=IoOpcode.WRITE, nsid=nsid, cdw10=slba & 0xFFFFFFFF,
                  cdw11=slba >> 32, cdw12=nlb - 1)
        pending.append(q.submit(sqe, data=data, inline=inline))
    for p in pending:
        cqe, _ = q.wait(p)
        assert cqe.status == 0, f"write failed: {cqe}"
    for slba, nlb in extents:
        got = host.read(nsid, slba, nlb, block_size=bs)
        assert got == bytes(shadow[slba * bs:(slba + nlb) * bs]), f"data differs at {slba}+{nlb}"


def check_data_integrity(make_pair: MakePair) -> None:
    side, connect = make_pair()
    host = connect(nr_io_queues=2)
    ident = host.identify_ctrl()
    max_blocks = (4096 << ident.mdts) // side.block_size if ident.mdts else 2048
    inline_max = ident.ioccsz * 16 - 64
    rng = random.Random(0x5EED)
    bs, nsid = side.block_size, side.nsids[0]
    shadow = bytearray(side.ns_size)
    # start from a known state: the whole namespace zeroed (NLB is 16 bits)
    for slba in range(0, side.ns_size // bs, 0x10000):
        host.write_zeroes(nsid, slba, min(side.ns_size // bs - slba, 0x10000))
    for _ in range(4):
        _rw_batch(side, host, shadow, rng, max_blocks, inline_max, count=8)
    # the largest transfer MDTS allows, both ways, on the second queue
    big = rng.randbytes(max_blocks * bs)
    host.write(nsid, 0, big, block_size=bs, qid=2)
    shadow[:len(big)] = big
    assert host.read(nsid, 0, max_blocks, block_size=bs, qid=2) == big
    # one block past MDTS is refused with Data SGL Length Invalid, no data moved
    if ident.mdts:
        sqe = Sqe(opcode=IoOpcode.READ, nsid=nsid, cdw12=max_blocks)  # max_blocks + 1 LBAs
        cqe, _ = host.io[1].execute(sqe, read_len=(max_blocks + 1) * bs)
        assert cqe.status == 0x400F, f"over-MDTS read: {cqe}"
    # in-capsule data at the largest size the controller advertises
    if inline_max >= bs:
        data = rng.randbytes(inline_max // bs * bs)
        host.write(nsid, 4000, data, block_size=bs, inline=True)
        assert host.read(nsid, 4000, len(data) // bs, block_size=bs) == data
        shadow[4000 * bs:4000 * bs + len(data)] = data
    # everything touched, read back in MDTS-sized pieces from queue 1
    for slba in range(0, min(side.ns_size // bs, 4 * max_blocks), max_blocks):
        n = min(max_blocks, side.ns_size // bs - slba)
        assert host.read(nsid, slba, n, block_size=bs) == bytes(
            shadow[slba * bs:(slba + n) * bs]), f"mismatch in blocks {slba}+{n}"
    settle(side, [host])


def check_flush_zeroes_deallocate(make_pair: MakePair) -> None:
    side, connect = make_pair()
    host = connect()
    bs, nsid = side.block_size, side.nsids[0]
    data = random.randbytes(64 * bs)
    host.write(nsid, 1000, data, block_size=bs, fua=True)
    host.flush(nsid)
    host.write_zeroes(nsid, 1010, 5)
    want = bytearray(data)
    want[10 * bs:15 * bs] = bytes(5 * bs)
    assert host.read(nsid, 1000, 64, block_size=bs) == want
    # Identify NS DLFEAT says deallocated blocks read as zeroes
    assert host.identify_ns(nsid).dlfeat & 0x7 == 1
    host.deallocate(nsid, [(1020, 4), (1040, 8), (1060, 0)])
    want[20 * bs:24 * bs] = bytes(4 * bs)
    want[40 * bs:48 * bs] = bytes(8 * bs)
    assert host.read(nsid, 1000, 64, block_size=bs) == want
    host.flush(nsid)
    assert host.read(nsid, 1000, 64, block_size=bs) == want
    settle(side, [host])


def check_keep_alive(make_pair: MakePair) -> None:
    side, connect = make_pair()
    clock = side.clock
    if clock is None:
        pytest.skip("this transport pair has no fake clock: keep-alive expiry is not driven")
    host = connect(kato_ms=5000, nr_io_queues=2)
    other = connect(kato_ms=0)  # no keep-alive: never expires
    assert host.get_features(0x0F) == 5000
    cntlid = host.cntlid

    def tick(seconds: float) -> None:
        clock.advance(seconds)
        side.call(side.target.tick)
        side.pump(0)

    tick(4)
    host.keep_alive()  # resets the timer
    tick(4)
    verify_io(side, host)  # traffic-based: I/O resets it too
    tick(4)
    assert cntlid in ctrls_of(side, side.subnqn), "expired although the host kept it alive"
    tick(6)
    wait_for(lambda: cntlid not in ctrls_of(side, side.subnqn), side, "keep-alive teardown")
    assert_dead(side, host)
    for q in host.io.values():
        try:
            q.execute(Sqe(opcode=IoOpcode.FLUSH, nsid=side.nsids[0]), timeout=side.quiet)
        except (ConnectionError, TimeoutError, OSError):
            continue
        raise AssertionError(f"I/O queue {q.qid} of an expired controller still works")
    host.disconnect()  # closing queues the target already dropped must be harmless
    verify_io(side, other)  # the host without KATO is unaffected
    fresh = connect(kato_ms=5000)
    verify_io(side, fresh)
    settle(side, [other, fresh])


def check_aer_ns_changed(make_pair: MakePair) -> None:
    side, connect = make_pair()
    host = connect()
    new1, new2, new3 = (max(side.nsids) + i for i in (1, 2, 3))
    aer = host.submit_aer()
    add_memory_ns(side, new1)
    cqe, _ = host.admin.wait(aer)
    assert (cqe.status, cqe.result & 0xFFFFFFFF) == (0, AER_NS_CHANGED), cqe
    assert new1 in host.active_ns()
    # masked until log 04h is read: the next change does not complete an AER
    aer = host.submit_aer()
    add_memory_ns(side, new2)
    try:
        cqe, _ = host.admin.wait(aer, timeout=side.quiet)
        raise AssertionError(f"AER completed while the event was masked: {cqe}")
    except TimeoutError:
        pass
    changed = lg.decode_changed_ns_list(host.get_log_page(lg.LogId.CHANGED_NS, 4096))
    assert changed == [new1, new2]
    assert lg.decode_changed_ns_list(host.get_log_page(lg.LogId.CHANGED_NS, 4096)) == []
    remove_ns(side, new1)  # unmasked again: removal is a change too
    cqe, _ = host.admin.wait(aer)
    assert (cqe.status, cqe.result & 0xFFFFFFFF) == (0, AER_NS_CHANGED), cqe
    # RAE: reading with "retain asynchronous event" keeps the event masked
    assert lg.decode_changed_ns_list(
        host.get_log_page(lg.LogId.CHANGED_NS, 4096, rae=True)) == [new1]
    aer = host.submit_aer()
    add_memory_ns(side, new3)
    try:
        cqe, _ = host.admin.wait(aer, timeout=side.quiet)
        raise AssertionError(f"AER completed although the log was read with RAE: {cqe}")
    except TimeoutError:
        pass
    assert lg.decode_changed_ns_list(
        host.get_log_page(lg.LogId.CHANGED_NS, 4096)) == [new1, new3]
    assert sorted(host.active_ns()) == sorted(side.nsids + [new2, new3])
    verify_io(side, host, nsid=new3)
    remove_ns(side, new2)
    cqe, _ = host.admin.wait(aer)
    assert cqe.result & 0xFFFFFFFF == AER_NS_CHANGED
    remove_ns(side, new3)
    # at most 4 AERs outstanding (AERL = 3): the fifth fails with Asynchronous Event
    # Request Limit Exceeded; the four held complete (aborted) when the queue goes
    held = [host.submit_aer() for _ in range(4)]
    fifth = host.submit_aer()
    cqe, _ = host.admin.wait(fifth)
    assert cqe.status == 0x4105, cqe
    assert all(p.cid not in host.admin.done for p in held)
    settle(side, [host])


def check_discovery(make_pair: MakePair) -> None:
    side, connect = make_pair()
    hostnqn = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-0000000000d1"
    disc = connect(NVME_DISC_SUBSYS_NAME, hostnqn=hostnqn, nr_io_queues=0)
    assert disc.identify_ctrl().cntrltype == 2  # discovery controller
    assert disc.get_features(0x0F) == 120_000  # KATO 0 at Connect means 120 s
    hdr = disc.get_log_page(lg.LogId.DISC, lg.DISC_HDR_SIZE)
    genctr, numrec, recfmt = lg.decode_disc_log_header(hdr)
    assert recfmt == 0
    entries = disc.discover()
    assert len(entries) == numrec
    assert entries[0].subtype == SUBTYPE_CURRENT_DISC and entries[0].subnqn == NVME_DISC_SUBSYS_NAME
    mine = [e for e in entries if e.subnqn == side.subnqn]
    assert len(mine) == 1
    e = mine[0]
    assert (e.subtype, e.portid, e.cntlid, e.asqsz, e.trtype) == (
        SUBTYPE_NVME, side.portid, 0xFFFF, 32, side.trtype)
    # a restricted subsystem appears only for the host allowed to use it
    other_host = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-0000000000d2"
    secret = side.subnqn + "-restricted"
    aer = disc.submit_aer()

    def add_restricted() -> None:
        root = side.target.root
        root.create_host(other_host)
        sub = root.create_subsystem(secret)
        sub.add_allowed_host(other_host)
        root.ports[side.portid].link_subsystem(secret)
    side.call(add_restricted)
    cqe, _ = disc.admin.wait(aer)
    assert (cqe.status, cqe.result & 0xFFFFFFFF) == (0, AER_DISC_CHANGED), cqe
    genctr2, _, _ = lg.decode_disc_log_header(disc.get_log_page(lg.LogId.DISC, 1024))
    assert genctr2 > genctr
    assert secret not in [x.subnqn for x in disc.discover()]
    allowed = connect(NVME_DISC_SUBSYS_NAME, hostnqn=other_host, nr_io_queues=0)
    assert secret in [x.subnqn for x in allowed.discover()]
    # the discovery log honours offset and length: the second entry alone
    page = disc.get_log_page(lg.LogId.DISC, lg.DISC_ENTRY_SIZE,
                             lpo=lg.DISC_HDR_SIZE + lg.DISC_ENTRY_SIZE)
    full = disc.get_log_page(lg.LogId.DISC, lg.DISC_HDR_SIZE + 2 * lg.DISC_ENTRY_SIZE)
    assert page == full[lg.DISC_HDR_SIZE + lg.DISC_ENTRY_SIZE:]
    # a discovery controller refuses I/O-controller commands
    cqe, _ = disc.admin_cmd(AdminOpcode.IDENTIFY, cdw10=0x02, read_len=4096, check=False)
    assert cqe.status == 0x4002, cqe
    try:
        disc.get_log_page(lg.LogId.SMART, 512)
        raise AssertionError("SMART log read on a discovery controller")
    except NvmeError as err:
        assert err.status == 0x4002

    def drop_restricted() -> None:
        root = side.target.root
        root.ports[side.portid].unlink_subsystem(secret)
        root.delete_subsystem(secret)
        root.delete_host(other_host)
    settle(side, [disc, allowed])
    side.call(drop_restricted)


CHECKS: list[Callable[[MakePair], None]] = [
    check_connect_disconnect,
    check_many_hosts_and_ctrls,
    check_data_integrity,
    check_flush_zeroes_deallocate,
    check_keep_alive,
    check_aer_ns_changed,
    check_discovery,
]


def check_transport(make_pair: MakePair) -> None:
    """Every check, each on a fresh pair from `make_pair`."""
    for check in CHECKS:
        check(make_pair)
