#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Build the scenarios' initramfs addition for a kernel flavour of KERNEL
# (tools/lib.sh): the real clients and tools the scenarios run in the guests
# (iproute2's ip, tcpdump, ncat, socat, a minimal Python 3, the seeds' C
# server and client built statically, and their Python ones), with the
# libraries they need from the host's Debian packages, plus that kernel's
# vhost_vsock (H2G) and vsockmon modules.
#
# The runner (tools/scenarios.py) appends it to the usual initramfs; the
# other suites' boots never carry it. Two archives, concatenated:
#   $CACHE/scenarios/userland.cpio   the same for every kernel, keyed by the
#                                    packages' versions and the sources here
#   $CACHE/initramfs/scenarios-NAME.cpio   userland plus the modules of NAME
#
# Usage: tools/build-scenarios.sh FLAVOUR
set -euo pipefail
. "$(dirname "$0")/lib.sh"

flavour=${1:-debug}
name=$(kname "$flavour")
kdir=$CACHE/kernel/$name
[ -f "$kdir/arch/x86/boot/bzImage" ] || die "no $KERNEL $flavour kernel in $kdir: run 'make kernel KERNEL=$KERNEL' first"

# The Debian packages whose programs go into the guest (and tshark, which
# decodes the guest's capture on the host: libwireshark is ~110 MB, too big
# for a guest of 512 MiB that holds its initramfs in RAM).
PKGS=(iproute2 tcpdump ncat socat python3-minimal libpython3.11-stdlib
	gcc libc6-dev tshark)
mapfile -t missing < <(missing_debs "${PKGS[@]}")
if [ ${#missing[@]} -gt 0 ]; then
	need_root_for_debs "${missing[@]}"
	export DEBIAN_FRONTEND=noninteractive
	# tshark asks whether non-root users may capture: they may not.
	echo "wireshark-common wireshark-common/install-setuid boolean false" |
		debconf-set-selections
	apt-get update -q >/dev/null || die "apt-get update failed"
	apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
		die "apt-get install ${missing[*]} failed"
fi

# Programs. iproute2's ip goes to /usr/lib/scenarios/bin and is called by
# that path: busybox's ip applet cannot add a vsockmon link, and the guest's
# busybox sh runs its applets before anything on PATH.
PY=/usr/bin/python3.11
BINS=(/usr/bin/tcpdump /usr/bin/ncat /usr/bin/socat "$PY")
seeds=$TOP/tools/seeds
versions=$(dpkg-query -W -f='${Package} ${Version}\n' "${PKGS[@]}")
ukey=$(inputs_hash "$0" "$seeds"/* "$versions")
ucpio=$CACHE/scenarios/userland.cpio
mkdir -p "$CACHE/scenarios" "$CACHE/initramfs"
if [ "$(cat "$ucpio.key" 2>/dev/null)" != "$ukey" ] || [ ! -f "$ucpio" ]; then
	root=$(mktemp -d)
	trap 'rm -rf "$root"' EXIT
	mkdir -p "$root"/{usr/bin,usr/lib/scenarios/bin}
	cp /usr/sbin/ip "$root/usr/lib/scenarios/bin/ip"
	for b in "${BINS[@]}"; do cp "$b" "$root$b"; done
	ln -s python3.11 "$root/usr/bin/python3"
	# tcpdump looks up the user it runs as (-Z root).
	mkdir -p "$root/etc"
	echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
	echo 'root:x:0:' >"$root/etc/group"
	# The Python modules the scenarios and the seeds import, as the host's
	# Python loads them (with site, encodings and the compiled .pyc).
	mods=$("$PY" -c 'import sys, socket, hashlib, os, struct, time, select
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None) or ""
    if f.startswith("/usr/lib/python3.11/"): print(f)')
	solibs=()
	for f in $mods; do
		mkdir -p "$root$(dirname "$f")"
		cp "$f" "$root$f"
		case $f in *.so) solibs+=("$f") ;; esac
		c=$(dirname "$f")/__pycache__/$(basename "${f%.py}").cpython-311.pyc
		if [ -f "$c" ]; then
			mkdir -p "$root$(dirname "$c")"
			cp "$c" "$root$c"
		fi
	done
	# Python finds its prefix by this landmark; lib-dynload must exist.
	mkdir -p "$root/usr/lib/python3.11/lib-dynload"
	# The shared libraries of every program, by ldd, with the loader.
	for b in /usr/sbin/ip "${BINS[@]}" "${solibs[@]}"; do
		ldd "$b" | awk '/=> \// { print $3 } /^\t\/lib/ { print $1 }'
	done | sort -u | while read -r lib; do
		mkdir -p "$root$(dirname "$lib")"
		cp -L "$lib" "$root$lib"
	done
	# The seeds' programs: Python as they are, C built statically for the
	# CIDs the scenarios give them (the server binds any CID, as a guest
	# server must; the clients reach the sibling or the host).
	install -m 755 "$seeds/server.py" "$root/usr/lib/scenarios/seed-server.py"
	install -m 755 "$seeds/client.py" "$root/usr/lib/scenarios/seed-client.py"
	port=9999
	gcc -static -O2 -w -DSEED_CID=VMADDR_CID_ANY -DSEED_PORT=$port \
		-o "$root/usr/bin/seed-server" "$seeds/server.c"
	for cid in 2 3 4; do
		gcc -static -O2 -w -DSEED_CID=$cid -DSEED_PORT=$port \
			-o "$root/usr/bin/seed-client-$cid" "$seeds/client.c"
	done
	strip "$root"/usr/bin/seed-*
	(cd "$root" && find . | cpio -o -H newc --quiet) >"$ucpio.tmp"
	mv "$ucpio.tmp" "$ucpio"
	echo "$ukey" >"$ucpio.key"
	rm -rf "$root"
	trap - EXIT
	msg "scenarios userland: $ucpio ($(du -h "$ucpio" | cut -f1))"
fi

# The modules of this kernel: vhost_vsock (H2G) with what it needs, vsockmon.
mods=()
for m in vhost_iotlb vhost vhost_vsock vsockmon; do
	f=$(find "$kdir/drivers" -name "$m.ko" | head -1)
	[ -n "$f" ] || die "$m.ko missing in $kdir: are CONFIG_VHOST_VSOCK=m and CONFIG_VSOCKMON=m set (tools/kernel/base.config)?"
	mods+=("$f")
done
img=$CACHE/initramfs/scenarios-$name.cpio
key=$(inputs_hash "$0" "$ucpio.key" "${mods[@]}")
if [ "$(cat "$img.key" 2>/dev/null)" = "$key" ] && [ -f "$img" ]; then
	msg "scenarios initramfs $name is up to date ($img)"
	exit 0
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/lib/modules"
cp "${mods[@]}" "$root/lib/modules/"
strip --strip-debug "$root"/lib/modules/*.ko
{
	cat "$ucpio"
	(cd "$root" && find . | cpio -o -H newc --quiet)
} >"$img.tmp"
mv "$img.tmp" "$img"
echo "$key" >"$img.key"
msg "scenarios initramfs $name: $img ($(du -h "$img" | cut -f1))"
