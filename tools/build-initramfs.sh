#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Build the guest initramfs for a kernel flavour of KERNEL (tools/lib.sh):
# busybox, the guest init, the static vsock tests built against that
# kernel's uapi headers and the vsock modules of that kernel. The Rust
# module and the samples are added as a second archive by the runner, so
# that rebuilding them does not rebuild this one.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

flavour=${1:-debug}
name=$(kname "$flavour")
kdir=$CACHE/kernel/$name
[ -f "$kdir/arch/x86/boot/bzImage" ] || die "no $KERNEL $flavour kernel in $kdir: run 'make kernel KERNEL=$KERNEL' first"
tests=$VSOCK_TESTS_BIN
[ -x "$tests/vsock_test" ] || die "no vsock tests in $tests: run 'KERNEL=$KERNEL tools/build-vsock-tests.sh'"

# The common layer is built in when vsock loopback is: then only one module.
mods=()
for m in vmw_vsock_virtio_transport vmw_vsock_virtio_transport_common; do
	f=$(find "$kdir/net/vmw_vsock" -name "$m.ko" | head -1)
	if [ -n "$f" ]; then mods+=("$f"); fi
done
[ ${#mods[@]} -gt 0 ] || die "vmw_vsock_virtio_transport.ko missing in $kdir: is CONFIG_VIRTIO_VSOCKETS=m?"

img=$CACHE/initramfs/$name.cpio
key=$(inputs_hash "$0" "$TOP/tools/guest/init" /bin/busybox "${mods[@]}" "$tests"/*)
if [ "$(cat "$img.key" 2>/dev/null)" = "$key" ] && [ -f "$img" ]; then
	msg "initramfs $name is up to date ($img)"
	exit 0
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc,lib/modules}
cp /bin/busybox "$root/bin/busybox"
install -m 755 "$TOP/tools/guest/init" "$root/init"
cp "$tests"/* "$root/bin/"
strip "$root"/bin/vsock_* 2>/dev/null || true
cp "${mods[@]}" "$root/lib/modules/"
mkdir -p "$(dirname "$img")"
(cd "$root" && find . | cpio -o -H newc --quiet) >"$img.tmp"
mv "$img.tmp" "$img"
echo "$key" >"$img.key"
msg "initramfs $name: $img ($(du -h "$img" | cut -f1))"
