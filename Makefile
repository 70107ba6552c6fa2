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

.PHONY: all deps build guest install test bench soak fuzz demo clean

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

test: deps guest
	$(CARGO) test --workspace --no-fail-fast

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
