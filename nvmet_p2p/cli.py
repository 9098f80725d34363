"""The `nvmet-p2p` command: serve, rpc calls, p2p questions, benchmarks.

Global options (`--log-level`, `--version`) are accepted before or after the
subcommand, as users of nvme-cli and systemctl expect.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import nvmet_p2p
from nvmet_p2p.control import p2p_cli
from nvmet_p2p.control.defaults import DEFAULT_CONFIG, DEFAULT_RPC_SOCKET
from nvmet_p2p.testbed import bench
from nvmet_p2p.wire.limits import NVMET_P2P_ENABLE_TIMEOUT_S, NVMET_P2P_MAX_CTRLS_PER_HOST

LOG_LEVELS = ["debug", "info", "warning", "error"]
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


def _serve(args: argparse.Namespace) -> int:
    from nvmet_p2p.control.daemon import Daemon

    config = args.config
    if config is None:  # the default file is optional; a named one must exist
        config = DEFAULT_CONFIG
        if not os.path.exists(config):
            logging.getLogger("nvmet_p2p.daemon").info(
                "no configuration at %s: starting empty (save_config writes it)", config)
    rpc_socket = None if args.no_rpc_socket else args.rpc_socket
    return Daemon(config, rpc_socket, optional_config=args.config is None,
                  max_ctrls_per_host=args.max_ctrls_per_host,
                  enable_timeout=args.enable_timeout).run()


def _rpc(args: argparse.Namespace) -> int:
    from nvmet_p2p.control.rpc.cli import cli_call

    return cli_call(args)


def _globals(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--log-level and --version; below the top level they only override when given."""
    default = "info" if top else argparse.SUPPRESS
    parser.add_argument("--log-level", default=default, choices=LOG_LEVELS,
                        help="log level on stderr (default: info)")
    parser.add_argument("--version", action="version",
                        version=f"nvmet-p2p {nvmet_p2p.__version__}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvmet-p2p",
                                     description="Userspace NVMe-oF target with P2P offload")
    _globals(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = sub.add_parser("serve", help="run the target")
    serve.add_argument("--config", metavar="FILE", default=None,
                       help="nvmetcli-format JSON to restore at start and save to "
                            f"(default: {DEFAULT_CONFIG}, if it exists)")
    serve.add_argument("--rpc-socket", metavar="PATH", default=DEFAULT_RPC_SOCKET,
                       help=f"JSON-RPC control socket, mode 0600 (default: "
                            f"{DEFAULT_RPC_SOCKET})")
    serve.add_argument("--no-rpc-socket", action="store_true",
                       help="run without a control socket")
    serve.add_argument("--max-ctrls-per-host", metavar="N", type=int,
                       default=NVMET_P2P_MAX_CTRLS_PER_HOST,
                       help="controllers one host NQN may hold per subsystem "
                            f"(default {NVMET_P2P_MAX_CTRLS_PER_HOST}; docs/protocol-parity.md)")
    serve.add_argument("--enable-timeout", metavar="SECONDS", type=float,
                       default=NVMET_P2P_ENABLE_TIMEOUT_S,
                       help="tear down a controller not enabled this long after Connect or "
                            f"reset (default {NVMET_P2P_ENABLE_TIMEOUT_S:g}; 0: never)")
    serve.set_defaults(func=_serve)
    from nvmet_p2p.control.rpc.cli import add_arguments

    rpc = sub.add_parser("rpc", help="call a control-socket method (`rpc list-methods`)",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(rpc)
    rpc.set_defaults(func=_rpc)
    p2p_cli.add_subparsers(sub)
    bench.add_subparsers(sub)
    for child in sub.choices.values():
        _globals(child, top=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format=LOG_FORMAT, stream=sys.stderr)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
