#!/usr/bin/env bash
# Runs every cargo-fuzz target of every fuzz package for a bounded time and
# prints its exec count. Fails if any target crashes (or does not build).
#   scripts/fuzz.sh [SECONDS]   (default 60 per target; `make fuzz FUZZ_SECS=N`)
# A target with a dictionary in <package>/dicts/<target>.dict gets it.
set -euo pipefail
secs="${1:-60}"
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
mkdir -p target/fuzz-logs
fail=0
for dir in devmgr/fuzz hypervisor/fuzz agent-protocol/fuzz; do
  pkg="$(dirname "$dir")"
  if ! targets="$(cd "$dir" && cargo +nightly fuzz list)"; then
    echo "FAILED: cannot list the targets of $dir"; fail=1; continue
  fi
  for target in $targets; do
    log="target/fuzz-logs/$pkg-$target.log"
    args=(-max_total_time="$secs")
    if [ -f "$dir/dicts/$target.dict" ]; then
      args+=(-dict="dicts/$target.dict")
    fi
    echo "== $dir $target (${secs}s)"
    if ! (cd "$dir" && cargo +nightly fuzz run "$target" -- "${args[@]}") >"$log" 2>&1; then
      echo "FAILED: $dir $target (see $log)"; tail -n 30 "$log"; fail=1
    fi
    grep -E '^#[0-9]+[[:space:]]+DONE' "$log" || true
  done
done
exit "$fail"
