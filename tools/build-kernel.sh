#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Build a guest kernel flavour (debug, perf or builtin) of KERNEL (6.12 or 7.3, see
# tools/lib.sh) from Debian's linux-source-$KERNEL into $CACHE/kernel/NAME,
# NAME being the flavour for 6.12 and 7.3-<flavour> for 7.3. That directory
# is also the KDIR for out-of-tree modules. Rebuilt only when its inputs
# change.
#
# The fragments are tools/kernel/{base,<flavour>,rust-driver}.config, plus
# base-$KERNEL.config and <flavour>-$KERNEL.config where they exist, for
# options that moved in that kernel. VSOCK_RS_INTREE=0 leaves the Rust
# driver out of the kernel (for a tree it does not build on yet). The
# builtin flavour is debug with the Rust driver built in (builtin.config).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

flavour=${1:-debug}
case "$flavour" in
debug | perf | builtin) ;;
*) die "unknown kernel flavour '$flavour': use debug, perf or builtin" ;;
esac
[ -f "$KSRC/Makefile" ] || die "kernel source missing in $KSRC: run 'make setup' first"
[ -x "$BINDGEN" ] || die "bindgen missing at $BINDGEN: run 'make setup' first"

out=$CACHE/kernel/$(kname "$flavour")
frags=()
base_flavour=$flavour
[ "$flavour" = builtin ] && base_flavour=debug
for f in base "$base_flavour"; do
	frags+=("$TOP/tools/kernel/$f.config")
	if [ -f "$TOP/tools/kernel/$f-$KERNEL.config" ]; then
		frags+=("$TOP/tools/kernel/$f-$KERNEL.config")
	fi
done
# The in-tree copy of the Rust driver is part of the kernel's inputs.
# builtin.config asks for =y, rust-driver.config for =m.
intree=${VSOCK_RS_INTREE:-1}
driver_frag=rust-driver
if [ "$flavour" = builtin ]; then intree=1 driver_frag=builtin; fi
intree_inputs=()
if [ "$intree" = 1 ]; then
	frags+=("$TOP/tools/kernel/$driver_frag.config")
	mapfile -t intree_inputs < <("$TOP/tools/intree.sh" --list-inputs)
fi
key=$(inputs_hash "${frags[@]}" "$0" "$(cat "$KSRC/.vsock-rs-source" 2>/dev/null)" \
	"$(/usr/bin/rustc --version)" "$("$BINDGEN" --version)" "${KMAKE_FLAGS[*]}")
src_key=$(inputs_hash "${intree_inputs[@]+"${intree_inputs[@]}"}")

if [ "$(cat "$out/.vsock-rs-key" 2>/dev/null)" = "$key.$src_key" ] &&
	[ -f "$out/arch/x86/boot/bzImage" ]; then
	msg "kernel $KERNEL $flavour is up to date ($out)"
	exit 0
fi

if [ "$intree" = 1 ]; then
	"$TOP/tools/intree.sh" "$KSRC"
fi

mkdir -p "$out"
kmake() { make -s -C "$KSRC" O="$out" "${KMAKE_FLAGS[@]}" -j"$(jobs)" "$@"; }

if [ "$(cat "$out/.vsock-rs-config-key" 2>/dev/null)" != "$key" ]; then
	msg "configuring $KERNEL $flavour kernel (tinyconfig + ${frags[*]##*/})"
	kmake tinyconfig >/dev/null
	(cd "$KSRC" && ARCH=x86 scripts/kconfig/merge_config.sh -m -O "$out" \
		"$out/.config" "${frags[@]}" >"$out/merge.log")
	kmake olddefconfig
	# Every option the fragments ask for must have survived olddefconfig.
	bad=()
	while IFS= read -r line; do
		case "$line" in
		CONFIG_*=*)
			if ! grep -qx -- "$line" "$out/.config"; then bad+=("$line"); fi ;;
		"# CONFIG_"*" is not set")
			name=${line#\# }
			if grep -q "^${name%% *}=" "$out/.config"; then bad+=("$line"); fi ;;
		esac
	done < <(cat "${frags[@]}")
	[ ${#bad[@]} -eq 0 ] || die "kernel config lost: ${bad[*]} (see $out/.config; a dependency is missing)"
	echo "$key" >"$out/.vsock-rs-config-key"
fi

msg "building $KERNEL $flavour kernel in $out (about 7 minutes on 2 cores)"
start=$SECONDS
kmake bzImage modules
echo "$key.$src_key" >"$out/.vsock-rs-key"
msg "kernel $KERNEL $flavour built in $((SECONDS - start)) s"
