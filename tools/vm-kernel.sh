#!/usr/bin/env bash
# Install Debian's newest kernel (linux-image-amd64 from trixie-backports, 7.x with
# CONFIG_PCI_P2PDMA=y) for the test VM only: its modules, vmlinuz and config go to
# /lib/modules/<release>/ and nothing else on the machine changes.  /boot is left alone
# (the host's own 6.1 kernel stays the fallback there) and the machine's apt setup is not
# touched: the suite is fetched through a private sources directory that reuses the URI of
# the machine's own Debian source, so no registry host is named here.
#
# Idempotent: when /lib/modules/<resolved release>/vmlinuz exists it only refreshes the
# private package lists (well under a second).  vmlinuz is installed last, after the
# modules and depmod, so its presence means a complete install.
#
# Environment: NVMET_P2P_VM_KERNEL_SUITE (default trixie-backports),
# NVMET_P2P_VM_KERNEL_STATE (private apt state, default /var/cache/nvmet-p2p/vm-kernel).
set -euo pipefail

SUITE=${NVMET_P2P_VM_KERNEL_SUITE:-trixie-backports}
STATE=${NVMET_P2P_VM_KERNEL_STATE:-/var/cache/nvmet-p2p/vm-kernel}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
MODULES=/lib/modules
META=linux-image-amd64

say() { echo "vm-kernel: $*"; }
die() { echo "vm-kernel: error: $*" >&2; exit 1; }

t0=$SECONDS
[ "$(id -u)" = 0 ] || die "must run as root (writes $MODULES)"
[ -r "$KEYRING" ] || die "$KEYRING missing (apt-get install debian-archive-keyring)"

# The machine's Debian archive URI: the first non-security deb source.
debian_uri() {
    local f=/etc/apt/sources.list.d/debian.sources
    if [ -r "$f" ]; then
        # deb822 stanzas are separated by blank lines; "URIs:" may list several.
        awk 'BEGIN { RS = ""; FS = "\n" }
             {
                 types = uris = suites = ""
                 for (i = 1; i <= NF; i++) {
                     if ($i ~ /^Types:/) types = $i
                     else if ($i ~ /^URIs:/) uris = $i
                     else if ($i ~ /^Suites:/) suites = $i
                 }
                 if (types ~ /[ \t]deb([ \t]|$)/ && suites !~ /-security/ && uris != "") {
                     split(uris, u, /[ \t]+/); print u[2]; exit
                 }
             }' "$f"
        return
    fi
    f=/etc/apt/sources.list
    [ -r "$f" ] || return 0
    # deb [options] URI suite components...
    sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" |
        awk '$1 == "deb" && $3 !~ /-security/ { print $2; exit }'
}

# Any 7.x (or later) kernel already installed, newest first.
installed_kernels() {
    local d
    for d in "$MODULES"/[7-9].*/vmlinuz "$MODULES"/[1-9][0-9].*/vmlinuz; do
        if [ -f "$d" ]; then basename "$(dirname "$d")"; fi
    done | sort -rV
}

# Registry unreachable or the suite unusable: an installed kernel is good enough.
keep_or_die() {
    local have
    have=$(installed_kernels | head -n1)
    if [ -n "$have" ]; then
        say "$1; keeping the installed $have"
        exit 0
    fi
    die "$1, and no 7.x kernel is installed in $MODULES (the VM would boot the 6.1 kernel without PCI P2PDMA)"
}

mkdir -p "$STATE"
exec 9>"$STATE/lock"
flock 9  # two setups at once (other worktrees) share this state and /lib/modules

uri=$(debian_uri)
[ -n "$uri" ] || keep_or_die "no Debian source in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"

mkdir -p "$STATE/sources" "$STATE/lists/partial" "$STATE/cache/archives/partial"
cat > "$STATE/sources/vm-kernel.sources" <<EOF
Types: deb
URIs: $uri
Suites: $SUITE
Components: main
Signed-By: $KEYRING
EOF
: > "$STATE/status"  # an empty dpkg status: the host's installed 6.1 packages stay out of it

