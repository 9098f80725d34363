"""`nvmet-p2p rpc`: call one method, as SPDK's rpc.py does.

    nvmet-p2p rpc [--rpc-socket PATH] [--wait SECONDS] METHOD [JSON | name=value ...]
    nvmet-p2p rpc help [METHOD]

Params are one JSON object or `name=value` words (a value that is valid JSON is taken
as JSON: `name=1`, `attrs={"attr": {...}}`; anything else is a string).  The method
list and each method's params come from the server's table, so help never drifts.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from nvmet_p2p.control.defaults import DEFAULT_RPC_SOCKET
from nvmet_p2p.control.rpc.client import RpcClient
from nvmet_p2p.control.rpc.errors import RpcError, RpcUnreachable
from nvmet_p2p.control.rpc.methods import METHODS


def method_list() -> str:
    width = max(len(m) for m in METHODS)
    return "\n".join(f"  {name:<{width}}  {m.help}" for name, m in METHODS.items())


def method_help(name: str) -> str:
    m = METHODS[name]
    lines = [f"{name}: {m.help}", "params:" if m.params else "params: none"]
    for p in m.params:
        lines.append(f"  {p.name}{'' if p.required else ' (optional)'}: {p.what}")
    lines.append("see docs/rpc.md for results and errors")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Call one control-socket method; print its result as JSON."
    parser.epilog = ("methods (`nvmet-p2p rpc help METHOD` for its params):\n"
                     + method_list())
    parser.add_argument("--rpc-socket", metavar="PATH", default=DEFAULT_RPC_SOCKET,
                        help=f"control socket (default: {DEFAULT_RPC_SOCKET})")
    parser.add_argument("--wait", metavar="SECONDS", type=float, default=0.0,
                        help="retry connecting this long (a daemon just started)")
    parser.add_argument("method", metavar="METHOD", help="a method, or `help`")
    parser.add_argument("params", metavar="PARAMS", nargs="*",
                        help="one JSON object, or name=value words")


def parse_params(words: list[str]) -> dict[str, Any]:
    """The CLI's params: one JSON object, or name=value words; ValueError says why."""
    if len(words) == 1 and words[0].lstrip().startswith("{"):
        try:
            params = json.loads(words[0])
        except json.JSONDecodeError as e:
            raise ValueError(f"the params are not valid JSON: {e}") from None
        if not isinstance(params, dict):
            raise ValueError("params must be a JSON object, e.g. '{\"path\": \"/\"}'")
        return params
    out: dict[str, Any] = {}
    for word in words:
        name, eq, value = word.partition("=")
        if not eq or not name:
            raise ValueError(f"{word!r} is not name=value (or give one JSON object)")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def cli_call(args: argparse.Namespace) -> int:
    """Print the result as JSON (exit 0) or the error (exit 1)."""
    if args.method == "help":
        names = args.params or []
        unknown = [n for n in names if n not in METHODS]
        if unknown:
            print(f"nvmet-p2p rpc: unknown method {unknown[0]!r}; methods:\n{method_list()}",
                  file=sys.stderr)
            return 1
        print("\n\n".join(method_help(n) for n in names) if names else method_list())
        return 0
    try:
        params = parse_params(args.params)
    except ValueError as e:
        print(f"nvmet-p2p rpc: {e}", file=sys.stderr)
        return 1
    try:
        with RpcClient(args.rpc_socket) as client:
            if args.wait:
                client.wait_ready(args.wait)
            result = client.call(args.method, **params)
    except (RpcError, RpcUnreachable) as e:
        print(str(e), file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0
