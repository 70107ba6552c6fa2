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

.PHONY: all deps build guest install test bench fuzz demo clean

all: build

deps:
	scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --all-targets

# Guest kernel + initramfs from Debian's linux-image-cloud-amd64 (cached):
# target/guest/{vmlinuz, initramfs-test.img, initramfs.img (the static agent as /init)}.
guest: deps
	agent/build-static.sh

# /usr/local/bin/{containerd-shim-capsule-v2,capsule}, the guest in
# /usr/local/share/capsule/, a default /etc/capsule/configuration.toml.
install: deps guest
	$(CARGO) build --release -p capsule-shim --bins
	shim/install.sh

test: deps guest
	$(CARGO) test --workspace --no-fail-fast

bench: deps guest
	mkdir -p $(BENCH_DIR)
	$(CARGO) bench -p capsule-devmgr --bench devmgr
	$(CARGO) bench -p capsule-hypervisor --bench hotplug
	$(CARGO) bench -p capsule-agent --bench roundtrip
	$(CARGO) bench -p capsule-agent --bench device_ready

# Bounded cargo-fuzz runs of every target (needs the nightly toolchain).
fuzz: deps
	scripts/fuzz.sh $(FUZZ_SECS)

demo: deps guest
	scripts/demo.sh

clean:
	$(CARGO) clean
