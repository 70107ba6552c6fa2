#!/usr/bin/env bash
# The main job: a private containerd runs a container in a capsule VM with a
# host loop device passed through, shows the device inside, writes data in the
# container and reads it on the host, shows `capsule inspect`, and cleans up.
# Run by `make demo` after the dependencies and the guest image are in place.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run -q -p capsule-tests --bin capsule-demo
