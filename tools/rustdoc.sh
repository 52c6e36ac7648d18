#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Document the module with rustdoc, warnings as errors, as the kernel's
# `make rustdoc` documents its own crates: the flags are those the module
# was compiled with (its .cmd file from a `make module` build in MODDIR),
# minus what only the compiler takes, plus the kernel's rustdoc workaround.
#
# Usage: tools/rustdoc.sh KDIR MODDIR   (writes MODDIR/doc)
set -euo pipefail
. "$(dirname "$0")/lib.sh"

kdir=${1:?usage: $0 KDIR MODDIR}
moddir=${2:?usage: $0 KDIR MODDIR}
cmdfile=$moddir/src/.virtio_vsock_rs.o.cmd
[ -f "$cmdfile" ] || die "no $cmdfile: build the module first ('make module KERNEL=$KERNEL')"
cmd=$(sed -n 's/^savedcmd_[^ ]* := //p' "$cmdfile")
[ -n "$cmd" ] || die "no compile command in $cmdfile"

# The environment assignments, then the compiler and its arguments.
read -r -a words <<<"$cmd"
env=() args=() setenv= skip=
for w in "${words[@]}"; do
	if [ -n "$skip" ]; then
		skip=
	elif [ "$w" = --out-dir ]; then
		skip=1
	elif [ -n "$setenv" ]; then
		# rustc's --env-set X=Y is the environment for rustdoc.
		env+=("$w") setenv=
	elif [ "$w" = --env-set ]; then
		setenv=1
	elif [ ${#args[@]} -eq 0 ] && [[ "$w" == *=* ]] && [[ "$w" != -* ]]; then
		env+=("$w")
	elif [ ${#args[@]} -eq 0 ]; then
		args+=(rustdoc)
	else
		case "$w" in
		--emit=* | -Cembed-bitcode=* | -Clto=* | -W*clippy::* | -A*clippy::* | -D*clippy::*) ;;
		*) args+=("$w") ;;
		esac
	fi
done
# The quotes of -Zcrate-attr='feature(...)' were for the shell.
for i in "${!args[@]}"; do args[$i]=${args[$i]//\'/}; done
rm -rf "$moddir/doc"
# Relative paths are the kernel's (6.12) or the module's (7.3: Kbuild runs
# external module builds in their own directory).
cwd=$kdir
if [[ " $cmd " == *" src/virtio_vsock_rs.rs "* ]]; then cwd=$moddir; fi
(cd "$cwd" && env RUSTC_BOOTSTRAP=1 "${env[@]}" "${args[@]/#rustdoc/$(dirname "$KRUSTC")/rustdoc}" \
	-Dwarnings -Drustdoc::all -Arustdoc::private_doc_tests -Arustdoc::private_intra_doc_links \
	--document-private-items -Cunsafe-allow-abi-mismatch=fixed-x18 \
	--output "$moddir/doc") 2>&1 | tee "$moddir/rustdoc.log"
[ "${PIPESTATUS[0]}" = 0 ] || die "rustdoc failed or warned (see $moddir/rustdoc.log)"
msg "rustdoc clean on $KERNEL: $moddir/doc/virtio_vsock_rs/index.html"
