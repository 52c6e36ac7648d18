#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Run every test the project has and sum them up in one closing line:
# unit tests of the device, the protocol layer, the samples and the bench's
# statistics, a bounded fuzz run of the rx header validation, the runner's
# self-test, and the VM suites on the debug kernel: C/C (the baseline),
# Rust/C and Rust/Rust.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
cd "$TOP"
export CARGO_TARGET_DIR=$CACHE/target CACHE

passed=0 failed=0 skipped=0
log=$(mktemp -d "${TMPDIR:-/tmp}/check-XXXXXX")
start=$SECONDS

# count NAME: add the closing counts of $log/NAME.out to the totals.
count() {
	local out=$log/$1.out p=0 f=0 s=0 line
	if line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$out" | tail -1) && [ -n "$line" ]; then
		p=$(sed -E 's/^([0-9]+) passed.*/\1/' <<<"$line")
		f=$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$line")
		s=$(sed -nE 's/.* ([0-9]+) skipped.*/\1/p' <<<"$line")
	else
		# cargo test: sum its "test result:" lines.
		while read -r line; do
			p=$((p + $(sed -E 's/.* ([0-9]+) passed.*/\1/' <<<"$line")))
			f=$((f + $(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$line")))
			s=$((s + $(sed -E 's/.* ([0-9]+) ignored.*/\1/' <<<"$line")))
		done < <(grep -E '^test result:' "$out")
		# A step that prints no counts is one test, judged by its status.
		if [ $((p + f + s)) = 0 ]; then
			if [ "$2" = 0 ]; then p=1; else f=1; fi
		fi
	fi
	s=${s:-0}
	if [ "$2" != 0 ] && [ "$f" = 0 ]; then f=1; fi
	passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
	printf '%-28s %s passed, %s failed, %s skipped (%s)\n' "$1" "$p" "$f" "$s" "$out"
}

# step NAME CMD...: run CMD with its output shown and kept, then count it.
step() {
	local name=$1
	shift
	msg "check: $name: $*"
	"$@" 2>&1 | tee "$log/$name.out"
	local rc=${PIPESTATUS[0]}
	count "$name" "$rc" >>"$log/summary"
}

make --no-print-directory setup kernel-debug initramfs device extras FLAVOUR=debug DRIVER=rust ||
	die "building the test bed failed: see the messages above"

step device-unit cargo test --locked --manifest-path tools/vsock-device/Cargo.toml
step protocol-unit cargo test --locked --manifest-path tools/protocol-tests/Cargo.toml
step samples-unit cargo test --locked --manifest-path samples/Cargo.toml
step bench-unit python3 tools/bench_test.py
step module-lint make --no-print-directory lint
step protocol-fuzz tools/protocol-tests/fuzz.sh "${FUZZ_SECONDS:-30}"
step runner-selftest tools/vmtest.py --kernel debug --selftest
step vmtest-c-c tools/vmtest.py --kernel debug --driver c --peer c
step vmtest-rust-c tools/vmtest.py --kernel debug --driver rust --peer c
step vmtest-rust-rust tools/vmtest.py --kernel debug --driver rust --peer rust
step vmtest-reload tools/vmtest.py --kernel debug --reload 20 --peer c

echo
cat "$log/summary"
echo "check took $((SECONDS - start)) s; logs in $log"
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
