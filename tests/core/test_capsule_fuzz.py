"""A bounded-time fuzz pass over capsules and the wire decoders (issue #11).

Seeded random capsules (whole random bytes, and mutations of well-formed commands) go
to one host's admin and I/O queues over the loop transport; another host does verified
I/O throughout.  The pass runs for FUZZ_SECONDS or FUZZ_CAPSULES, whichever ends first,
and asserts: no traceback or error logged by the target, at most one completion per
capsule and only for its CID, the target keeps serving the other host, nothing leaks.
The wire decoders get random bytes of every length and may only return or raise
ValueError.
"""

from __future__ import annotations

import logging
import random
import time

import pytest

from nvmet_p2p.host.loop import LoopHost
from nvmet_p2p.transports import rdma_cm
from nvmet_p2p.wire import identify as idf
from nvmet_p2p.wire import log as lg
from nvmet_p2p.wire.command import (
    SQE_SIZE,
    AdminOpcode,
    ConnectData,
    Cqe,
    FabricsType,
    IoOpcode,
    Sgl,
    Sqe,
    fabrics_sqe,
)
from nvmet_p2p.wire.regs import REG_CC
from tests.support.loop_env import LoopEnv

FUZZ_SECONDS = 4.0
FUZZ_CAPSULES = 4000
SEED = 0x11_2026


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _seeds(rng: random.Random, key: int) -> list[bytes]:
    """Well-formed capsules to mutate: the commands a host really sends (keyed to a
    buffer of 8 KiB the host registered as `key`)."""
    keyed = Sgl(0x40, 0, 512, key).encode()
    cmds = [
        Sqe(opcode=AdminOpcode.IDENTIFY, flags=0x40, cdw10=1,
            dptr=Sgl(0x40, 0, 4096, key).encode()),
        Sqe(opcode=AdminOpcode.GET_LOG_PAGE, flags=0x40, cdw10=0x02 | 127 << 16, dptr=keyed),
        Sqe(opcode=AdminOpcode.GET_FEATURES, flags=0x40, cdw10=0x81, cdw11=1,
            dptr=Sgl(0x40, 0, 16, key).encode()),
        Sqe(opcode=AdminOpcode.SET_FEATURES, flags=0x40, cdw10=0x07, cdw11=0x00030003),
        Sqe(opcode=AdminOpcode.KEEP_ALIVE, flags=0x40),
        Sqe(opcode=IoOpcode.READ, flags=0x40, nsid=1, dptr=keyed),
        Sqe(opcode=IoOpcode.WRITE, flags=0x40, nsid=1, dptr=Sgl(0x01, 0, 512).encode()),
        Sqe(opcode=IoOpcode.DSM, flags=0x40, nsid=1, cdw11=4, dptr=Sgl(0x01, 0, 16).encode()),
        fabrics_sqe(FabricsType.PROPERTY_GET, attrib=1, offset=0),
        fabrics_sqe(FabricsType.PROPERTY_SET, attrib=0, offset=REG_CC, value=0x460001),
    ]
    out = [c.encode() + rng.randbytes(rng.choice([0, 16, 512])) for c in cmds]
    out.append(fabrics_sqe(FabricsType.CONNECT, qid=0, sqsize=31).encode()
               + ConnectData(subnqn="nqn.x", hostnqn="nqn.y").encode())
    return out


def _capsule(rng: random.Random, seeds: list[bytes], cid: int) -> bytes:
    kind = rng.random()
    if kind < 0.2:
        raw = bytearray(rng.randbytes(rng.choice([SQE_SIZE, SQE_SIZE + 16,
                                                  rng.randrange(SQE_SIZE, 5000)])))
    else:
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 6)):  # flip bytes, often in the command dwords
            i = rng.randrange(len(raw)) if rng.random() < 0.3 else rng.randrange(SQE_SIZE)
            raw[i] = rng.randrange(256)
        if rng.random() < 0.1:
            raw = raw[:rng.randrange(SQE_SIZE, len(raw) + 1)]
    raw[2:4] = cid.to_bytes(2, "little")
    return bytes(raw)


