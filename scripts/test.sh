#!/usr/bin/env bash
# The test command of README.md: builds everything (examples and benchmarks included) and runs
# every test, in one build profile (heavy numeric tests run optimised: [profile.test] in Cargo.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
# The outside references (tools/reference_transformer.py, tools/check_tokenizer.py) need these;
# the kernels' NVRTC compile test needs NVRTC and the CUDA headers (about 100 MB, from pip's cache
# after the first time).
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  -r tools/requirements.txt -r tools/requirements-cuda.txt
cargo test --workspace --all-targets --locked
