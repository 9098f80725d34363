"""Where nvmet-p2p looks when it is not told: one place for the daemon, rpc and shell.

As nvmetcli keeps /etc/nvmet/config.json and SPDK listens on /var/tmp/spdk.sock, the
daemon restores DEFAULT_CONFIG at start (when it exists) and saves there, and every
tool talks to DEFAULT_RPC_SOCKET.
"""

DEFAULT_RPC_SOCKET = "/run/nvmet-p2p.sock"
DEFAULT_CONFIG = "/etc/nvmet-p2p/config.json"
