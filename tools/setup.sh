#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Install everything the test bed needs on Debian 12. Idempotent: a second run
# checks versions and returns in seconds.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

DEB_PKGS=(linux-source-6.12 rustc-web rust-web-src clang lld llvm libclang-dev
	flex bison bc libelf-dev libssl-dev cpio xz-utils qemu-system-x86
	busybox-static kmod make gcc libc6-dev python3 rsync file
	rust-web-clippy)
BINDGEN_VERSION=0.73.2

missing=()
for p in "${DEB_PKGS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
		missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	[ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}"
	msg "installing Debian packages: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >/dev/null || die "apt-get update failed: check the Debian mirror in /etc/apt/sources.list"
	apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
		die "apt-get install ${missing[*]} failed (bookworm has linux-source-6.12 and rustc-web in bookworm-updates/security)"
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

# Unpacked kernel source, shared by both guest kernel flavours.
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
msg "setup complete (cache: $CACHE)"
