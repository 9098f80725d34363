#!/usr/bin/env bash
# Idempotent machine setup: the Debian packages the target, the soft-RoCE VM and the
# tests need, then a venv that sees Debian's python3-pyverbs (built for /usr/bin/python3,
# not for the pyenv interpreter first on PATH; see ENVIRONMENT notes in docs/).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3-venv python3-pyverbs python3-nvme
    qemu-system-x86 busybox-static kmod cpio linux-image-amd64 e2fsprogs
    rdma-core ibverbs-providers ibverbs-utils rdmacm-utils perftest
    libibverbs-dev librdmacm-dev
    nvme-cli fio iproute2 pciutils libaio1 debian-archive-keyring file
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
fi

# The VM's 7.x kernel (PCI P2PDMA) under /lib/modules; the 6.1 kernel above stays in /boot.
tools/vm-kernel.sh

if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test,shell,bench,vm]'
    touch "$stamp"
fi
