#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Fuzz the protocol layer's validate_rx for a bounded time.
#
# Usage: tools/protocol-tests/fuzz.sh [SECONDS]   (default 60)
#
# Installs cargo-fuzz from crates.io into $CACHE/cargo if it is missing and
# runs on the stable toolchain with RUSTC_BOOTSTRAP=1 (cargo-fuzz passes -Z
# flags). Exits non-zero if the fuzzer finds a crash; the crashing input is
# left in fuzz/artifacts/validate_rx/. Prints a final line
# "fuzz: validate_rx N execs in S s".
#
# Environment: CACHE (default $HOME/.cache/virtio_vsock_rs), FUZZ_JOBS
# (default 1), FUZZ_TARGET (default validate_rx).

set -euo pipefail

secs=${1:-60}
case $secs in
'' | *[!0-9]*)
	echo "usage: $0 [SECONDS]" >&2
	exit 2
	;;
esac

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${CACHE:-$HOME/.cache/virtio_vsock_rs}
target=${FUZZ_TARGET:-validate_rx}
jobs=${FUZZ_JOBS:-1}
export PATH="$cache/cargo/bin:$PATH"

if ! cargo fuzz --version >/dev/null 2>&1; then
	echo "fuzz: installing cargo-fuzz into $cache/cargo" >&2
	CARGO_TARGET_DIR="$cache/target/cargo-install" \
		cargo install --locked cargo-fuzz --root "$cache/cargo"
fi

cd "$here"
corpus="fuzz/corpus/$target"
mkdir -p "$corpus"

# A few seeds: one valid packet of each op, in the fuzz input layout (mode
# byte 0x07: used_len from the buffer, capacity = used_len, guest CID from the
# header), so that the accepting paths are covered from the start.
for op in 1 2 3 4 5 6 7; do
	seed="$corpus/seed-op$op"
	[ -e "$seed" ] && continue
	{
		printf '\x07'
		head -c 20 /dev/zero
		printf '\x02\0\0\0\0\0\0\0\x03\0\0\0\0\0\0\0'  # src_cid 2, dst_cid 3
		printf '\xd2\x04\0\0\x2e\x16\0\0'                # ports 1234, 5678
		if [ "$op" = 5 ]; then printf '\x04\0\0\0'; else printf '\0\0\0\0'; fi
		printf '\x01\0'                                  # type stream
		printf "\\x0$op\\0"                              # op
		printf '\0\0\0\0\0\0\x04\0\0\0\0\0'              # flags, buf_alloc, fwd_cnt
		if [ "$op" = 5 ]; then printf 'ping'; fi
	} >"$seed"
done

log=$(mktemp)
trap 'rm -f "$log"' EXIT

par=()
if [ "$jobs" -gt 1 ]; then
	par=(-jobs="$jobs" -workers="$jobs")
fi

set +e
RUSTC_BOOTSTRAP=1 nice cargo fuzz run \
	--sanitizer none \
	--target-dir "$cache/target/fuzz" \
	"$target" "$corpus" -- \
	-max_total_time="$secs" "${par[@]}" \
	-print_final_stats=1 2>&1 | tee "$log" | grep -v '^#[0-9]*[[:space:]]*\(NEW\|REDUCE\|pulse\)'
st=("${PIPESTATUS[@]}")
set -e
status=${st[0]}

# With -jobs > 1 libFuzzer writes fuzz-N.log files instead of stderr.
cat fuzz-*.log >>"$log" 2>/dev/null || true
rm -f fuzz-*.log

execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | awk '{s += $1} END {print s + 0}')
echo "fuzz: $target $execs execs in $secs s (exit $status)"

if [ "$status" -ne 0 ] || grep -q 'ERROR: libFuzzer\|panicked at\|SUMMARY: libFuzzer' "$log"; then
	echo "fuzz: $target FAILED, see $here/fuzz/artifacts/$target/" >&2
	exit 1
fi
