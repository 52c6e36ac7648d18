#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# QEMU 11.1 from trixie-backports in a Debian trixie root under the cache, for
# the "generic" device front (vhost-user-test-device-pci: the vhost-user
# device serves all three vsock queues, the config space and the feature
# bits). Bookworm's QEMU 7.2 only has vhost-user-vsock-pci, which keeps the
# event queue in QEMU. The packages need trixie's libraries, hence a root of
# their own; tools/vmtest.py runs that QEMU with chroot in a private mount
# namespace. The host's own QEMU and apt state are left alone, except that
# debootstrap is installed.
#
# Idempotent: a second run reads the stamp and returns at once. Cold, it
# takes a few minutes (debootstrap, then QEMU and its libraries).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ROOT=$CACHE/qemu-trixie
STAMP=$ROOT/.vsock-rs-qemu
SUITE=trixie
PKGS=(qemu-system-x86)
FRONT=vhost-user-test-device-pci
MIRROR=${VSOCK_RS_DEBIAN_MIRROR:-}

[ -n "$MIRROR" ] || MIRROR=$(host_mirror | head -1)
[ -n "$MIRROR" ] || die "no Debian mirror found in /etc/apt/sources.list*: set VSOCK_RS_DEBIAN_MIRROR=http://.../debian and run 'make qemu' again"
MIRROR=${MIRROR%/}

# What the root is built from; a change rebuilds it.
key=$(inputs_hash "$SUITE" "${PKGS[*]}" "$FRONT" "$MIRROR")
if [ "$(sed -n 's/^key=//p' "$STAMP" 2>/dev/null)" = "$key" ]; then
	exit 0
fi

[ "$(id -u)" = 0 ] || die "the QEMU 11.1 root needs root for debootstrap and chroot: run 'sudo make qemu' (or use --front vsock)"
t0=$SECONDS
mkdir -p "$CACHE"
exec 9>"$CACHE/qemu-trixie.lock"
flock 9
# Another run may have finished while this one waited.
if [ "$(sed -n 's/^key=//p' "$STAMP" 2>/dev/null)" = "$key" ]; then
	exit 0
fi

log=$CACHE/qemu-trixie.log
: >"$log"
if ! command -v debootstrap >/dev/null; then
	msg "installing debootstrap on the host"
	export DEBIAN_FRONTEND=noninteractive
	apt_host() { apt-get -y -q -o DPkg::Lock::Timeout=600 "$@" >>"$log" 2>&1; }
	apt_host install --no-install-recommends debootstrap ||
		{ apt_host update && apt_host install --no-install-recommends debootstrap; } ||
		die "apt-get install debootstrap failed (see $log): install it by hand, then run 'make qemu' again"
fi

# Everything that mounts runs in a mount namespace of its own: whatever it
# leaves mounted (debootstrap's /proc, a killed apt's binds) goes with it,
# and nothing is ever mounted in the host's namespace.
in_root() {
	unshare --mount --propagation private sh -ec '
		root=$1; shift
		mount --rbind /dev "$root/dev"
		mount -t proc proc "$root/proc"
		exec chroot "$root" "$@"' in_root "$NEW" "$@"
}

NEW=$ROOT.new
rm -rf --one-file-system "$NEW"
msg "debootstrap --variant=minbase $SUITE from $MIRROR (log: $log)"
unshare --mount --propagation private \
	debootstrap --variant=minbase "$SUITE" "$NEW" "$MIRROR" >>"$log" 2>&1 ||
	die "debootstrap $SUITE from $MIRROR failed (last lines of $log: $(tail -2 "$log" | tr '\n' ' ')); check that the mirror serves $SUITE, then run 'make qemu' again"

cat >"$NEW/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-backports main
EOF
# No service may start inside the root.
printf '#!/bin/sh\nexit 101\n' >"$NEW/usr/sbin/policy-rc.d"
chmod +x "$NEW/usr/sbin/policy-rc.d"
msg "apt-get install -t $SUITE-backports ${PKGS[*]} in the root"
{
	in_root apt-get update -q &&
		in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends -t "$SUITE-backports" "${PKGS[@]}" &&
		in_root apt-get clean
} >>"$log" 2>&1 ||
	die "installing ${PKGS[*]} from $SUITE-backports failed (last lines of $log: $(tail -2 "$log" | tr '\n' ' ')); check that $MIRROR serves $SUITE-backports, then run 'make qemu' again"

version=$(in_root dpkg-query -W -f='${Version}' qemu-system-x86)
devices=$(in_root qemu-system-x86_64 -device help 2>&1) || true
grep -q "\"$FRONT\"" <<<"$devices" ||
	die "QEMU $version in $NEW has no $FRONT: use --front vsock, or a newer qemu-system-x86 in $SUITE-backports"

{
	echo "key=$key"
	echo "mirror=$MIRROR"
	echo "suite=$SUITE-backports"
	echo "qemu-system-x86=$version"
	echo "debootstrap=$(dpkg-query -W -f='${Version}' debootstrap)"
	echo "front=$FRONT"
	echo "date=$(date -u +%FT%TZ)"
} >"$NEW/.vsock-rs-qemu"

if [ -d "$ROOT" ]; then
	rm -rf --one-file-system "$ROOT.old"
	mv "$ROOT" "$ROOT.old"
fi
mv "$NEW" "$ROOT"
rm -rf --one-file-system "$ROOT.old"
msg "QEMU $version from $SUITE-backports in $ROOT ($((SECONDS - t0)) s)"
