#!/usr/bin/env bash
# make bench: target/bench/report.md, report.json and one SVG per figure.
#
#   1. devmgr micro-benchmarks (criterion): cargo bench -p capsule-devmgr --bench devmgr
#   2. capsule-bench (tests/src/bin/capsule-bench): cold start against bare
#      QEMU and runc, hotplug against bare QMP, memory against runc's shim,
#      density; it reads the criterion results of step 1 into the report.
#
#   CAPSULE_BENCH_ROUNDS=N   rounds per comparison (default 5)
#
# Needs root, the guest image (make guest) and the tools of
# scripts/install-deps.sh. A missed target is reported, not fatal; a broken
# measurement fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/bench
mkdir -p "$out"
start=$(date +%s)
stamp="$out/.criterion-start"
touch "$stamp"

echo "== bench: devmgr micro-benchmarks (criterion)"
cargo bench -p capsule-devmgr --bench devmgr

echo "== bench: capsule against bare QEMU, runc and bare QMP (${CAPSULE_BENCH_ROUNDS:-5} rounds)"
CAPSULE_BENCH_CRITERION_SINCE="$stamp" \
    cargo run --release -p capsule-tests --bin capsule-bench

echo "== bench: done in $(($(date +%s) - start)) s: $out/report.md"
