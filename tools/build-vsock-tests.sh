#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Build vsock_test, vsock_perf and vsock_diag_test from the newest kernel's
# source (TESTS_KERNEL, tools/lib.sh) against the uapi headers of KERNEL, the
# bed's own kernel, statically linked for the guest initramfs, into
# $VSOCK_TESTS_BIN (tools/lib.sh).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ -f "$KSRC/Makefile" ] || die "kernel source missing in $KSRC: run 'make setup KERNEL=$KERNEL' first"
[ -d "$TESTS_KSRC/tools/testing/vsock" ] || die "vsock tests missing in $TESTS_KSRC: run 'make setup KERNEL=$KERNEL' first"
out=$CACHE/vsock-tests/build-$KERNEL bin=$VSOCK_TESTS_BIN
key=$(inputs_hash "$0" "$KERNEL" "$(cat "$KSRC/.vsock-rs-source")" \
	"$(cat "$TESTS_KSRC/.vsock-rs-source")" "$(gcc --version | head -1)")
if [ "$(cat "$bin/.vsock-rs-key" 2>/dev/null)" = "$key" ] && [ -x "$bin/vsock_test" ]; then
	msg "vsock tests ($TESTS_KERNEL, $KERNEL headers) are up to date ($bin)"
	exit 0
fi
msg "building static vsock_test, vsock_perf, vsock_diag_test of $TESTS_KERNEL with $KERNEL's uapi headers"
rm -rf "$out" "$bin"
mkdir -p "$out" "$bin"
# The bed's uapi headers (the host's glibc ships older ones); tools/include
# of the tests' own tree.
make -s -C "$KSRC" O="$out/hdr-build" ARCH=x86 headers_install INSTALL_HDR_PATH="$out/hdr" >/dev/null
cp -r "$TESTS_KSRC/tools/testing/vsock" "$out/build"
make -s -C "$out/build" -j"$(jobs)" CC=gcc LDFLAGS=-static \
	CFLAGS="-g -O2 -Wall -I. -I$TESTS_KSRC/tools/include -I$out/hdr/include -Wno-pointer-sign -fno-strict-overflow -fno-strict-aliasing -fno-common -MMD -U_FORTIFY_SOURCE -D_GNU_SOURCE" \
	vsock_test vsock_perf vsock_diag_test
install -m 755 "$out/build/vsock_test" "$out/build/vsock_perf" "$out/build/vsock_diag_test" "$bin/"
rm -rf "$out"
echo "$key" >"$bin/.vsock-rs-key"
msg "vsock tests built in $bin ($("$bin/vsock_test" --list | grep -c '^[0-9]') tests)"
