#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Run every test the project has and sum them up in one closing line:
# unit tests of the device, the protocol layer, the samples and the bench's
# statistics, a bounded fuzz run of the rx header validation, the runner's
# and the fault suite's self-tests, and the VM suites on the debug kernels:
# on 6.12, C/C (the baseline), Rust/C, Rust/Rust, the reload test, the fault
# suite and the scenarios (bulk transfers of 16 MiB); on 7.3, the lint and
# Rust/C in both role assignments, on the debug kernel and on
# the perf kernel (C/C and Rust/Rust on 7.3 are `make vmtest KERNEL=7.3 ...`:
# same code paths, ten more minutes).
# CHECK_KERNELS lists the kernels (default "6.12 7.3").
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

kernels=${CHECK_KERNELS:-6.12 7.3}
for k in $kernels; do
	make --no-print-directory setup kernel-debug initramfs device extras \
		KERNEL="$k" FLAVOUR=debug DRIVER=rust ||
		die "building the $k test bed failed: see the messages above"
done
has() { [[ " $kernels " == *" $1 "* ]]; }
# 7.3's perf kernel too: vsock_test 40 needs its speed (see vmtest.py).
if has 7.3; then
	make --no-print-directory initramfs extras KERNEL=7.3 FLAVOUR=perf \
		DRIVER=rust || die "building the 7.3 perf bed failed: see the messages above"
fi
# The scenarios' programs and modules (6.12 only, as their step below).
if has 6.12; then
	KERNEL=6.12 tools/build-scenarios.sh debug ||
		die "building the scenarios' archive failed: see the messages above"
fi

step device-unit cargo test --locked --manifest-path tools/vsock-device/Cargo.toml
step protocol-unit cargo test --locked --manifest-path tools/protocol-tests/Cargo.toml
step samples-unit cargo test --locked --manifest-path samples/Cargo.toml
step bench-unit python3 tools/bench_test.py
step scenarios-selftest python3 tools/scenarios.py --selftest
if has 6.12; then step module-lint make --no-print-directory lint KERNEL=6.12; fi
if has 7.3; then step module-lint-7.3 make --no-print-directory lint KERNEL=7.3; fi
step protocol-fuzz tools/protocol-tests/fuzz.sh "${FUZZ_SECONDS:-30}"
if has 6.12; then
	vt=(tools/vmtest.py --kernel debug --kernel-version 6.12)
	step runner-selftest "${vt[@]}" --selftest
	# The fault suite's own checks must fail when they should: an oracle
	# off by one, a load that cannot succeed, a provoked WARNING.
	step faults-selftest tools/faults.py --kernel debug --kernel-version 6.12 \
		--driver rust --peer rust --selftest
	# With the same driver in both guests the two role assignments run the
	# same code (only the CIDs differ): one is enough. Rust/C runs both, as
	# the Rust driver is server in one and client in the other.
	step vmtest-c-c "${vt[@]}" --driver c --peer c --one-way
	step vmtest-rust-c "${vt[@]}" --driver rust --peer c
	step vmtest-rust-rust "${vt[@]}" --driver rust --peer rust --one-way
	step vmtest-reload "${vt[@]}" --reload 20 --peer c
	# The hostile device and the production paths (Documentation/faults.rst).
	step faults tools/faults.py --kernel debug --kernel-version 6.12 \
		--driver rust --peer rust --json "$log/faults-rust.json"
	# The uses vsock was made for (Documentation/scenarios.rst), with
	# bulk transfers of 16 MiB instead of 100 to fit the check's time.
	step scenarios tools/scenarios.py --kernel debug --kernel-version 6.12 \
		--driver rust --peer c --bulk-mib 16 --json "$log/scenarios-rust.json"
fi
if has 7.3; then
	vt=(tools/vmtest.py --kernel debug --kernel-version 7.3)
	step vmtest-7.3-rust-c "${vt[@]}" --driver rust --peer c
	# The perf kernel runs all 41 tests, test 40 included, which the debug
	# guests are too slow for: about a minute.
	step vmtest-7.3-perf-rust-c tools/vmtest.py --kernel perf \
		--kernel-version 7.3 --driver rust --peer c
fi

echo
cat "$log/summary"
echo "check took $((SECONDS - start)) s; logs in $log"
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
