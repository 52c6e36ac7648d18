#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Install everything the test bed needs on Debian 12 for KERNEL (6.12 or 7.3,
# see tools/lib.sh), and unpack its source into the cache; the source of
# TESTS_KERNEL too, whose vsock_test every bed runs. Idempotent: a second run
# checks versions and returns in seconds.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

# rustc-web and bindgen 0.73.2 serve both 6.12 and 7.3; the LLVM is KERNEL's.
DEB_PKGS=(rustc-web rust-web-src "${KLLVM_PKGS[@]}"
	flex bison bc libelf-dev libssl-dev cpio xz-utils qemu-system-x86
	busybox-static kmod make gcc libc6-dev python3 rsync file
	rust-web-clippy python3-matplotlib linux-perf)
BINDGEN_VERSION=0.73.2

# The kernel source packages and the suites they come from.
src_vers=("$KERNEL")
if [ "$TESTS_KERNEL" != "$KERNEL" ]; then src_vers+=("$TESTS_KERNEL"); fi
src_pkgs=() suites=()
for v in "${src_vers[@]}"; do
	kernel_pkg "$v"
	src_pkgs+=("$KVER_PKG")
	if [ -n "$KSUITE" ]; then suites+=("$KSUITE:$KVER_PKG"); fi
done
kernel_pkg "$KERNEL"

# A kernel source from another suite (linux-source-7.3 from trixie-backports)
# comes through an apt source of its own, pinned so that only that package
# can come from there: -1 for every other package of the suite, 100 for it
# (below the host's 500), so nothing else on the host moves.
add_suite() {
	local suite=$1 pkg=$2 mirror
	local list=/etc/apt/sources.list.d/vsock-rs-$suite.sources
	local pin=/etc/apt/preferences.d/vsock-rs-$suite
	mirror=${VSOCK_RS_DEBIAN_MIRROR:-$(host_mirror | head -1)}
	[ -n "$mirror" ] || die "no Debian mirror found in /etc/apt/sources.list*: set VSOCK_RS_DEBIAN_MIRROR=http://.../debian"
	msg "adding apt source $suite ($mirror), pinned to $pkg only"
	cat >"$pin" <<-PIN
		# virtio_vsock_rs (tools/setup.sh): only $pkg from $suite.
		Package: $pkg
		Pin: release n=$suite
		Pin-Priority: 100

		Package: *
		Pin: release n=$suite
		Pin-Priority: -1
	PIN
	cat >"$list" <<-LIST
		# virtio_vsock_rs (tools/setup.sh): $pkg, pinned in $pin.
		Types: deb
		URIs: ${mirror%/}
		Suites: $suite
		Components: main
		Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
	LIST
	# Only this source's index is fetched; the host's lists stay as they are.
	apt-get update -q -o Dir::Etc::SourceList="$list" \
		-o Dir::Etc::SourceParts=- -o APT::Get::List-Cleanup=0 >/dev/null ||
		die "apt-get update of $suite from $mirror failed: does the mirror serve $suite?"
}

mapfile -t missing < <(missing_debs "${DEB_PKGS[@]}" "${src_pkgs[@]}")
if [ ${#missing[@]} -gt 0 ]; then
	need_root_for_debs "${missing[@]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >/dev/null || die "apt-get update failed: check the Debian mirror in /etc/apt/sources.list"
	for s in "${suites[@]+"${suites[@]}"}"; do
		if [[ " ${missing[*]} " == *" ${s#*:} "* ]]; then add_suite "${s%%:*}" "${s#*:}"; fi
	done
	apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
		die "apt-get install ${missing[*]} failed (bookworm has linux-source-6.12 and rustc-web in bookworm-updates/security, trixie-backports linux-source-7.3)"
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

# Unpacked kernel sources, each shared by its guest kernel flavours.
for pkg in "${src_pkgs[@]}"; do
	src=$CACHE/src/$pkg
	stamp=$src/.vsock-rs-source
	want=$(dpkg-query -W -f='${Version}' "$pkg")
	if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
		msg "unpacking /usr/src/$pkg.tar.xz ($want)"
		rm -rf "$src"
		mkdir -p "$CACHE/src"
		tar -C "$CACHE/src" -xf "/usr/src/$pkg.tar.xz"
		echo "$want" >"$stamp"
	fi
done

if [ -e /dev/kvm ]; then
	msg "note: /dev/kvm present; the test bed uses TCG anyway (kvm-pvm hosts do not run stock guests)"
fi
msg "setup complete for Linux $KERNEL (cache: $CACHE)"
