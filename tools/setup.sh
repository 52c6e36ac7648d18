#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Install everything the test bed needs on Debian 12. Idempotent: a second run
# checks versions and returns in seconds.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

# KERNEL (tools/lib.sh) selects the kernel source and its LLVM; the rest
# serves every kernel. rustc-web and bindgen 0.73.2 serve both 6.12 and 7.3.
DEB_PKGS=(rustc-web rust-web-src "${KLLVM_PKGS[@]}"
	flex bison bc libelf-dev libssl-dev cpio xz-utils qemu-system-x86
	busybox-static kmod make gcc libc6-dev python3 rsync file
	rust-web-clippy)
BINDGEN_VERSION=0.73.2

# A kernel source from another suite (linux-source-7.3 from trixie-backports)
# comes through an apt source of its own, pinned so that only that package
# can come from there: -1 for every other package, 100 for it, below the
# host's 500, so nothing else on the host moves.
suite_list=/etc/apt/sources.list.d/vsock-rs-$KSUITE.sources
suite_pin=/etc/apt/preferences.d/vsock-rs-$KSUITE
add_suite() {
	local mirror
	mirror=${VSOCK_RS_DEBIAN_MIRROR:-$(host_mirror | head -1)}
	[ -n "$mirror" ] || die "no Debian mirror found in /etc/apt/sources.list*: set VSOCK_RS_DEBIAN_MIRROR=http://.../debian"
	msg "adding apt source $KSUITE ($mirror), pinned to $KVER_PKG only"
	cat >"$suite_pin" <<-PIN
		# virtio_vsock_rs (tools/setup.sh): only $KVER_PKG from $KSUITE.
		Package: $KVER_PKG
		Pin: release n=$KSUITE
		Pin-Priority: 100

		Package: *
		Pin: release n=$KSUITE
		Pin-Priority: -1
	PIN
	cat >"$suite_list" <<-LIST
		# virtio_vsock_rs (tools/setup.sh): $KVER_PKG, pinned in $suite_pin.
		Types: deb
		URIs: ${mirror%/}
		Suites: $KSUITE
		Components: main
		Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
	LIST
	# Only this source's index is fetched; the host's lists stay as they are.
	apt-get update -q -o Dir::Etc::SourceList="$suite_list" \
		-o Dir::Etc::SourceParts=- -o APT::Get::List-Cleanup=0 >/dev/null ||
		die "apt-get update of $KSUITE from $mirror failed: does the mirror serve $KSUITE?"
}

missing=()
for p in "${DEB_PKGS[@]}" "$KVER_PKG"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
		missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	[ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}"
	msg "installing Debian packages: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >/dev/null || die "apt-get update failed: check the Debian mirror in /etc/apt/sources.list"
	if [ -n "$KSUITE" ] && [[ " ${missing[*]} " == *" $KVER_PKG "* ]]; then
		add_suite
	fi
	apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
		die "apt-get install ${missing[*]} failed (bookworm has linux-source-6.12 and rustc-web in bookworm-updates/security${KSUITE:+, $KVER_PKG is in $KSUITE})"
fi

command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs) or 'apt-get install cargo'"
[ -x "$KRUSTC" ] || die "$KRUSTC missing: apt-get install rustc-web rust-web-src"
"$KRUSTC" --version | grep -q '^rustc 1\.9[0-9]' || die "$KRUSTC is $("$KRUSTC" --version), want rustc-web 1.9x"

mkdir -p "$CACHE"
if ! { [ -x "$BINDGEN" ] && "$BINDGEN" --version | grep -q "$BINDGEN_VERSION"; }; then
	msg "cargo install bindgen-cli $BINDGEN_VERSION (about 75 s)"
	cargo install --locked --quiet --root "$CACHE/cargo" "bindgen-cli@$BINDGEN_VERSION" ||
		die "cargo install bindgen-cli failed: is crates.io reachable?"
fi

# Unpacked kernel source of $KERNEL, shared by its guest kernel flavours.
stamp=$KSRC/.vsock-rs-source
want=$(dpkg-query -W -f='${Version}' "$KVER_PKG")
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
	msg "unpacking $KSRC_TAR ($want)"
	rm -rf "$KSRC"
	mkdir -p "$CACHE/src"
	tar -C "$CACHE/src" -xf "$KSRC_TAR"
	echo "$want" >"$stamp"
fi

if [ -e /dev/kvm ]; then
	msg "note: /dev/kvm present; the test bed uses TCG anyway (kvm-pvm hosts do not run stock guests)"
fi
msg "setup complete for Linux $KERNEL (cache: $CACHE)"
