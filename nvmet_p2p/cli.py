"""The `nvmet-p2p` command: serve, p2p questions, RPC calls, benchmarks."""

from __future__ import annotations

import argparse
import logging
import sys

from nvmet_p2p.control import p2p_cli
from nvmet_p2p.testbed import bench

DEFAULT_RPC_SOCKET = "/run/nvmet-p2p.sock"


def _serve(args: argparse.Namespace) -> int:
    from nvmet_p2p.control.daemon import Daemon

    return Daemon(args.config, args.rpc_socket).run()


def _rpc(args: argparse.Namespace) -> int:
    from nvmet_p2p.control.rpc.cli import cli_call

    return cli_call(args.rpc_socket, args.method, args.params)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvmet-p2p",
                                     description="Userspace NVMe-oF target with P2P offload")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="log level on stderr (default: info)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = sub.add_parser("serve", help="run the target")
    serve.add_argument("--config", metavar="FILE",
                       help="nvmetcli-format JSON to restore at start")
    serve.add_argument("--rpc-socket", metavar="PATH", default=None,
                       help=f"JSON-RPC control socket (e.g. {DEFAULT_RPC_SOCKET})")
    serve.set_defaults(func=_serve)
    rpc = sub.add_parser("rpc", help="call a control-socket method (see docs/rpc.md)")
    rpc.add_argument("--rpc-socket", metavar="PATH", default=DEFAULT_RPC_SOCKET,
                     help=f"control socket (default: {DEFAULT_RPC_SOCKET})")
    rpc.add_argument("method", metavar="METHOD", help="e.g. list, get, set, status")
    rpc.add_argument("params", metavar="JSON", nargs="?", help="params as a JSON object")
    rpc.set_defaults(func=_rpc)
    p2p_cli.add_subparsers(sub)
    bench.add_subparsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        stream=sys.stderr)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
