#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Fail if a symbol of the module is too long for one line of /proc/kallsyms
# as programs read it: "<16 hex> <type> <name>\t[virtio_vsock_rs]\n" must fit
# a KSYM_NAME_LEN (512) buffer with fgets(), as in vsock_test's
# get_transports(). That leaves 511 - 38 = 473 characters for the name.
#
# Usage: tools/ksym-len.sh MODULE.ko

set -euo pipefail
ko=${1:?usage: $0 MODULE.ko}
mod=$(basename "$ko" .ko)
max=$((511 - 16 - 3 - 1 - ${#mod} - 2 - 1))
nm --defined-only "$ko" | awk -v max="$max" '
	{ n = length($NF); if (n > longest) { longest = n; name = $NF } }
	n > max { bad++ }
	END {
		if (bad) {
			printf "ksym-len: %d symbol(s) longer than %d characters, the longest (%d): %s\n", bad, max, longest, name
			print "ksym-len: /proc/kallsyms lines would overflow KSYM_NAME_LEN buffers; keep -Csymbol-mangling-version=legacy in Kbuild"
			exit 1
		}
		printf "ksym-len: longest symbol %d characters (limit %d)\n", longest, max
	}'
