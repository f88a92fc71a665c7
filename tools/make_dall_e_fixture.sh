#!/bin/sh
# Regenerates trainer/tests/fixtures/dall_e/: small random `dall_e` Encoder/Decoder modules
# (n_hid 16, 1 block per group, 64 codes, n_init 24; torch.manual_seed(0)) converted by
# tools/convert_openai_dvae.py (dvae.safetensors), and what `dall_e` itself computes on two
# random 32×32 images (check.safetensors: images, logits, codes, stats, recon). The test
# `converted_dall_e_modules_compute_what_dall_e_computes` (trainer/tests/dvae_openai.rs) compares
# Tessera against this fixture on every run, so the check runs in CI without PyTorch.
#
# Needs a Python with torch and dall_e (both from PyPI), for example:
#   python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch dall-e attrs requests pillow safetensors numpy
#   TESSERA_TORCH_PYTHON=/tmp/torchenv/bin/python tools/make_dall_e_fixture.sh
# (the committed fixture: torch 2.15.0, DALL-E 0.1, safetensors 0.8.0, numpy 2.4.6).
set -eu
python=${TESSERA_TORCH_PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/trainer/tests/fixtures/dall_e"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" "$root/tools/convert_openai_dvae.py" --selftest --out "$tmp"
mkdir -p "$out"
cp "$tmp/dvae.safetensors" "$tmp/check.safetensors" "$out/"
chmod 644 "$out"/*.safetensors
echo "wrote $out"
