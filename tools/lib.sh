# SPDX-License-Identifier: GPL-2.0
# Common settings for the test bed scripts; sourced, not run.

# Where every build artefact lives: outside the clone, shared between runs.
CACHE=${VSOCK_RS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/virtio_vsock_rs}
TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KVER_PKG=linux-source-6.12
KSRC_TAR=/usr/src/linux-source-6.12.tar.xz
KSRC=$CACHE/src/linux-source-6.12
# Debian's rustc-web matches the rust-src the kernel needs; rustup's does not.
KRUSTC=/usr/bin/rustc
BINDGEN=$CACHE/cargo/bin/bindgen
KMAKE_FLAGS=(LLVM=1 "RUSTC=$KRUSTC" "BINDGEN=$BINDGEN")

msg() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Hash of files and strings, for cache keys.
inputs_hash() {
	{
		for f in "$@"; do
			if [ -f "$f" ]; then cat "$f"; else printf '%s\n' "$f"; fi
		done
	} | sha256sum | cut -c1-16
}

jobs() { nproc 2>/dev/null || echo 2; }
