"""The ``nvmet-p2p p2p`` command group: ask the topology model and the P2P policy.

``p2p distance`` prints what the kernel's ``pci_p2pdma_distance_many`` would decide for one
provider and a set of clients (BDFs, RDMA devices, netdevs, block devices, files), with the
path each client's traffic takes and every reason it is worse than a direct bus address.
Exit status: 0 when P2P is possible, 2 when it is not supported, 1 on an error.

``p2p explain`` prints the P2P decision (provider, distance, reason) for every port x
namespace: of a configuration file without opening any backend (``--config``), or of a
running daemon (``--rpc-socket``).  Exit status: 0 when every pair was decided, 1 on an
error.
"""

from __future__ import annotations

import argparse
import json
import sys

from nvmet_p2p.errors import NvmetError, P2PError
from nvmet_p2p.p2p.topology import MAP_NOT_SUPPORTED, Decision, Topology

EXIT_OK, EXIT_ERROR, EXIT_NOT_SUPPORTED = 0, 1, 2

DISTANCE_DESCRIPTION = (
    "Decide, as the kernel's pci_p2pdma_distance_many() would, whether the provider's BAR "
    "memory can serve every client, and how far it is. Exit status: 0 P2P possible, "
    "2 not supported, 1 error."
)


def add_subparsers(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``p2p`` with its ``distance`` subcommand on a parent's subparsers."""
    p2p = subparsers.add_parser("p2p", help="PCI peer-to-peer topology questions")
    sub = p2p.add_subparsers(dest="p2p_command", metavar="COMMAND", required=True)
    dist = sub.add_parser(
        "distance",
        help="map type and distance from a p2pmem provider to its clients",
        description=DISTANCE_DESCRIPTION,
    )
    dist.add_argument("--sysfs-root", default="/sys", metavar="DIR",
                      help="sysfs tree to read (default: /sys)")
    dist.add_argument("--cpu", metavar="VENDOR:FAMILY",
                      help="CPU to judge for, e.g. AuthenticAMD:25 (default: /proc/cpuinfo)")
    dist.add_argument("--provider", required=True, metavar="BDF",
                      help="PCI function whose BAR memory would be used")
    dist.add_argument("--client", action="append", required=True, metavar="DEV",
                      help="BDF, RDMA device, netdev, block device or file; repeatable")
    dist.add_argument("--json", action="store_true", help="print JSON")
    dist.set_defaults(func=run_distance)

    expl = sub.add_parser(
        "explain",
        help="the P2P decision and its reason for every port x namespace",
        description=EXPLAIN_DESCRIPTION,
    )
    where = expl.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", metavar="FILE",
                       help="nvmetcli-format JSON to judge offline (no backend is opened)")
    where.add_argument("--rpc-socket", metavar="PATH",
                       help="ask the running daemon on this control socket")
    expl.add_argument("--sysfs-root", default="/sys", metavar="DIR",
                      help="sysfs tree to read with --config (default: /sys)")
    expl.add_argument("--cpu", metavar="VENDOR:FAMILY",
                      help="CPU to judge for with --config, e.g. AuthenticAMD:25 "
                           "(default: /proc/cpuinfo)")
    expl.add_argument("--json", action="store_true",
                      help="print a JSON list of decisions")
    expl.set_defaults(func=run_explain)
    return p2p


def format_decision(decision: Decision) -> str:
    """Human text: the verdict, one block per client, then the reasons and warnings."""
    distance = "-" if decision.distance is None else str(decision.distance)
    lines = [f"provider {decision.provider}: {decision.map_type}, distance {distance}"]
    for c in decision.clients:
        d = "-" if c.distance is None else str(c.distance)
        lines.append(f"  client {c.client.name}: {c.map_type}, distance {d}")
        if c.path:
            lines.append(f"    path {' -> '.join(c.path)}")
    for title, items in (("reasons", decision.reasons), ("warnings", decision.warnings)):
        if items:
            lines.append(f"{title}:")
            lines.extend(f"  - {item}" for item in items)
    return "\n".join(lines)


EXPLAIN_DESCRIPTION = (
    "Print the P2P decision for every port x namespace (the subsystems linked to each port): "
    "P2P memory from which provider at what distance, or system memory and why. With "
    "--config nothing is opened: the namespace's PCI device comes from the configuration, "
    "the RDMA device from the port's address, and an NVMe CMB is only a candidate until its "
    "namespace is enabled. With --rpc-socket the running daemon decides with its live "
    "providers."
)


def explain_decisions(args: argparse.Namespace) -> list[dict]:
    """The decisions as JSON dicts, from the daemon or from a configuration file."""
    if args.rpc_socket:
        from nvmet_p2p.control.rpc import RpcClient

        with RpcClient(args.rpc_socket) as client:
            result = client.call("p2p_explain")
        if not isinstance(result, list):
            raise NvmetError(f"the daemon answered p2p_explain with {type(result).__name__}, "
                             "not a list of decisions")
        return result
    from nvmet_p2p.config.tree import Root
    from nvmet_p2p.p2p.explain import explain_config

    root = Root.load(args.config)
    decisions = explain_config(root, sysfs_root=args.sysfs_root, cpu=args.cpu)
    return [d.to_json() for d in decisions]


def run_explain(args: argparse.Namespace) -> int:
    try:
        decisions = explain_decisions(args)
    except (NvmetError, ValueError, OSError) as e:
        print(f"nvmet-p2p p2p explain: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(decisions, indent=2))
    elif not decisions:
        print("no port has a linked subsystem with namespaces")
    else:
        for d in decisions:
            print(d["text"])
    return EXIT_OK


def run_distance(args: argparse.Namespace) -> int:
    try:
        topology = Topology(args.sysfs_root, cpu=args.cpu)
        decision = topology.distance(args.provider, args.client)
    except (P2PError, ValueError) as e:
        print(f"nvmet-p2p p2p distance: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        print(f"nvmet-p2p p2p distance: cannot read {args.sysfs_root}: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(decision.to_json(), indent=2))
    else:
        print(format_decision(decision))
    return EXIT_NOT_SUPPORTED if decision.map_type == MAP_NOT_SUPPORTED else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m nvmet_p2p.control.p2p_cli p2p distance ...``)."""
    parser = argparse.ArgumentParser(prog="nvmet-p2p")
    add_subparsers(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
