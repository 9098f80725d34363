"""The control plane: the target process and what changes it.

`daemon` runs the target (event loop, transports, signals, the control socket),
`rpc` is the JSON-RPC 2.0 server and client on a Unix socket, `shell` the
targetcli-style shell (`targetcli-ext`) over that RPC API.  The configuration tree
they change is `nvmet_p2p.configfs`.
"""
