#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Write the driver as a patch series against Linux 7.3 (git format-patch,
# with a cover letter) into $CACHE/patches/series, then check it: every
# patch passes scripts/checkpatch.pl --strict, the series applies to 7.3's
# own files, and the driver it adds builds against the 7.3 debug kernel.
#
#   0001 vsock/virtio: add virtio_vsock_rs, a virtio transport in Rust
#        (the driver as 7.3 sees it, tools/kcfg.py, and a MAINTAINERS entry)
#   0002 vsock/virtio: build virtio_vsock_rs (Kconfig and Makefile hooks)
#   0003 Documentation: networking: add virtio_vsock_rs
#
# checkpatch asks every patch that adds files to touch MAINTAINERS, so the
# entry comes with the driver and the documentation adds its own F: line.
set -euo pipefail
export KERNEL=7.3
. "$(dirname "$0")/lib.sh"

[ -f "$KSRC/scripts/checkpatch.pl" ] || die "no 7.3 source in $KSRC: run 'make setup KERNEL=7.3'"
work=$CACHE/patches
out=$work/series
ver=$(cat "$KSRC/.vsock-rs-source")
name=$(git -C "$TOP" config user.name || echo "virtio_vsock_rs authors")
email=$(git -C "$TOP" config user.email || echo "nobody@example.org")
touched=(net/vmw_vsock/Kconfig net/vmw_vsock/Makefile MAINTAINERS Documentation/networking/index.rst)

# The pristine 7.3 files the series touches (intree.sh edits the unpacked tree).
pristine=$work/pristine-$ver
if [ ! -f "$pristine/.done" ]; then
	msg "extracting ${touched[*]} from $KSRC_TAR"
	rm -rf "$pristine" && mkdir -p "$pristine"
	tar -C "$pristine" --strip-components=1 -xf "$KSRC_TAR" \
		"${touched[@]/#/$KVER_PKG/}"
	touch "$pristine/.done"
fi

repo=$work/repo
rm -rf "$repo" "$out"
mkdir -p "$repo" "$out"
g() { git -C "$repo" -c user.name="$name" -c user.email="$email" "$@"; }
g init -q -b virtio-vsock-rs
for f in "${touched[@]}"; do
	mkdir -p "$repo/$(dirname "$f")"
	cp "$pristine/$f" "$repo/$f"
done
g add -A && g commit -q -m "Linux $ver (the files the series touches)"

