"""A bounded fuzz pass over the control socket and configuration files (issue #11).

Every example asserts: no traceback (never -32603, never an exception out of the
server or the restore), no hang (each request has a deadline), state unchanged on
error (the tree's JSON is the same as before), and the target keeps serving (a plain
request still answers, the loop host still reads).  The examples are bounded
(max_examples), so the pass takes seconds.
"""

from __future__ import annotations

import asyncio
import copy
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvmet_p2p.control.rpc import INTERNAL_ERROR, METHODS, RpcServer
from nvmet_p2p.errors import ConfigError
from tests.support.loop_env import SUBNQN, LoopEnv

FIXTURE = Path(__file__).parents[1] / "fixtures" / "nvmetcli" / "loop.json"
DEADLINE_S = 5.0
PATHS = ["/", "/hosts", "/subsystems", f"/subsystems/{SUBNQN}",
         f"/subsystems/{SUBNQN}/namespaces", f"/subsystems/{SUBNQN}/namespaces/1",
         f"/subsystems/{SUBNQN}/allowed_hosts", "/ports", "/ports/1", "/ports/1/subsystems",
         f"/ports/1/subsystems/{SUBNQN}", "/ports/1/referrals", "/ports/1/referrals/r",
         "/nope", "", "//", "/subsystems/\udc80"]
NAMES = ["allow_any_host", "trtype", "adrfam", "traddr", "size", "path", "backend",
         "enable", "serial", "model", "cntlid_min", "qid_max", "inline_data_size", "x"]
GROUPS = ["", "attr", "addr", "param", "device", "ana", "nope"]

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
           | st.text(max_size=12) | st.sampled_from(PATHS + NAMES + [SUBNQN, "1", "1M", "loop",
                                                                     "memory", "\u00b2"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(GROUPS + NAMES), inner, max_size=3),
                      max_leaves=8)
attrs = st.dictionaries(st.sampled_from(GROUPS),
                        st.dictionaries(st.sampled_from(NAMES), values, max_size=3),
                        max_size=3)
params = st.fixed_dictionaries({}, optional={
    "path": st.sampled_from(PATHS) | values, "name": st.sampled_from(NAMES) | values,
    "group": st.sampled_from(GROUPS) | values, "value": values, "attrs": attrs | values,
    "port": st.sampled_from([1, "1", "/ports/1", 2]) | values, "subsystem": st.just(SUBNQN),
    "host": values, "replace": st.booleans(), "doc": values})
requests = st.fixed_dictionaries({
    "jsonrpc": st.just("2.0") | values, "id": st.integers(0, 9) | values,
    "method": st.sampled_from([m for m in METHODS if m != "save_config"]) | values,
    "params": params | values})


def _serve(env: LoopEnv) -> RpcServer:
    return RpcServer(SimpleNamespace(target=env.target, p2p=env.p2p, config_path=None),
                     str(Path(tempfile.mkdtemp()) / "unused.sock"))


def _handle(env: LoopEnv, server: RpcServer, line: bytes) -> Any:
    return env.loop.run_until_complete(asyncio.wait_for(server.handle(line), DEADLINE_S))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(req=requests | values, garbage=st.binary(max_size=40))
def test_fuzz_rpc(tmp_path_factory: Any, req: Any, garbage: bytes) -> None:
    env = LoopEnv(tmp_path_factory.mktemp("fuzz"))
    try:
        env.add_subsystem()
        server = _serve(env)
        for line in (json.dumps(req).encode(), garbage):
            before = env.root.to_dict()
            answer = _handle(env, server, line)
            for one in answer if isinstance(answer, list) else [answer]:
                err = (one or {}).get("error")
                assert err is None or err["code"] != INTERNAL_ERROR, err
                if err is not None:
                    assert env.root.to_dict() == before, f"{req} left changes: {err}"
            listing = _handle(env, server, b'{"jsonrpc": "2.0", "id": 1, "method": "list", '
                                           b'"params": {"path": "/"}}')
            assert listing["result"]["kind"] == "root"  # the target keeps serving
    finally:
        env.close()


def _mutations(doc: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _mutations(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _mutations(v, path + (i,))
    return out


BASE = json.loads(FIXTURE.read_text())
SPOTS = _mutations(BASE)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(edits=st.lists(st.tuples(st.sampled_from(SPOTS), values), min_size=1, max_size=3))
def test_fuzz_config_file(tmp_path_factory: Any, edits: list[tuple[tuple, Any]]) -> None:
    doc: Any = copy.deepcopy(BASE)
    for spot, value in edits:
        if not spot:
            doc = value
            continue
        node = doc
        try:
            for key in spot[:-1]:
                node = node[key]
            node[spot[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed this spot
    env = LoopEnv(tmp_path_factory.mktemp("fuzz"))
    try:
        try:
            with env.root.transaction():
                env.root.restore(doc, source="fuzz.json")
        except ConfigError:
            assert env.root.is_empty(), "a refused file left something live"
            assert not env.target.listening
        env.root.clear()
    finally:
        env.close()
