#!/usr/bin/env bash
# The test command of README.md: builds everything (benchmarks included) and runs every test.
# Heavy numeric tests run optimised ([profile.test] in Cargo.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
# The outside reference of the debug-state check (tools/reference_transformer.py) needs these.
python3 -m pip install --quiet --disable-pip-version-check -r tools/requirements.txt
cargo build --workspace --all-targets --locked
cargo test --workspace --locked
