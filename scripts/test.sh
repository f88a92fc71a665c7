#!/usr/bin/env bash
# The test command of README.md: builds everything (benchmarks included) and runs every test.
# Heavy numeric tests run optimised ([profile.test] in Cargo.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --all-targets --locked
cargo test --workspace --locked
