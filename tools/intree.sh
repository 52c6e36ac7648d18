#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Places the virtio_vsock_rs sources into a kernel source tree, so that it
# builds in tree with CONFIG_VIRTIO_VSOCKETS_RUST=m or =y:
#
#   net/vmw_vsock/virtio_vsock_rs/{Kbuild,Kconfig,src/...}
#   net/vmw_vsock/Kconfig:  source "net/vmw_vsock/virtio_vsock_rs/Kconfig"
#   net/vmw_vsock/Makefile: obj-$(CONFIG_VIRTIO_VSOCKETS_RUST) += virtio_vsock_rs/
#
# Idempotent. Files are replaced, never written in place, so that a tree
# whose files are hard links (cp -al) is not changed behind its back.
#
# Usage: tools/intree.sh KSRC
#        tools/intree.sh --list-inputs   (the source files it copies)
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)

inputs() {
	(cd "$top" && printf '%s\n' Kbuild Kconfig src/*.rs src/*.c src/*.h src/protocol/*.rs) |
		grep -v '_generated\.rs$' | sort
}

if [ "${1:-}" = "--list-inputs" ]; then
	inputs | sed "s|^|$top/|"
	echo "$top/tools/intree.sh"
	exit 0
fi

ksrc=${1:?usage: $0 KSRC | --list-inputs}
[ -f "$ksrc/net/vmw_vsock/Kconfig" ] || { echo "$0: $ksrc is not a kernel tree" >&2; exit 1; }

dst=$ksrc/net/vmw_vsock/virtio_vsock_rs
rm -rf "$dst.tmp"
mkdir -p "$dst.tmp"
inputs | while read -r f; do
	mkdir -p "$dst.tmp/$(dirname "$f")"
	cp "$top/$f" "$dst.tmp/$f"
done
rm -rf "$dst"
mv "$dst.tmp" "$dst"

# Appends LINE to FILE unless present, replacing the file.
add_line() {
	local file=$1 line=$2
	grep -qxF "$line" "$file" && return 0
	{ cat "$file"; printf '%s\n' "$line"; } >"$file.tmp"
	mv "$file.tmp" "$file"
}
add_line "$ksrc/net/vmw_vsock/Kconfig" 'source "net/vmw_vsock/virtio_vsock_rs/Kconfig"'
add_line "$ksrc/net/vmw_vsock/Makefile" 'obj-$(CONFIG_VIRTIO_VSOCKETS_RUST) += virtio_vsock_rs/'
