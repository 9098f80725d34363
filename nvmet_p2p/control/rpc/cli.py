"""`nvmet-p2p rpc METHOD [JSON]`: call one method and print the result."""

from __future__ import annotations

import json
import sys

from nvmet_p2p.control.rpc.client import RpcClient
from nvmet_p2p.control.rpc.errors import RpcError, RpcUnreachable


def cli_call(path: str, method: str, params_json: str | None) -> int:
    """Print the result as JSON (exit 0) or the error (exit 1)."""
    try:
        params = json.loads(params_json) if params_json else {}
    except json.JSONDecodeError as e:
        print(f"nvmet-p2p rpc: the params are not valid JSON: {e}", file=sys.stderr)
        return 1
    if not isinstance(params, dict):
        print("nvmet-p2p rpc: params must be a JSON object, e.g. '{\"path\": \"/\"}'",
              file=sys.stderr)
        return 1
    try:
        with RpcClient(path) as client:
            result = client.call(method, **params)
    except (RpcError, RpcUnreachable) as e:
        print(str(e), file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0
