#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Package what changes with the project's own code into a small cpio archive
# that the runner appends to the guest initramfs: the samples and, when it
# has been built, the Rust module. FLAVOUR is one of KERNEL (tools/lib.sh).
#
# Usage: tools/build-extras.sh FLAVOUR [MODULE.ko]
set -euo pipefail
. "$(dirname "$0")/lib.sh"

flavour=${1:-debug}
ko=${2:-}
out=$CACHE/initramfs/extras-$(kname "$flavour").cpio
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/lib/modules"
VSOCK_RS_CACHE=$CACHE "$TOP/samples/build.sh" "$root/bin" >/dev/null
if [ -n "$ko" ]; then
	[ -f "$ko" ] || die "module $ko not found: build it with 'make module'"
	cp "$ko" "$root/lib/modules/virtio_vsock_rs.ko"
fi
(cd "$root" && find . | cpio -o -H newc --quiet) >"$out.tmp"
mv "$out.tmp" "$out"
msg "extras for $KERNEL $flavour: $out${ko:+ (with $(basename "$ko"))}"
