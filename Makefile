# capsule: containers in lightweight VMs for containerd, with host devices.
#
#   make demo   install everything, build, and run the main job
#   make test   install everything, build, and run every test
#
# Everything a target needs is installed by scripts/install-deps.sh
# (idempotent), so both work on a fresh Debian 12 machine.

CARGO      ?= cargo
GUEST_DIR  := target/guest
BENCH_DIR  := target/bench
FUZZ_SECS  ?= 60

.PHONY: all deps build guest install test e2e bench soak fuzz demo clean

all: build

deps:
	scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --all-targets

# Guest kernels + initramfs images (cached):
# target/guest/{vmlinux, vmlinuz, initramfs-test.img, initramfs.img (the static
# agent as /init)}: the capsule kernel, built once per machine from Debian's
# linux-source-6.1 (guest/kernel/, cached in /var/cache/capsule/kernel);
# target/guest/debian/{vmlinuz, initramfs*.img}: Debian's cloud kernel + modules.
guest: deps
	agent/build-static.sh

# /usr/local/bin/{containerd-shim-capsule-v2,capsule} (static, size-optimised:
# shim/build-dist.sh), the guest in
# /usr/local/share/capsule/, a default /etc/capsule/configuration.toml.
install: deps guest
	shim/build-dist.sh
	shim/install.sh --profile dist

# The end-to-end suites run on every supported containerd (CAPSULE_CONTAINERD,
# tests/src/containerd.rs; 1.7 and 2.1 come from scripts/install-deps.sh's
# cache): in full on Debian 12's 1.6 (the workspace run) and on 2.1, the core
# subset below on 1.7 and on Debian's cloud kernel (the fallback guest). The
# CRI suite (tests/tests/cri.rs: every case on runc, then on capsule) runs on
# 1.6 in the workspace run and again on 2.1; the Sandbox API test
# (tests/tests/sandbox_api.rs) needs 2.x and picks 2.1 itself. Every run goes
# on when one fails; the status is the worst.
E2E_SUITES := --test e2e --test installed_node
E2E_CORE := run_rm_prints_output_and_returns_the_exit_code detached_run_exec_kill_delete \
	terminal_run pod_containers_share_one_vm_and_one_device \
	containerd_restart_keeps_the_sandbox sigkill_of_the_shim_during_a_run_is_cleaned_up \
	vhost_user_blk_from_the_store start_answers_each_daemon_in_its_form \
	ctr_run_with_an_installed_capsule_under_a_service_managers_environment

test: deps guest
	@status=0; \
	$(CARGO) test --workspace --no-fail-fast || status=1; \
	echo "== end-to-end on containerd 2.1"; \
	CAPSULE_CONTAINERD=2.1 $(CARGO) test -p capsule-tests $(E2E_SUITES) --no-fail-fast || status=1; \
	echo "== CRI suite on containerd 2.1"; \
	CAPSULE_CONTAINERD=2.1 $(CARGO) test -p capsule-tests --test cri -- --nocapture || status=1; \
	echo "== end-to-end (core subset) on containerd 1.7"; \
	CAPSULE_CONTAINERD=1.7 $(CARGO) test -p capsule-tests $(E2E_SUITES) --no-fail-fast -- $(E2E_CORE) || status=1; \
	echo "== end-to-end (core subset) on Debian's cloud kernel"; \
	CAPSULE_GUEST_OUT=$(CURDIR)/$(GUEST_DIR)/debian $(CARGO) test -p capsule-tests --test e2e --no-fail-fast -- $(E2E_CORE) || status=1; \
	exit $$status

# One containerd version's end-to-end suites: make e2e CONTAINERD=1.6|1.7|2.1
CONTAINERD ?= 1.6
e2e: deps guest
	CAPSULE_CONTAINERD=$(CONTAINERD) $(CARGO) test -p capsule-tests $(E2E_SUITES) --no-fail-fast

# target/bench/report.md, report.json and SVG plots: capsule against bare
# QEMU, runc and bare QMP, measured interleaved in one run (scripts/bench.sh).
bench: deps guest
	scripts/bench.sh

# The long fault and soak suite: 200 sequential containers in one pod and
# the full crash matrix (make test runs short versions of both).
SOAK_CONTAINERS ?= 200
soak: deps guest
	CAPSULE_SOAK_CONTAINERS=$(SOAK_CONTAINERS) CAPSULE_CRASH_MATRIX=full \
	    $(CARGO) test -p capsule-tests --test soak --test crash_matrix -- --nocapture

# Bounded cargo-fuzz runs of every target (needs the nightly toolchain).
fuzz: deps
	scripts/fuzz.sh $(FUZZ_SECS)

demo: deps guest
	scripts/demo.sh

clean:
	$(CARGO) clean
