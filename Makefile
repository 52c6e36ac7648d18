# SPDX-License-Identifier: GPL-2.0
#
# virtio_vsock_rs: the project's entry points. Kbuild reads ./Kbuild for the
# module itself; this Makefile drives the test bed around it.
#
#   make setup      install packages and tools (idempotent)
#   make qemu       QEMU 11.1 in a trixie root, for the generic device front
#   make kernel     build the debug and perf guest kernels
#   make run        the main job: two guests with the Rust driver, shown at work
#   make shell      one guest with the Rust driver, on this terminal
#   make vmtest     DRIVER=c|rust PEER=c|rust: vsock_test between two guests
#   make bench      DRIVER=.. PEER=.. [DRIVER2=.. PEER2=..]: ratios, 95% CIs, noise
#   make profile    DRIVER=.. PEER=..: perf profile of a guest during a transfer
#   make lint       rustfmt, clippy (kernel lints) and rustdoc on the module
#   make rustfmtcheck / make rustdoc: one part of make lint
#   make patches    the driver as a checkpatch-clean series against Linux 7.3
#   KERNEL=6.12|7.3 with any target: the guest kernel (default 6.12)
#   make faults     DRIVER=rust|c: hostile device and production paths
#   make soak       DRIVER=rust: the same with 10^6 packets, 1000 reloads
#   make scenarios  DRIVER=rust|c: sibling routing, loopback, vsockmon, real clients
#   make check      every test the project has (what CI runs)
#
# Build artefacts go to $(VSOCK_RS_CACHE), default ~/.cache/virtio_vsock_rs.

VSOCK_RS_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/virtio_vsock_rs
export VSOCK_RS_CACHE
FLAVOUR ?= debug
# The guest kernel, 6.12 (default) or 7.3; tools/lib.sh says what each needs.
# Exported: the scripts and the runners (--kernel-version) follow it.
KERNEL ?= 6.12
export KERNEL
# From tools/lib.sh: LLVM= and the libclang of $(KERNEL)'s build, and the
# cache name of a flavour (debug for 6.12, 7.3-debug for 7.3).
KLLVM := $(shell KERNEL=$(KERNEL) bash -c '. tools/lib.sh && echo $$KLLVM')
$(if $(KLLVM),,$(error unknown KERNEL=$(KERNEL): use 6.12 or 7.3))
KLIBCLANG := $(shell KERNEL=$(KERNEL) bash -c '. tools/lib.sh && echo $$KLIBCLANG')
kname = $(shell KERNEL=$(KERNEL) bash -c '. tools/lib.sh && kname $(1)')
KNAME = $(call kname,$(FLAVOUR))
KDIR ?= $(VSOCK_RS_CACHE)/kernel/$(KNAME)
DRIVER ?= c
PEER ?= $(DRIVER)
CARGO_TARGET_DIR ?= $(VSOCK_RS_CACHE)/target
export CARGO_TARGET_DIR
VMTEST_ARGS ?=
# $(call kmake,DIR): make in the kernel build directory DIR.
kmake = $(if $(KLIBCLANG),LIBCLANG_PATH=$(KLIBCLANG)) $(MAKE) -C $(1) \
	LLVM=$(KLLVM) RUSTC=/usr/bin/rustc BINDGEN=$(VSOCK_RS_CACHE)/cargo/bin/bindgen
KMAKE = $(call kmake,$(KDIR))
# The module is built in a copy per kernel flavour, so the clone stays clean.
MODDIR = $(VSOCK_RS_CACHE)/module/$(KNAME)
MODULE_KO = $(MODDIR)/virtio_vsock_rs.ko
LINTDIR = $(VSOCK_RS_CACHE)/module/lint-$(KERNEL)
NEED_RUST = $(filter rust,$(DRIVER) $(PEER) $(DRIVER2) $(PEER2))

.PHONY: lint rustfmtcheck rustdoc patches run shell module modules extras all setup qemu kernel kernel-debug kernel-perf kernel-builtin initramfs device \
	vsock-tests vmtest vmtest-selftest faults soak scenarios bench profile check device-test clean help

all: help

help:
	@sed -n 's/^#   //p' Makefile

setup:
	@tools/setup.sh
	@tools/setup-qemu.sh || echo "==> note: the VM runners fall back to --front vsock (QEMU 7.2)" >&2

qemu:
	@tools/setup-qemu.sh

kernel: kernel-debug kernel-perf

kernel-debug kernel-perf kernel-builtin: setup
	@tools/build-kernel.sh $(@:kernel-%=%)

vsock-tests: setup
	@tools/build-vsock-tests.sh

initramfs: kernel-$(FLAVOUR) vsock-tests
	@tools/build-initramfs.sh $(FLAVOUR)

# Out-of-tree build of the module against $(KDIR).
module modules: kernel-$(FLAVOUR)
	@mkdir -p $(MODDIR)
	@rsync -a --delete --exclude='*.o' --exclude='*.ko' --exclude='.*.cmd' \
		--exclude='*.mod*' --exclude='bindings_generated.rs' \
		--exclude='modules.order' --exclude='Module.symvers' \
		Kbuild Kconfig src $(MODDIR)/
	@$(KMAKE) M=$(MODDIR) CONFIG_VIRTIO_VSOCKETS_RUST=m modules
	@echo "==> $(MODULE_KO)" >&2

