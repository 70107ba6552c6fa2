#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time and prints its exec count.
# Fails if any target crashes.
set -euo pipefail
secs="${1:-60}"
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
mkdir -p target/fuzz-logs
fail=0
for dir in devmgr/fuzz; do
  for target in $(cd "$dir" && cargo +nightly fuzz list); do
    log="target/fuzz-logs/$(basename "$(dirname "$dir")")-$target.log"
    echo "== $dir $target (${secs}s)"
    if ! (cd "$dir" && cargo +nightly fuzz run "$target" -- -max_total_time="$secs") >"$log" 2>&1; then
      echo "FAILED: $target (see $log)"; tail -n 30 "$log"; fail=1
    fi
    grep -E '^#[0-9]+ *DONE' "$log" || true
  done
done
exit "$fail"