APT_OPTS=(
    -o Dir::Etc::sourcelist=/dev/null
    -o "Dir::Etc::sourceparts=$STATE/sources"
    -o "Dir::State::Lists=$STATE/lists"
    -o "Dir::Cache=$STATE/cache"
    -o "Dir::State::status=$STATE/status"
    -o Acquire::Retries=1
    -o Acquire::http::Timeout=30
    -o Acquire::https::Timeout=30
)
export DEBIAN_FRONTEND=noninteractive

if ! out=$(apt-get "${APT_OPTS[@]}" -q update --error-on=any 2>&1); then
    echo "$out" | tail -n 5 >&2
    keep_or_die "cannot update the package lists of $SUITE"
fi

# One field of the candidate's record.
field() {
    apt-cache "${APT_OPTS[@]}" show --no-all-versions "$1" 2>/dev/null |
        awk -v f="$2:" '$1 == f { sub(/^[^:]*:[ \t]*/, ""); print; exit }'
}

# "a (= 1), b | c, d" -> one package name per line, alternatives dropped.
dep_names() {
    tr ',' '\n' | grep -v '|' | sed -e 's/(.*)//' -e 's/[[:space:]]//g' | grep .
}

version=$(field "$META" Version)
[ -n "$version" ] || keep_or_die "$META not found in $SUITE"
image=$(field "$META" Depends | dep_names | grep -E '^linux-image-.*-amd64$' | head -n1 || true)
[ -n "$image" ] || die "$META $version in $SUITE depends on no linux-image-*-amd64"
release=${image#linux-image-}

if [ -f "$MODULES/$release/vmlinuz" ]; then
    say "$release ($META $version from $SUITE) is installed ($((SECONDS - t0)) s)"
    exit 0
fi

# linux-base-/linux-binary-/linux-modules-<release>: the files; the rest are meta
# packages or the initramfs tool, which the VM does not use (virtme-ng builds its own).
mapfile -t pkgs < <(field "$image" Depends | dep_names |
    awk -v s="-$release" 'length($0) > length(s) && substr($0, length($0) - length(s) + 1) == s')
((${#pkgs[@]})) || die "$image depends on no package carrying $release"
image_version=$(field "$image" Version)
say "installing $release ($META $version from $SUITE): ${pkgs[*]}"

dl=$STATE/download
stage=$STATE/stage
rm -rf "$dl" "$stage"
mkdir -p "$dl" "$stage"
# apt drops privileges to _apt for downloads; let it write here.
id _apt >/dev/null 2>&1 && chown _apt "$dl"
specs=()
for p in "${pkgs[@]}"; do specs+=("$p=$image_version"); done
if ! out=$(cd "$dl" && apt-get "${APT_OPTS[@]}" -q download "${specs[@]}" 2>&1); then
    echo "$out" | tail -n 5 >&2
    keep_or_die "cannot download ${pkgs[*]}"
fi
for deb in "$dl"/*.deb; do
    dpkg-deb -x "$deb" "$stage"
done
src=$stage/usr/lib/modules/$release
[ -f "$src/vmlinuz" ] || die "no usr/lib/modules/$release/vmlinuz in ${pkgs[*]}"
[ -d "$src/kernel" ] || die "no modules for $release in ${pkgs[*]}"

dst=$MODULES/$release
rm -rf "$dst"
mkdir -p "$dst"
# Everything but vmlinuz (modules, config, System.map, modules.*), then depmod, then
# vmlinuz by rename: the harness only considers directories that have a vmlinuz.
(cd "$src" && tar --exclude=./vmlinuz -cf - .) | (cd "$dst" && tar -xf -)
depmod "$release"
cp "$src/vmlinuz" "$dst/.vmlinuz.tmp"
mv "$dst/.vmlinuz.tmp" "$dst/vmlinuz"
rm -rf "$dl" "$stage"

say "installed $release in $dst ($((SECONDS - t0)) s)"
grep -q '^CONFIG_PCI_P2PDMA=y' "$dst/config" 2>/dev/null ||
    say "warning: $dst/config does not say CONFIG_PCI_P2PDMA=y"
