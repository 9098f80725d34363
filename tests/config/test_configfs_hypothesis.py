"""Stateful property test of the configuration tree.

Random sequences of create/delete/link/unlink/enable/disable/set/save/restore (and a
host identifying a subsystem) either succeed or raise ConfigError leaving the tree
exactly as it was, the core's view (a hooks spy) always matches the tree, and an
identified subsystem keeps the identity its hosts read.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nvmet_p2p.config.tree import IDENTITY_ATTRS
from nvmet_p2p.configfs import ConfigError, Root, TreeHooks, attr_groups, set_attr

SUBS = ["nqn.2024-01.io.example:a", "nqn.2024-01.io.example:b",
        "nqn.2014-08.org.nvmexpress.discovery"]
HOSTS = ["nqn.2024-01.io.example:h1", "nqn.2024-01.io.example:h2", "not-an-nqn"]
PORTS = [1, 2]
NSIDS = [1, 2, 0]
VETO_PATH = "/veto"  # the spy refuses to enable a namespace backed by this path
VETO_SVC = "4666"  # ... and to bring up a port on this service id
VALUES = ["0", "1", "-1", "4096", "rdma", "tcp", "loop", "ipv4", "10.0.0.1", "::", "4420",
          VETO_SVC, "/tmp/a", VETO_PATH, "", "64M", "512", "required", "0000:03:00.0",
          "x" * 41, "1.4", "memory", "connected"]


class SpyHooks(TreeHooks):
    def __init__(self) -> None:
        self.enabled: set[tuple[str, int]] = set()
        self.links: set[tuple[int, str]] = set()

    def ns_enable(self, subsys, ns):
        assert (subsys.nqn, ns.nsid) not in self.enabled
        if ns.device_path == VETO_PATH:
            raise ConfigError("backend refused; fix device_path")
        self.enabled.add((subsys.nqn, ns.nsid))

    def ns_disable(self, subsys, ns):
        self.enabled.remove((subsys.nqn, ns.nsid))

    def port_add_subsys(self, port, subsys):
        assert (port.portid, subsys.nqn) not in self.links
        if port.addr_trsvcid == VETO_SVC:
            raise ConfigError("address in use; pick another addr_trsvcid")
        self.links.add((port.portid, subsys.nqn))

    def port_remove_subsys(self, port, subsys):
        self.links.remove((port.portid, subsys.nqn))


class TreeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.spy = SpyHooks()
        self.root = Root(self.spy)
        self.dir = Path(tempfile.mkdtemp(prefix="nvmet-cfg-"))
        self.identified: dict[str, tuple] = {}  # nqn -> (subsystem, identity it had)

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def attempt(self, fn, *args) -> None:
        """Run an operation: it succeeds, or raises ConfigError and changes nothing."""
        before = self.root.to_dict()
        try:
            fn(*args)
        except ConfigError as e:
            assert str(e), "every refusal says why"
            assert self.root.to_dict() == before

    def _ns(self, nqn, nsid):
        subsys = self.root.subsystems.get(nqn)
        return subsys.namespaces.get(nsid) if subsys else None

    def pick(self, data, existing, pool):
        """Mostly an existing name (deep states), sometimes any name from the pool."""
        existing = list(existing)
        if existing and data.draw(st.integers(0, 3)):
            return data.draw(st.sampled_from(existing))
        return data.draw(st.sampled_from(pool))

    def pick_ns(self, data):
        pairs = [(s.nqn, nsid) for s in self.root.subsystems.values() for nsid in s.namespaces]
        return data.draw(st.sampled_from(pairs)) if pairs else None

    @initialize(enable=st.lists(st.booleans(), min_size=2, max_size=2),
                link=st.lists(st.booleans(), min_size=2, max_size=2))
    def base_tree(self, enable, link):
        """A typical configuration to start from, so deep states are reached quickly."""
        self.root.create_host(HOSTS[0])
        subsys = self.root.create_subsystem(SUBS[0])
        subsys.add_allowed_host(HOSTS[0])
        for nsid, on in zip((1, 2), enable):
            ns = subsys.create_namespace(nsid)
            ns.device_path = "/tmp/a"
            ns.enable = on
        rdma, loop = self.root.create_port(1), self.root.create_port(2)
        rdma.addr_trtype, rdma.addr_adrfam, rdma.addr_traddr = "rdma", "ipv4", "10.0.0.1"
        loop.addr_trtype = "loop"
        for port, on in zip((rdma, loop), link):
            if on:
                port.link_subsystem(SUBS[0])

    @rule(nqn=st.sampled_from(HOSTS))
    def create_host(self, nqn):
        self.attempt(self.root.create_host, nqn)

    @rule(data=st.data())
    def delete_host(self, data):
        self.attempt(self.root.delete_host, self.pick(data, self.root.hosts, HOSTS))

    @rule(nqn=st.sampled_from(SUBS))
    def create_subsystem(self, nqn):
        self.attempt(self.root.create_subsystem, nqn)

    @rule(data=st.data())
    def delete_subsystem(self, data):
        self.attempt(self.root.delete_subsystem, self.pick(data, self.root.subsystems, SUBS))

    @precondition(lambda self: self.root.subsystems)
    @rule(data=st.data(), nsid=st.sampled_from(NSIDS))
    def create_namespace(self, data, nsid):
        nqn = data.draw(st.sampled_from(list(self.root.subsystems)))
        self.attempt(self.root.subsystems[nqn].create_namespace, nsid)

    @precondition(lambda self: self.root.subsystems)
    @rule(data=st.data())
    def delete_namespace(self, data):
        picked = self.pick_ns(data)
        if picked is not None:
            self.attempt(self.root.subsystems[picked[0]].delete_namespace, picked[1])

    @precondition(lambda self: self.root.subsystems)
    @rule(data=st.data(), path=st.sampled_from(["/tmp/a", "/tmp/a", VETO_PATH, ""]))
    def set_path(self, data, path):
        picked = self.pick_ns(data)
        if picked is not None:
            self.attempt(setattr, self._ns(*picked), "device_path", path)

    @precondition(lambda self: self.root.subsystems)
    @rule(data=st.data(), on=st.booleans())
    def enable(self, data, on):
        picked = self.pick_ns(data)
        if picked is not None:
            self.attempt(setattr, self._ns(*picked), "enable", on)

    @rule(portid=st.sampled_from(PORTS))
    def create_port(self, portid):
        self.attempt(self.root.create_port, portid)

    @rule(data=st.data())
    def delete_port(self, data):
        self.attempt(self.root.delete_port, self.pick(data, self.root.ports, PORTS))

    @rule(portid=st.sampled_from(PORTS), trtype=st.sampled_from(["rdma", "loop", "tcp"]),
          svc=st.sampled_from(["4420", VETO_SVC]))
    def setup_port(self, portid, trtype, svc):
        port = self.root.ports.get(portid)
        if port is not None:
            for name, value in (("addr_trtype", trtype), ("addr_adrfam", "ipv4"),
                                ("addr_traddr", "10.0.0.1"), ("addr_trsvcid", svc)):
                self.attempt(setattr, port, name, value)

    @precondition(lambda self: self.root.ports)
    @rule(data=st.data(), link=st.booleans())
    def link(self, data, link):
        port = self.root.ports[data.draw(st.sampled_from(list(self.root.ports)))]
        nqn = self.pick(data, self.root.subsystems, SUBS)
        self.attempt(port.link_subsystem if link else port.unlink_subsystem, nqn)

    @precondition(lambda self: self.root.subsystems)
    @rule(data=st.data(), add=st.booleans())
    def allowed_host(self, data, add):
        subsys = self.root.subsystems[data.draw(st.sampled_from(list(self.root.subsystems)))]
        host = self.pick(data, self.root.hosts, HOSTS)
        self.attempt(subsys.add_allowed_host if add else subsys.remove_allowed_host, host)

    @rule(data=st.data(), value=st.sampled_from(VALUES))
    def set_any_attr(self, data, value):
        objs = [*self.root.subsystems.values(), *self.root.ports.values()]
        for s in self.root.subsystems.values():
            objs.extend(s.namespaces.values())
        for p in self.root.ports.values():
            objs.extend(p.referrals.values())
        if not objs:
            return
        obj = data.draw(st.sampled_from(objs))
        spec = data.draw(st.sampled_from(obj.ATTRS))
        assert spec.group in attr_groups(obj)
        self.attempt(set_attr, obj, spec.group, spec.name, value)

    @rule(data=st.data())
    def host_identifies(self, data):
        if self.root.subsystems:
            subsys = data.draw(st.sampled_from(list(self.root.subsystems.values())))
            subsys.mark_discovered()
            identity = tuple(getattr(subsys, name) for name in IDENTITY_ATTRS)
            if self.identified.get(subsys.nqn, (None,))[0] is not subsys:
                self.identified[subsys.nqn] = (subsys, identity)

    @rule(portid=st.sampled_from(PORTS), name=st.sampled_from(["r1", "r2"]),
          create=st.booleans())
    def referral(self, portid, name, create):
        port = self.root.ports.get(portid)
        if port is not None:
            self.attempt(port.create_referral if create else port.delete_referral, name)

    @rule()
    def save_and_restore(self):
        first, second = self.dir / "a.json", self.dir / "b.json"
        self.root.save(first)
        spy = SpyHooks()
        restored = Root.load(first, hooks=spy)
        restored.save(second)
        assert first.read_bytes() == second.read_bytes()
        assert restored.to_dict() == json.loads(first.read_text())
        self.root, self.spy = restored, spy

    @rule()
    def clear(self):
        self.root.clear()
        assert self.root.is_empty()
        assert not self.spy.enabled and not self.spy.links

    @invariant()
    def links_point_at_existing_objects(self):
        for port in self.root.ports.values():
            for nqn in port.subsystems:
                assert nqn in self.root.subsystems
        for subsys in self.root.subsystems.values():
            assert not (subsys.attr_allow_any_host and subsys.allowed_hosts)
            for host in subsys.allowed_hosts:
                assert host in self.root.hosts
            assert subsys.attr_cntlid_min <= subsys.attr_cntlid_max

    @invariant()
    def identified_subsystems_keep_their_identity(self):
        for nqn, (subsys, identity) in self.identified.items():
            if self.root.subsystems.get(nqn) is subsys:  # not deleted (or reloaded) since
                assert subsys.discovered
                assert tuple(getattr(subsys, name) for name in IDENTITY_ATTRS) == identity

    @invariant()
    def hooks_view_matches_tree(self):
        enabled = {(s.nqn, ns.nsid) for s in self.root.subsystems.values()
                   for ns in s.namespaces.values() if ns.enable}
        links = {(p.portid, nqn) for p in self.root.ports.values() for nqn in p.subsystems}
        assert enabled == self.spy.enabled
        assert links == self.spy.links
        for nqn, nsid in enabled:
            assert self.root.subsystems[nqn].namespaces[nsid].device_path != VETO_PATH


TreeMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_config_tree_state_machine = TreeMachine.TestCase
