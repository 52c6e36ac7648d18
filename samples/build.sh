#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Build the samples as static x86_64 binaries, for a busybox initramfs.
#
# Usage: samples/build.sh OUTDIR
#
# Uses the x86_64-unknown-linux-gnu target with a statically linked glibc
# (-C target-feature=+crt-static, non-PIE with -C relocation-model=static),
# since no musl target can be installed here.
# The samples need no NSS lookups, so static glibc is fine for them.
# Environment: CACHE (default $HOME/.cache/virtio_vsock_rs) holds the target dir.

set -euo pipefail

if [ $# -ne 1 ]; then
	echo "usage: $0 OUTDIR" >&2
	exit 2
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$1
cache=${VSOCK_RS_CACHE:-${CACHE:-$HOME/.cache/virtio_vsock_rs}}
target_dir=$cache/target/samples-static
triple=x86_64-unknown-linux-gnu

# --target keeps RUSTFLAGS away from build scripts and proc macros.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static -C relocation-model=static" \
	cargo build --release --locked \
	--manifest-path "$here/Cargo.toml" \
	--target "$triple" \
	--target-dir "$target_dir"

mkdir -p "$out"
for bin in vsock-echo; do
	install -m 0755 "$target_dir/$triple/release/$bin" "$out/$bin"
	# Refuse to hand out a dynamically linked binary: it would not run in
	# the initramfs.
	if command -v file >/dev/null; then
		if ! file -L "$out/$bin" | grep -q 'statically linked\|static-pie linked'; then
			echo "build.sh: $out/$bin is not statically linked:" >&2
			file -L "$out/$bin" >&2
			exit 1
		fi
	elif command -v readelf >/dev/null; then
		if readelf -l "$out/$bin" | grep -q INTERP; then
			echo "build.sh: $out/$bin has a program interpreter" >&2
			exit 1
		fi
	else
		echo "build.sh: warning: neither file nor readelf, linkage not checked" >&2
	fi
	echo "$out/$bin"
done
