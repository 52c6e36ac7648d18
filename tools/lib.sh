# SPDX-License-Identifier: GPL-2.0
# Common settings for the test bed scripts; sourced, not run.

# Where every build artefact lives: outside the clone, shared between runs.
CACHE=${VSOCK_RS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/virtio_vsock_rs}
TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

msg() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The guest kernel: KERNEL=6.12 (default, Debian 12's linux-source-6.12) or
# KERNEL=7.3 (linux-source-7.3 from trixie-backports). To add a kernel: a
# case in kernel_pkg, a "kernel_X_Y" cfg in Kbuild if the driver needs one,
# and fragments tools/kernel/<flavour>-X.Y.config for options that moved.
#
# kernel_pkg VERSION sets, for that kernel:
#   KVER_PKG   the Debian package holding /usr/src/$KVER_PKG.tar.xz
#   KSUITE     the apt suite it comes from (empty: the host's own)
#   KLLVM      LLVM= of the kernel build: 1 for clang, -19 for clang-19
#   KLLVM_PKGS the LLVM packages KLLVM needs
#   KLIBCLANG  the libclang bindgen must load, the one of KLLVM's clang
kernel_pkg() {
	case "$1" in
	6.12)
		# libclang 14 too: once 7.3's libclang 19 is installed, bindgen
		# would load it by default, and it rejects the flags 6.12 gives
		# clang 14 (-enable-trivial-auto-var-init-zero-knowing-...).
		KVER_PKG=linux-source-6.12 KSUITE='' KLLVM=1
		KLIBCLANG=/usr/lib/llvm-14/lib
		KLLVM_PKGS=(clang lld llvm libclang-dev) ;;
	7.3)
		# LLVM >= 17 (scripts/min-tool-version.sh): bookworm's clang-19.
		KVER_PKG=linux-source-7.3 KSUITE=trixie-backports KLLVM=-19
		KLIBCLANG=/usr/lib/llvm-19/lib
		KLLVM_PKGS=(clang-19 lld-19 llvm-19 libclang1-19) ;;
	*) die "unknown KERNEL=$1: use 6.12 or 7.3" ;;
	esac
}
KERNEL=${KERNEL:-6.12}
kernel_pkg "$KERNEL"
KSRC_TAR=/usr/src/$KVER_PKG.tar.xz
KSRC=$CACHE/src/$KVER_PKG
# vsock_test and friends come from the newest kernel's source on every bed,
# built against each bed's own uapi headers.
TESTS_KERNEL=7.3
TESTS_KSRC=$CACHE/src/linux-source-$TESTS_KERNEL
# Debian's rustc-web matches the rust-src the kernel needs; rustup's does not.
KRUSTC=/usr/bin/rustc
BINDGEN=$CACHE/cargo/bin/bindgen
KMAKE_FLAGS=("LLVM=$KLLVM" "RUSTC=$KRUSTC" "BINDGEN=$BINDGEN")
# bindgen loads libclang at run time; the kernel checks its version too.
if [ -n "$KLIBCLANG" ]; then export LIBCLANG_PATH=$KLIBCLANG; fi

# kname FLAVOUR: the name of a guest kernel flavour of $KERNEL in the cache
# ($CACHE/kernel/NAME, $CACHE/initramfs/NAME.cpio): 6.12's keep the bare
# flavour (debug, perf), other kernels' carry the version (7.3-debug).
kname() {
	if [ "$KERNEL" = 6.12 ]; then echo "$1"; else echo "$KERNEL-$1"; fi
}
# The vsock tests built against $KERNEL's uapi headers, named as kernels are:
# $CACHE/vsock-tests/bin for 6.12, $CACHE/vsock-tests/7.3-bin for 7.3.
VSOCK_TESTS_BIN=$CACHE/vsock-tests/$(kname bin)

# Hash of files and strings, for cache keys.
inputs_hash() {
	{
		for f in "$@"; do
			if [ -f "$f" ]; then cat "$f"; else printf '%s\n' "$f"; fi
		done
	} | sha256sum | cut -c1-16
}

# missing_debs PKG...: print the packages that are not installed.
missing_debs() {
	local p
	for p; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
			printf '%s\n' "$p"
	done
}

# need_root_for_debs PKG...: installing PKG... needs root; say so and stop
# if we are not, else announce it.
need_root_for_debs() {
	[ "$(id -u)" = 0 ] || die "missing Debian packages: $*; run as root or: sudo apt-get install $*"
	msg "installing Debian packages: $*"
}

jobs() { nproc 2>/dev/null || echo 2; }

# The first Debian archive the host's apt sources list for its own release
# (one-line and deb822 formats).
host_mirror() {
	local codename
	codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
	[ -n "$codename" ] || return 0
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -f "$f" ] || continue
		sed -E 's/\[[^]]*\]//' "$f" |
			awk -v c="$codename" '$1 == "deb" && $3 == c { print $2; exit }'
	done
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		awk -v c="$codename" '
			/^[ \t]*$/ { if (uri != "" && ok) { print uri; exit } uri = ""; ok = 0 }
			tolower($1) == "uris:" { uri = $2 }
			tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == c) ok = 1 }
			END { if (uri != "" && ok) print uri }' "$f"
	done
}
