#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Build vsock_test, vsock_perf and vsock_diag_test from the kernel source,
# statically linked for the guest initramfs, into $CACHE/vsock-tests/bin.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ -f "$KSRC/Makefile" ] || die "kernel source missing in $KSRC: run 'make setup' first"
out=$CACHE/vsock-tests
key=$(inputs_hash "$0" "$(cat "$KSRC/.vsock-rs-source")" "$(gcc --version | head -1)")
if [ "$(cat "$out/.vsock-rs-key" 2>/dev/null)" = "$key" ] && [ -x "$out/bin/vsock_test" ]; then
	msg "vsock tests are up to date ($out/bin)"
	exit 0
fi
msg "building static vsock_test, vsock_perf, vsock_diag_test"
rm -rf "$out"
mkdir -p "$out/bin"
# The 6.12 uapi headers (the host's glibc ships older ones).
make -s -C "$KSRC" O="$out/hdr-build" ARCH=x86 headers_install INSTALL_HDR_PATH="$out/hdr" >/dev/null
cp -r "$KSRC/tools/testing/vsock" "$out/build"
make -s -C "$out/build" -j"$(jobs)" CC=gcc LDFLAGS=-static \
	CFLAGS="-g -O2 -Wall -I. -I$KSRC/tools/include -I$out/hdr/include -Wno-pointer-sign -fno-strict-overflow -fno-strict-aliasing -fno-common -MMD -U_FORTIFY_SOURCE -D_GNU_SOURCE" \
	vsock_test vsock_perf vsock_diag_test
install -m 755 "$out/build/vsock_test" "$out/build/vsock_perf" "$out/build/vsock_diag_test" "$out/bin/"
echo "$key" >"$out/.vsock-rs-key"
msg "vsock tests built in $out/bin"