def _verify(h: LoopHost, slba: int) -> None:
    data = random.randbytes(1024)
    h.write(1, slba, data)
    assert h.read(1, slba, 2) == data


@pytest.mark.timeout(120)
def test_capsule_fuzz_keeps_the_target_serving(env: LoopEnv) -> None:
    rng = random.Random(SEED)
    env.port(inline_data_size=4096)
    env.add_subsystem()
    errors = _Errors()
    logging.getLogger("nvmet_p2p").addHandler(errors)
    try:
        other = env.connect()
        fuzzed = env.connect()
        key = fuzzed.mem.register(bytearray(8192))
        seeds = _seeds(rng, key)
        sent = ok = 0
        deadline = time.monotonic() + FUZZ_SECONDS
        while sent < FUZZ_CAPSULES and time.monotonic() < deadline:
            if fuzzed.admin is None or not fuzzed.admin.connected or not fuzzed.io[1].connected:
                fuzzed.disconnect()  # the fuzz tore its association down: start a new one
                fuzzed = env.connect()
                key = fuzzed.mem.register(bytearray(8192))
                seeds = _seeds(rng, key)
            q = fuzzed.io[1] if rng.random() < 0.5 else fuzzed.admin
            seen: list[Cqe] = []
            orig = q.conn.on_cqe
            q.conn.on_cqe = lambda raw, seen=seen: seen.append(Cqe.decode(raw))
            cid = 0x8000 | sent & 0x7FFF
            q.conn.submit(_capsule(rng, seeds, cid))  # must not raise
            env.pump()
            q.conn.on_cqe = orig
            assert len(seen) <= 1 and all(c.cid == cid for c in seen), seen
            ok += bool(seen and seen[0].status == 0)
            sent += 1
            if sent % 200 == 0:
                _verify(other, slba=sent % 1000)
        assert sent >= 500, f"only {sent} capsules in {FUZZ_SECONDS}s"
        assert ok >= sent // 20, f"only {ok} of {sent} commands succeeded: the fuzz is too blunt"
        _verify(other, slba=7)
        fuzzed.disconnect()
        assert not errors.records, [r.getMessage() for r in errors.records[:5]]
    finally:
        logging.getLogger("nvmet_p2p").removeHandler(errors)


DECODERS = [
    Sqe.decode, Cqe.decode, Sgl.decode, ConnectData.decode, idf.IdCtrl.decode,
    idf.IdNs.decode, idf.decode_ns_list, idf.decode_ns_desc_list, lg.SupportedLogPages.decode,
    lg.ErrorLogEntry.decode, lg.decode_error_log, lg.SmartLog.decode, lg.FwSlotLog.decode,
    lg.decode_changed_ns_list, lg.CmdEffectsLog.decode, lg.decode_ana_log, lg.DiscEntry.decode,
    lg.decode_disc_log_header, lg.decode_disc_log, rdma_cm.parse_cm_request,
    rdma_cm.decode_cm_accept, rdma_cm.decode_cm_reject,
]


@pytest.mark.parametrize("decode", DECODERS, ids=lambda f: f.__qualname__)
def test_wire_decoders_return_or_raise_value_error(decode) -> None:
    rng = random.Random(SEED)
    deadline = time.monotonic() + 0.5
    lengths = [0, 1, 3, 4, 15, 16, 31, 32, 63, 64, 511, 512, 1023, 1024, 4095, 4096, 8192]
    n = 0
    while n < len(lengths) or (n < 300 and time.monotonic() < deadline):
        size = lengths[n] if n < len(lengths) else rng.randrange(0, 9000)
        data = rng.randbytes(size) if rng.random() < 0.8 else bytes(size)
        try:
            decode(data)
        except ValueError:
            pass
        n += 1