# 1: the driver, resolved for 7.3, and its MAINTAINERS entry.
drv=net/vmw_vsock/virtio_vsock_rs
mapfile -t files < <(cd "$TOP" && printf '%s\n' Kbuild Kconfig src/*.rs src/*.c src/*.h src/protocol/*.rs |
	grep -v '_generated\.rs$')
"$TOP/tools/kcfg.py" --kernel 7.3 --out "$repo/$drv" "${files[@]}"
python3 - "$repo/MAINTAINERS" "$name <$email>" <<'EOF'
import sys
path, who = sys.argv[1], sys.argv[2]
entry = f"""VIRTIO VSOCK DRIVER IN RUST
M:	{who}
L:	virtualization@lists.linux.dev
L:	netdev@vger.kernel.org
L:	rust-for-linux@vger.kernel.org
S:	Maintained
F:	net/vmw_vsock/virtio_vsock_rs/

"""
text = open(path).read()
# Sections are sorted by title; insert before the first title after ours.
lines = text.split("\n")
title = entry.split("\n")[0]
start = next(i for i, l in enumerate(lines) if l.startswith("VIRTIO "))
i = start
while i < len(lines):
    if lines[i] and lines[i - 1] == "" and lines[i].isupper() and lines[i] > title:
        break
    i += 1
lines[i:i] = entry.rstrip("\n").split("\n") + [""]
open(path, "w").write("\n".join(lines))
EOF
g add -A
g commit -q -s -F - <<'EOF'
vsock/virtio: add virtio_vsock_rs, a virtio transport in Rust

Add virtio_vsock_rs, a guest driver for the virtio socket device (virtio
device ID 19) written in Rust. It does what virtio_transport.c does: it
binds the device, owns its rx, tx and event virtqueues and registers as
the guest-to-host transport of AF_VSOCK, reusing virtio_transport_common
for the socket protocol, exactly as the C driver does. It follows the C
driver's 7.3 behaviour: global network namespace mode only, event
buffers added with virtqueue_add_inbuf_cache_clean(), a WQ_PERCPU
workqueue.

The crate has four layers. Generated bindings and C helpers for static
inline functions; abstractions (virtio device, virtqueues and driver
registration; socket buffers; the virtio_transport ops table), where
every unsafe block is; the driver, which has none; and the protocol
(header parsing, validation of every used rx buffer before anything
trusts it, flow-control arithmetic), plain core Rust with no kernel
dependency. Rejected packets are counted; the counters are in debugfs
and in sysfs under the device.

Only one of VIRTIO_VSOCKETS and VIRTIO_VSOCKETS_RUST can drive a device:
both bind the same device ID and there is one G2H transport.
EOF

# 2: the Kconfig and Makefile hooks.
awk '{ print } /^config VIRTIO_VSOCKETS_COMMON$/ { hook = 1 }
	hook && /^$/ && !done { print "source \"net/vmw_vsock/virtio_vsock_rs/Kconfig\"\n"; done = 1 }' \
	"$repo/net/vmw_vsock/Kconfig" >"$repo/Kconfig.tmp"
mv "$repo/Kconfig.tmp" "$repo/net/vmw_vsock/Kconfig"
grep -q virtio_vsock_rs "$repo/net/vmw_vsock/Kconfig" || die "no place for the Kconfig hook in net/vmw_vsock/Kconfig"
awk '{ print } /^obj-\$\(CONFIG_VIRTIO_VSOCKETS\) \+=/ { print "obj-$(CONFIG_VIRTIO_VSOCKETS_RUST) += virtio_vsock_rs/" }' \
	"$repo/net/vmw_vsock/Makefile" >"$repo/Makefile.tmp"
mv "$repo/Makefile.tmp" "$repo/net/vmw_vsock/Makefile"
grep -q virtio_vsock_rs "$repo/net/vmw_vsock/Makefile" || die "no place for the Makefile hook in net/vmw_vsock/Makefile"
g add -A
g commit -q -s -F - <<'EOF'
vsock/virtio: build virtio_vsock_rs

Offer VIRTIO_VSOCKETS_RUST beside VIRTIO_VSOCKETS in the vsock menu and
build net/vmw_vsock/virtio_vsock_rs/ when it is set. It depends on RUST
and selects VIRTIO_VSOCKETS_COMMON, as the C driver does.
EOF

# 3: the documentation.
doc=Documentation/networking/virtio_vsock_rs.rst
cp "$TOP/tools/patches/virtio_vsock_rs.rst" "$repo/$doc"
python3 - "$repo/Documentation/networking/index.rst" <<'EOF'
import sys
path = sys.argv[1]
lines = open(path).read().split("\n")
# Into the toctree, in its alphabetical order.
start = next(i for i, l in enumerate(lines) if l.strip().startswith(".. toctree::"))
i = start + 1
while i < len(lines) and (lines[i].startswith("   ") or lines[i] == ""):
    entry = lines[i].strip()
    if entry and not entry.startswith(":") and entry > "virtio_vsock_rs":
        break
    i += 1
lines.insert(i, "   virtio_vsock_rs")
open(path, "w").write("\n".join(lines))
EOF
sed -i 's|^F:\tnet/vmw_vsock/virtio_vsock_rs/$|F:\tDocumentation/networking/virtio_vsock_rs.rst\n&|' "$repo/MAINTAINERS"
g add -A
g commit -q -s -F - <<'EOF'
Documentation: networking: add virtio_vsock_rs

Describe the Rust virtio vsock transport: what it shares with the C
driver, how it is layered, how it validates what the device hands it,
and where its counters are.
EOF

g config branch.virtio-vsock-rs.description "$(cat <<'EOF'
vsock/virtio: a virtio transport in Rust

This series adds virtio_vsock_rs, a Rust driver for the virtio socket
device that does what net/vmw_vsock/virtio_transport.c does, on top of
virtio_transport_common, and that a distribution can build with
CONFIG_VIRTIO_VSOCKETS_RUST instead of CONFIG_VIRTIO_VSOCKETS.

The kernel crate has no virtio and no sk_buff abstraction yet, so the
driver carries small ones of its own, shaped like the upstream bus
abstractions (a Driver trait, a Registration that unregisters on drop,
virtqueues typed by the token that owns each buffer); it uses the kernel
crate's workqueue, Mutex::try_lock, RCU guards and debugfs scopes. It
generates its own bindings for the headers rust/bindings does not reach;
moving those into rust/bindings and rust/helpers is the obvious next
step if the driver is wanted.

Tested under QEMU (TCG, KASAN, lockdep, kmemleak) with two sibling guests
on a vhost-user device: tools/testing/vsock/vsock_test passes 41 of 41
and vsock_diag_test 3 of 3 between the Rust driver and the C one in both
roles, and between two Rust drivers.
EOF
)"
g format-patch -q --cover-letter --cover-from-description=subject -o "$out" HEAD~3
msg "series written to $out:"
ls "$out" >&2

# checkpatch --strict on every patch.
bad=0
for p in "$out"/000[1-9]-*.patch; do
	if ! (cd "$KSRC" && scripts/checkpatch.pl --strict --quiet "$p") >"$p.checkpatch" 2>&1; then
		bad=1
	fi
	if [ -s "$p.checkpatch" ]; then
		cat "$p.checkpatch" >&2
		bad=1
	fi
done
[ "$bad" = 0 ] || die "checkpatch --strict found problems (above)"
msg "checkpatch --strict: no error, no warning, no check"

# The series applies to 7.3's own files, and the driver it adds builds.
tree=$work/tree
rm -rf "$tree"
mkdir -p "$tree"
for f in "${touched[@]}"; do
	mkdir -p "$tree/$(dirname "$f")"
	cp "$pristine/$f" "$tree/$f"
done
git -C "$tree" apply --whitespace=error-all "$out"/000[1-9]-*.patch ||
	die "the series does not apply to Linux $ver"
msg "the series applies to Linux $ver"
kdir=$CACHE/kernel/$(kname debug)
if [ -f "$kdir/Module.symvers" ]; then
	make -s -C "$kdir" "${KMAKE_FLAGS[@]}" M="$tree/$drv" CONFIG_VIRTIO_VSOCKETS_RUST=m \
		KCFLAGS=-Werror modules ||
		die "the driver of the series does not build against $kdir"
	msg "the series' driver builds against $kdir: $tree/$drv/virtio_vsock_rs.ko"
else
	msg "note: no built 7.3 debug kernel in $kdir: build check skipped ('make kernel KERNEL=7.3')"
fi
echo "patches: $(ls "$out"/*.patch | wc -l) files in $out"
