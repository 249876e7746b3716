#!/usr/bin/env bash
# Runs each cargo-fuzz target of mxguard-smtp (crates/mxguard-smtp/fuzz) for
# a short while; exits non-zero if any of them crashed.
#
#   tests/fuzz-smoke.sh            # 20 s per target
#   FUZZ_SECONDS=300 tests/fuzz-smoke.sh
#
# cargo-fuzz passes nightly-only rustc flags (-Zsanitizer=address, ...).
# RUSTC_BOOTSTRAP=1 makes the machine's stable toolchain accept them, so no
# nightly is needed. A crash leaves its input in
# crates/mxguard-smtp/fuzz/artifacts/<target>/; replay it with
# `cargo fuzz run <target> <file>` from that directory.
set -euo pipefail
cd "$(dirname "$0")/../crates/mxguard-smtp/fuzz"

seconds="${FUZZ_SECONDS:-20}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz --version 0.13.2
fi

failed=()
for target in $(cargo fuzz list); do
    echo "fuzz-smoke: $target for ${seconds}s"
    if ! cargo fuzz run "$target" -- -max_total_time="$seconds" -timeout=10; then
        failed+=("$target")
    fi
done

if ((${#failed[@]})); then
    echo "fuzz-smoke: crashed: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz-smoke: all targets ran ${seconds}s without a crash"