# rustfmt with the kernel's .rustfmt.toml, and clippy with the kernel's lints
# (CLIPPY=1), in a build directory of its own.
lint: kernel-debug
	@rustfmt --check --edition 2021 --config-path .rustfmt.toml src/virtio_vsock_rs.rs
	@rm -rf $(LINTDIR) && mkdir -p $(LINTDIR)
	@cp -r Kbuild Kconfig src $(LINTDIR)/
	@rm -f $(LINTDIR)/src/bindings_generated.rs
	@$(call kmake,$(VSOCK_RS_CACHE)/kernel/$(call kname,debug)) \
		CLIPPY=1 CLIPPY_DRIVER=/usr/bin/clippy-driver KCFLAGS=-Werror \
		M=$(LINTDIR) CONFIG_VIRTIO_VSOCKETS_RUST=m \
		modules 2>&1 | tee $(LINTDIR).log | grep -v '^make'
	@! grep -qE '^(warning|error)' $(LINTDIR).log
	@tools/ksym-len.sh $(LINTDIR)/virtio_vsock_rs.ko
	@tools/rustdoc.sh $(VSOCK_RS_CACHE)/kernel/$(call kname,debug) $(LINTDIR)
	@echo "lint: rustfmt, clippy and rustdoc clean on $(KERNEL)"

rustfmtcheck:
	@rustfmt --check --edition 2021 --config-path .rustfmt.toml src/virtio_vsock_rs.rs
	@echo "rustfmt clean"

rustdoc: lint

# The series against 7.3 (in $(VSOCK_RS_CACHE)/patches/series), checked.
patches:
	@$(MAKE) --no-print-directory setup KERNEL=7.3
	@tools/patches.sh

extras: $(if $(NEED_RUST),module) vsock-tests
	@tools/build-extras.sh $(FLAVOUR) $(if $(NEED_RUST),$(MODULE_KO))

device: setup
	@echo "==> building tools/vsock-device" >&2
	@cargo build --quiet --release --locked --manifest-path tools/vsock-device/Cargo.toml

device-test: setup
	@cargo test --quiet --locked --manifest-path tools/vsock-device/Cargo.toml

# The main job defaults to the Rust driver; DRIVER=c on the command line
# shows the C one.
RUN_DRIVER = $(if $(filter command line,$(origin DRIVER)),$(DRIVER),rust)

run shell:
	@$(MAKE) --no-print-directory initramfs device extras DRIVER=$(RUN_DRIVER) PEER=$(RUN_DRIVER)
	@tools/run.py --kernel $(FLAVOUR) --driver $(RUN_DRIVER) $(if $(filter shell,$@),--shell)

vmtest: initramfs device extras
	@tools/vmtest.py --kernel $(FLAVOUR) --driver $(DRIVER) --peer $(PEER) $(VMTEST_ARGS)

vmtest-selftest: initramfs device extras
	@tools/vmtest.py --kernel $(FLAVOUR) --selftest

# The fault suite (tools/faults.py); FAULTS_ARGS adds options, e.g.
# FAULTS_ARGS='--only flood --json c.json'.
FAULTS_ARGS ?=
faults soak: initramfs device extras
	@tools/faults.py --kernel $(FLAVOUR) --driver $(DRIVER) --peer $(PEER) \
		$(if $(filter soak,$@),--soak) $(FAULTS_ARGS)

# The scenarios (tools/scenarios.py): the uses vsock was made for, with the
# tools people use (Documentation/scenarios.rst). tools/build-scenarios.sh
# adds their programs and modules as an archive of their own. PEER defaults
# to c here, as for the fault suite; SCENARIOS_ARGS adds options, e.g.
# SCENARIOS_ARGS='--only vsockmon --json rust.json'.
SCENARIOS_ARGS ?=
scenarios: initramfs device extras
	@tools/build-scenarios.sh $(FLAVOUR)
	@tools/scenarios.py --kernel $(FLAVOUR) --driver $(DRIVER) \
		$(if $(filter command line,$(origin PEER)),--peer $(PEER)) $(SCENARIOS_ARGS)

# The benchmark (tools/bench.py) on the perf kernel: second configuration
# over the first, beside a copy of the first (the noise floor). BENCH_ARGS
# adds options, e.g. BENCH_ARGS='--reps 2 --bytes 64M' for a quick look.
BENCH_ARGS ?=
bench:
	@$(MAKE) --no-print-directory initramfs device extras FLAVOUR=perf
	@tools/bench.py --driver $(DRIVER) --peer $(PEER) \
		$(if $(DRIVER2),--driver2 $(DRIVER2) --peer2 $(or $(PEER2),$(DRIVER2))) $(BENCH_ARGS)

# Where a guest's CPU goes during one transfer (tools/perf_profile.py), on the
# perf kernel; PROFILE_ARGS picks the direction and the guest, e.g.
# PROFILE_ARGS='--src 3 --dst 4 --guest 3'.
PROFILE_ARGS ?=
profile:
	@$(MAKE) --no-print-directory initramfs device extras FLAVOUR=perf
	@tools/perf_profile.py --driver $(DRIVER) --peer $(PEER) $(PROFILE_ARGS)

check:
	@tools/check.sh

clean:
	rm -rf $(VSOCK_RS_CACHE)/vmtest-*
